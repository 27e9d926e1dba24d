"""Networks and distributions: plain PyTorch encoders, decoders and MLPs (``nets``) and the
image likelihood with its fast log-density (``distributions``).  Nothing here knows about
Pyro's inference."""

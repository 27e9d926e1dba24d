"""What trained models are used for: the gap decomposition (``gaps``), out-of-distribution
scores (``ood``), bits-back compression (``compression``), the classical baselines
(``baselines``), sample quality (``sample_metrics``) and the figures (``plots``).
"""

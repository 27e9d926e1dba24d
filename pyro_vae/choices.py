"""The names users choose from (data sets, objectives, flows, recipes, ...), in a module that
imports nothing heavy: the scripts build their parsers from it, so ``--help`` and a bad flag
answer before torch and Pyro are imported.  The modules that implement each choice import
their names from here (and a test checks that both agree)."""

from __future__ import annotations

from typing import Any

__all__ = [
    "ARCHS",
    "ARRAY_SUFFIXES",
    "CAPABILITIES",
    "ACTIVATIONS",
    "BINARIZATIONS",
    "CLASSIFIERS",
    "COMPRESSORS",
    "COVARIANCES",
    "DATASETS",
    "DEFAULT_KS",
    "DEFAULT_MAX_ROWS",
    "DEFAULT_PRESET",
    "ELBO_NAMES",
    "FAMILIES",
    "HELDOUT_SPLITS",
    "FLOWS",
    "HVAE_GUIDES",
    "IMPORTANCE_WEIGHTED",
    "LARGEST_SIZE",
    "LIKELIHOODS",
    "DISCRETE_LIKELIHOODS",
    "LR_SCHEDULES",
    "MADE",
    "METHODS",
    "MODEL_KINDS",
    "PRESETS",
    "PRESET_MODEL_OVERRIDES",
    "SCALE_LINKS",
]

#: the largest size or count torch can hold (its sizes and indices are int64)
LARGEST_SIZE = 2**63 - 1
#: the data sets that load offline (``load_dataset``): MNIST and Fashion-MNIST (28 x 28,
#: 8-bit), and scikit-learn's bundled digits (8 x 8, 17 grey levels, 1,797 images)
DATASETS = ("mnist", "fashion-mnist", "digits")
#: the VAE's networks: fully connected, or convolutional (images only)
ARCHS = ("mlp", "conv")
#: the files read as a user's data set (``--dataset FILE``)
ARRAY_SUFFIXES = (".npy", ".npz")
#: dynamic: a fresh Bernoulli draw per epoch; static: one draw, seeded; none: grey pixels
BINARIZATIONS = ("dynamic", "static", "none")
#: hidden activations of the networks
ACTIVATIONS = ("relu", "tanh", "softplus", "elu", "gelu", "silu")
#: p(x|z): Bernoulli pixels (binary images); a Gaussian (intensities, a density); the
#: continuous Bernoulli (intensities in [0, 1], a density); the discretised logistic (pixels
#: with a fixed number of levels, 256 for 8-bit grey: a probability, so bits per dimension)
LIKELIHOODS = ("bernoulli", "gaussian", "continuous-bernoulli", "logistic")
#: the likelihoods that give probabilities (not densities): their -log p(x) is a code
#: length, reported in bits per dimension beside nats per image
DISCRETE_LIKELIHOODS = ("bernoulli", "logistic")
#: Normalizing flows on top of the encoder's Gaussian: "iaf" (inverse autoregressive,
#: invertible, so every objective can use it) and "planar" (no inverse, so not with DReG).
FLOWS = ("iaf", "planar")
#: the Gaussian guide's covariance: diagonal, or full (a Cholesky factor)
COVARIANCES = ("diagonal", "full")
#: the semi-supervised model's classifier q(y|x)
CLASSIFIERS = ("mlp", "conv")
#: the model train_svi.py trains: one stochastic layer, or several (HierarchicalVAE)
MODEL_KINDS = ("vae", "hvae")
#: the hierarchical VAE's guides: Burda et al.'s bottom-up chain, or the ladder's top-down merge
#: and the deterministic bottom-up path with independent layers (Havtorn et al.'s)
HVAE_GUIDES = ("bottom-up", "top-down", "deterministic")
#: how a network output becomes a standard deviation (pyro_vae.networks.nets)
SCALE_LINKS = ("softplus", "exp", "softclamp")
#: trace: Trace_ELBO, meanfield: TraceMeanField_ELBO, jit: JitTrace_ELBO, enum:
#: TraceEnum_ELBO, iwae / dreg: the importance-weighted bound and its DReG gradient
ELBO_NAMES = ("trace", "meanfield", "jit", "enum", "iwae", "dreg")
#: the objectives whose num_particles is the K of an importance-weighted bound
IMPORTANCE_WEIGHTED = ("iwae", "dreg")
#: the learning rate over the epochs (``pyro_vae.training.schedules.lr_factor``)
LR_SCHEDULES = ("constant", "cosine", "step")
#: Named training recipes for the VAE on binarised MNIST (train_svi.py --preset); the results
#: pages say what each reaches in how much time.
PRESETS: dict[str, dict[str, Any]] = {
    # the single-sample ELBO of Pyro's example, one hidden layer
    "classic": {
        "elbo": "trace",
        "num_particles": 1,
        "hidden": (400,),
        "activation": "relu",
        "batch_size": 256,
        "lr": 1e-3,
        "lr_schedule": "constant",
        "epochs": 60,
    },
    # DReG with K = 5 on Burda et al.'s two tanh layers of 200, a higher rate annealed to 0
    "iw-fast": {
        "elbo": "dreg",
        "num_particles": 5,
        "hidden": (200, 200),
        "activation": "tanh",
        "batch_size": 100,
        "lr": 3e-3,
        "lr_schedule": "cosine",
        "epochs": 70,
    },
}
# the README's quick start: iw-fast for 25 epochs with the stabilisers, test log p(x) -91.3
# in 8 minutes with the install beside another job (results: training speed)
PRESETS["quick"] = {
    **PRESETS["iw-fast"],
    "epochs": 25,
    "kl_warmup": "10%",
    "init_output_bias": True,
    "adam_eps": 1e-4,
}
#: the recipe ``train_svi.py`` uses without ``--preset``
DEFAULT_PRESET = "iw-fast"
#: Where a model needs another value than its preset's: at 3e-3 the two-layer model's first
#: latent layer drifts in scale and its bound stalls; 1e-3 trains it (benchmarks/hvae_lr.py).
#: The two-layer model also takes the warm-up recipe: a KL warm-up over the first tenth of the
#: epochs, the output bias at the data's logit and Adam's eps 1e-4 (one calibrated hour:
#: docs/results/hierarchical-training.md).
PRESET_MODEL_OVERRIDES: dict[tuple[str, str], dict[str, Any]] = {
    ("iw-fast", "hvae"): {
        "lr": 1e-3,
        "kl_warmup": "10%",
        "init_output_bias": True,
        "adam_eps": 1e-4,
    },
    ("quick", "hvae"): {"lr": 1e-3},
}
#: The gap decomposition's families of q*
FAMILIES = ("own", "diagonal", "full")
#: The held-out splits a trained run is evaluated on.
HELDOUT_SPLITS = ("test", "valid")
#: generic compressors of the input-complexity OOD score
COMPRESSORS = ("png", "zlib", "bz2", "lzma")
#: OOD sets made from the in-distribution images
MADE = ("noise", "flipped")
#: the latent-variable models compared by compare_baselines.py
METHODS = ("PCA", "linear autoencoder", "autoencoder", "VAE", "GAN")
#: what each of them can do at all: reconstruct an image (an encoder), score log p(x), sample
CAPABILITIES = {
    "PCA": {"reconstruct": True, "log p(x)": False, "sample": True},
    "linear autoencoder": {"reconstruct": True, "log p(x)": False, "sample": True},
    "autoencoder": {"reconstruct": True, "log p(x)": False, "sample": True},
    "VAE": {"reconstruct": True, "log p(x)": True, "sample": True},
    "GAN": {"reconstruct": False, "log p(x)": False, "sample": True},
}
#: the evaluator's bound-vs-K points
DEFAULT_KS = (1, 5, 50, 500, 5000)
#: particles x images the evaluator holds at once
DEFAULT_MAX_ROWS = 1 << 15
#: floats of a network's working memory per forward pass that the evaluator's default pass
#: size aims at, for networks that say how much they need per row (``row_floats``)
PASS_FLOATS = 1 << 25

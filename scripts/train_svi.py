"""Train a VAE on MNIST (or Fashion-MNIST) with SVI and report the test ELBO and log p(x).

    python scripts/train_svi.py                 # defaults: a few minutes on a 2-core CPU
    python scripts/train_svi.py --help

Writes to --out (default runs/vae-<timestamp>): config.json, metrics.jsonl (one line per
epoch), checkpoint.pt (after every epoch), figures/*.png and evaluation.json.
All figures are in nats per image.
"""

from __future__ import annotations

import argparse
import sys

from pyro_vae.choices import (
    ARCHS,
    COVARIANCES,
    DEFAULT_PRESET,
    ELBO_NAMES,
    FLOWS,
    HVAE_GUIDES,
    LIKELIHOODS,
    MODEL_KINDS,
    PRESET_MODEL_OVERRIDES,
    PRESETS,
    SCALE_LINKS,
)
from pyro_vae.cli import (
    ArgumentParser,
    UsageError,
    add_preset_arg,
    add_training_args,
    begin_run,
    hidden_sizes,
    layer_sizes,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
    probability,
    run,
    run_config,
    unit_interval,
    warmup_length,
)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    add_training_args(
        p,
        name="vae",
        epochs=None,
        batch_size=None,
        lr=None,
        hidden=None,
        activation=None,
        lr_schedule=None,
        eval_particles=500,
        eval_particles_help="K for the test log p(x) (0: skip; default: 500)",
    )
    add_preset_arg(p, PRESETS, DEFAULT_PRESET, PRESET_MODEL_OVERRIDES)
    p.add_argument(
        "--model",
        default=None,  # "vae" for a new run (late_defaults): a resume sees a given --model
        choices=MODEL_KINDS,
        help="vae: one stochastic layer; hvae: several (HierarchicalVAE, Burda et al.'s two "
        "layers by default) (default: vae)",
    )
    p.late_defaults = {
        **p.late_defaults,
        "model": "vae",
        "kl_warmup": 0,
        "init_output_bias": False,
        "scale_link": "softplus",
    }
    p.add_argument(
        "--z-dims",
        type=hidden_sizes,
        default=None,
        help="hvae: sizes of the stochastic layers, the one next to x first "
        f"(default: {','.join(map(str, HVAE_DEFAULTS['z_dims']))})",
    )
    p.add_argument(
        "--layer-hidden",
        type=layer_sizes,
        default=None,
        help="hvae: hidden sizes between the layers, one list per stochastic layer, from x "
        "up (default: 200,200/100,100)",
    )
    p.add_argument(
        "--guide",
        default=None,
        choices=HVAE_GUIDES,
        help="hvae: q(z1|x) q(z2|z1)... (bottom-up), or the ladder VAE's precision-weighted "
        f"top-down merge (top-down) (default: {HVAE_DEFAULTS['guide']})",
    )
    p.add_argument(
        "--arch",
        default="mlp",
        choices=ARCHS,
        help="the VAE's encoder and decoder: fully connected (mlp) or convolutional (conv: "
        "3x3 convolutions of stride 2, then the --hidden layers; images only) (default: mlp)",
    )
    p.add_argument(
        "--channels",
        type=hidden_sizes,
        default=(32, 64),
        help="--arch conv: filters of each convolution, comma-separated (default: 32,64)",
    )
    p.add_argument(
        "--skip-connections",
        action="store_true",
        help="hvae: skip connections in the generative path, every p(z_l | ...) and p(x | ...) "
        "reading all the layers above it (Havtorn et al.)",
    )
    p.add_argument(
        "--likelihood",
        default="bernoulli",
        choices=LIKELIHOODS,
        help="p(x|z): bernoulli (binary pixels), logistic (discretised, for grey levels; "
        "bits per dimension), continuous-bernoulli or gaussian (intensities); the last three "
        "with --binarize none (default: bernoulli)",
    )
    p.add_argument(
        "--pixel-uniform",
        type=probability,
        default=0.0,
        help="logistic: each pixel's share of the uniform distribution over its levels, "
        "(1 - u) p + u / levels, so that no level costs more than -log(u / levels) "
        "(default: 0)",
    )
    p.add_argument(
        "--x-scale",
        type=positive_float,
        default=None,
        help="fixed std of the Gaussian likelihood (default: learned per pixel)",
    )
    p.add_argument(
        "--beta", type=positive_float, default=1.0, help="weight of the KL term (default: 1)"
    )
    p.add_argument(
        "--perturb",
        type=probability,
        default=0.0,
        help="replace each training pixel, with this probability, by a random value: the "
        "background model of the likelihood-ratio OOD score (Ren et al. 2019; "
        "detect_ood.py --background) (default: 0, off)",
    )
    p.add_argument(
        "--flow",
        default=None,
        choices=FLOWS,
        help="a normalizing flow on top of the guide's Gaussian: iaf (inverse autoregressive) "
        "or planar (not with --elbo dreg) (default: none)",
    )
    p.add_argument(
        "--flow-depth",
        type=positive_int,
        default=None,
        help="transforms in the flow given by --flow (default: 2)",
    )
    p.add_argument(
        "--covariance",
        default="diagonal",
        choices=COVARIANCES,
        help="the guide's Gaussian: diagonal, or full (a lower-triangular scale from one more "
        "head of the encoder; not with --flow) (default: diagonal)",
    )
    p.add_argument(
        "--elbo",
        default=None,
        choices=sorted(ELBO_NAMES),
        help="trace: Trace_ELBO; meanfield: analytic KL; jit: JitTrace_ELBO; iwae: the "
        "K-sample importance-weighted bound; dreg: the same bound with doubly "
        "reparameterised guide gradients (default: set by --preset)",
    )
    p.add_argument(
        "--kl-warmup",
        type=warmup_length,
        default=None,
        help="KL warm-up: the weight of the latent terms rises linearly from --kl-start to 1 "
        "over this many epochs, or this share of --epochs (10%%) (a KL weight under trace, a "
        "temperature on log p(z) - log q(z) inside each importance weight under iwae and "
        "dreg); evaluations always report the untempered bounds (default: 0, off, or set by "
        "--preset)",
    )
    p.add_argument(
        "--kl-start",
        type=unit_interval,
        default=0.0,
        help="the KL weight of the first epoch of a --kl-warmup (default: 0)",
    )
    p.add_argument(
        "--free-bits",
        type=nonnegative_float,
        default=0.0,
        help="free bits (Kingma et al. 2016): each latent layer pays at least this many nats "
        "per image of KL, averaged over the batch; with --elbo trace (default: 0, off)",
    )
    p.add_argument(
        "--free-bits-constant",
        type=nonnegative_int,
        default=None,
        help="epochs at the full --free-bits before the cool-down (default: the whole run)",
    )
    p.add_argument(
        "--free-bits-cooldown",
        type=nonnegative_int,
        default=0,
        help="epochs over which --free-bits then falls linearly to 0 (default: 0)",
    )
    p.add_argument(
        "--scale-link",
        default=None,
        choices=SCALE_LINKS,
        help="how the networks' outputs become standard deviations: softplus(s) + 1e-4, "
        "exp(s) (Burda et al.), or softclamp exp(5 tanh(s/5)) (NVAE) (default: softplus, or "
        "set by --preset)",
    )
    p.add_argument(
        "--weight-norm",
        action="store_true",
        help="weight normalisation on every linear layer (Havtorn et al.'s hierarchical VAEs)",
    )
    p.add_argument(
        "--batch-norm",
        action="store_true",
        help="batch normalisation before every hidden activation (Sønderby et al.'s ladder "
        "VAE); evaluations use the running statistics, which checkpoints carry",
    )
    p.add_argument(
        "--init-output-bias",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="start the decoder's output bias at the logit of the training images' mean "
        "(Burda et al.); --no-init-output-bias undoes a preset's choice (default: off, or set "
        "by --preset)",
    )
    p.add_argument(
        "--keep-best",
        action="store_true",
        help="keep the weights of the epoch with the best validation ELBO in best.pt beside "
        "checkpoint.pt: the test report, the figures and every later job given the run "
        "directory use them (checkpoint.pt stays the last epoch, for --resume)",
    )
    p.add_argument(
        "--patience",
        type=nonnegative_int,
        default=0,
        help="stop after N epochs without a better validation ELBO (default: 0, off); may "
        "change on --resume",
    )
    p.add_argument(
        "--max-minutes",
        type=positive_float,
        default=None,
        help="stop once the epochs so far took this long (default: no limit); may change on "
        "--resume",
    )
    p.add_argument(
        "--num-particles",
        type=positive_int,
        default=None,
        help="particles per datapoint in training: averaged by the ELBOs, the K of the bound "
        "for iwae and dreg (default: set by --preset)",
    )
    return p


# The hierarchical VAE's flags, when --model hvae is chosen without them.
HVAE_DEFAULTS = {
    "z_dims": (100, 50),
    "layer_hidden": ((200, 200), (100, 100)),
    "guide": "bottom-up",
}


def check_model_flags(args) -> None:
    """Refuse, in one line, a flag of the other model that the user gave (a flag left at its
    default is not refused), and fill the hierarchical model's defaults.  (A resumed run's
    flags come from its config.json, checked when it started; runs from before the
    hierarchical flags defaulted to None hold their old defaults there.)"""
    if args.resume is not None:
        if args.model == "hvae":
            for key, value in HVAE_DEFAULTS.items():
                if getattr(args, key) is None:
                    setattr(args, key, value)
        return
    if args.model == "vae":
        for key in HVAE_DEFAULTS:
            if getattr(args, key) is not None:
                flag = "--" + key.replace("_", "-")
                raise UsageError(f"{flag} applies to --model hvae, not to the one-layer VAE")
        if args.skip_connections:
            raise UsageError("--skip-connections applies to --model hvae, not to the one-layer VAE")
        if args.flow_depth is not None and args.flow is None:
            raise UsageError("--flow-depth applies to a --flow (iaf or planar)")
        if args.flow is not None and args.flow_depth is None:
            args.flow_depth = 2
        return
    one_layer_only = {
        "--flow": (args.flow, None),
        "--flow-depth": (args.flow_depth, None),
        "--covariance": (args.covariance, "diagonal"),
        "--likelihood": (args.likelihood, "bernoulli"),
        "--x-scale": (args.x_scale, None),
        "--pixel-uniform": (args.pixel_uniform, 0.0),
        "--beta": (args.beta, 1.0),
        "--z-dim": (args.z_dim, build_parser().get_default("z_dim")),
        "--arch": (args.arch, "mlp"),
        "--channels": (tuple(args.channels), (32, 64)),
        "--hidden": (args.hidden, PRESETS[args.preset]["hidden"]),
    }
    for flag, (value, default) in one_layer_only.items():
        if value != default:
            hint = {"--z-dim": " (its layers are --z-dims)", "--hidden": " (see --layer-hidden)"}
            raise UsageError(
                f"{flag} applies to --model vae, not to the hierarchical VAE{hint.get(flag, '')}"
            )
    for key, value in HVAE_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def main(args) -> dict:
    # torch and Pyro load here, after the arguments are parsed
    from tqdm import tqdm

    from pyro_vae.config import TrainConfig
    from pyro_vae.jobs import train_vae

    args, state, out, device, ranks = begin_run(
        args, build_parser(), "vae", PRESETS, PRESET_MODEL_OVERRIDES
    )
    check_model_flags(args)
    # every setting checked in one place (a ConfigError names the flag), then one call
    config = TrainConfig.from_dict(run_config(args))
    result = train_vae(
        config,
        out,
        state=state,
        new=args.resume is None,  # a resumed run may not have finished its first epoch
        device=device,
        ranks=ranks,
        progress=not args.quiet,
        log=None if args.quiet else tqdm.write,
        record=run_config(args, out=out, device=device),
    )
    report = result.report
    if not ranks.is_main:
        return report
    lines = [f"test ELBO        {report['elbo']:.2f} nats/image ({config.binarize} binarisation)"]
    if config.eval_particles:
        lines += [
            f"test log p(x)    {report['log_px']:.2f} ± {report['log_px_sem']:.2f} nats/image"
            f" (K={config.eval_particles})",
            f"gap (KL to posterior) {report['gap']:.2f} nats/image",
        ]
    rates = report.get("bits_per_dim", {})
    if "nll" in rates or "neg_elbo" in rates:
        which = "nll" if "nll" in rates else "neg_elbo"
        shown = "-log p(x)" if which == "nll" else "-ELBO"
        lines.append(f"{shown} in bits   {rates[which]:.4f} bits/dim")
    if "stopped" in report:
        lines.append(f"stopped early    {report['stopped']}")
    if "best_epoch" in report:
        lines.append(
            f"scored weights   best.pt, epoch {report['best_epoch']} (best validation ELBO)"
        )
    print("\n".join([*lines, f"run directory    {out}"]))
    return report


if __name__ == "__main__":
    sys.exit(run(main, build_parser().parse_args()))

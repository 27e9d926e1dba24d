"""Typed run configs: every setting checked where the config is made, saved and read back
typed, old runs migrated, unknown and missing keys named."""

import json
import re

import pytest

from pyro_vae import Run, TrainConfig
from pyro_vae.checks import ConfigError
from pyro_vae.config import MIGRATIONS


def test_the_default_config_is_the_default_recipe_and_round_trips_through_json():
    from pyro_vae.choices import PRESETS

    config = TrainConfig()
    recipe = PRESETS["iw-fast"]
    assert (config.elbo, config.num_particles, config.epochs, config.lr) == (
        recipe["elbo"],
        recipe["num_particles"],
        recipe["epochs"],
        recipe["lr"],
    )
    saved = json.loads(json.dumps(config.to_dict()))
    assert TrainConfig.from_dict(saved) == config
    assert config.replace(lr=1e-3).lr == 1e-3 and config.lr == recipe["lr"]


@pytest.mark.parametrize(
    "changes,setting,message",
    [
        ({"lr": 0}, "lr", "number in (0, inf)"),
        ({"lr": float("nan")}, "lr", "number in"),
        ({"epochs": 2**63}, "epochs", "2**63 - 1"),
        ({"epochs": True}, "epochs", "whole number"),
        ({"hidden": ()}, "hidden", "non-empty list"),
        ({"hidden": (200, 0)}, "hidden", "from 1"),
        ({"elbo": "renyi"}, "elbo", "'renyi' is not one of"),
        ({"adam_betas": (0.9, 1.0)}, "adam_betas", "[0, 1)"),
        ({"kl_warmup": "150%"}, "kl_warmup", "share such as 10%"),
        ({"kl_start": 1.5}, "kl_start", "[0, 1]"),
        ({"perturb": 1.0}, "perturb", "[0, 1)"),
        ({"seed": 2**32}, "seed", "below 2**32"),
        ({"flow": "planar", "elbo": "dreg"}, "flow", "no inverse"),
        ({"free_bits": 1.0}, "free_bits", "applies to the ELBO"),
        ({"free_bits_cooldown": 3, "elbo": "trace"}, "free_bits_constant", "apply to free_bits"),
        ({"kl_warmup": 5, "elbo": "jit"}, "kl_warmup", "compiles it once"),
        ({"z_dims": (10, 5)}, "z_dims", "applies to model hvae"),
        ({"flow_depth": 3}, "flow_depth", "applies to a flow"),
        ({"model": "hvae", "flow": "iaf"}, "flow", "applies to model vae"),
        ({"model": "hvae", "beta": 0.5}, "beta", "applies to model vae"),
        (
            {"model": "hvae", "z_dims": (10, 5), "layer_hidden": ((20,),)},
            "layer_hidden",
            "one list of sizes per stochastic layer",
        ),
    ],
)
def test_a_bad_setting_is_refused_naming_it(changes, setting, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as caught:
        TrainConfig(**changes)
    assert caught.value.field == setting
    # and ConfigError survives Pyro's re-raise as cls(text)
    assert ConfigError(str(caught.value)).field == setting


def test_a_saved_config_is_read_back_typed_and_an_unknown_or_missing_key_is_named():
    saved = {**TrainConfig(model="hvae", z_dims=(8, 4), layer_hidden=((16,), (8,))).to_dict()}
    saved |= {"out": "runs/x", "threads": 1, "quiet": True, "model_class": "HierarchicalVAE"}
    config = TrainConfig.from_dict(saved)
    assert config.z_dims == (8, 4) and config.layer_hidden == ((16,), (8,))  # tuples again
    with pytest.raises(ConfigError, match="is not a setting") as caught:
        TrainConfig.from_dict({**saved, "learning_rate": 0.1})
    assert caught.value.field == "learning_rate"
    missing = {k: v for k, v in saved.items() if k != "lr"}
    with pytest.raises(ConfigError, match="missing") as caught:
        TrainConfig.from_dict(missing)
    assert caught.value.field == "lr"
    with pytest.raises(ConfigError, match="2\\*\\*63"):
        TrainConfig.from_dict({**saved, "batch_size": 10**30})


def test_an_older_run_s_config_is_migrated_to_what_it_did():
    """A config saved before the newer settings existed (every key of MIGRATIONS absent), and
    a one-layer run of the time that recorded the hierarchical defaults."""
    saved = {k: v for k, v in TrainConfig().to_dict().items() if k not in MIGRATIONS}
    saved |= {"z_dims": [100, 50], "layer_hidden": [[200, 200], [100, 100]], "guide": "bottom-up"}
    config = TrainConfig.from_dict(saved)
    assert config.preset == "classic" and config.lr_schedule == "constant"
    assert config.kl_warmup == 0 and config.adam_eps == 1e-8 and config.scale_link == "softplus"
    assert config.z_dims is None and config.guide is None and config.model == "vae"


def test_a_run_written_by_train_svi_reads_back_as_the_config_it_was_trained_with(trained_run):
    run = Run.load(trained_run)
    config = run.train_config
    saved = json.loads((trained_run / "config.json").read_text())
    assert config.to_dict() == {k: v for k, v in saved.items() if k in config.to_dict()}
    assert (config.train_size, config.epochs, config.elbo) == (512, 1, "dreg")
    from pyro_vae import CheckpointError, load_checkpoint, save_checkpoint

    state = load_checkpoint(trained_run)
    path = save_checkpoint(
        trained_run.parent / "odd.pt", {**state, "config": {**state["config"], "lr": -1}}
    )
    with pytest.raises(CheckpointError, match="its config: lr: must be a number"):
        _ = Run.load(path).train_config


@pytest.mark.parametrize("script", ["train_svi.py", "train_ssvae.py"])
def test_a_config_s_defaults_are_its_script_s_defaults(script, tmp_path):
    """The script with no flags and the config with no arguments are the same run."""
    from helpers import load_script

    from pyro_vae.choices import PRESET_MODEL_OVERRIDES, PRESETS
    from pyro_vae.cli import begin_run, run_config
    from pyro_vae.config import SSVAEConfig

    module = load_script(script)
    parser = module.build_parser()
    args = parser.parse_args(["--out", str(tmp_path / "run")])
    if script == "train_svi.py":
        args = begin_run(args, parser, "vae", PRESETS, PRESET_MODEL_OVERRIDES)[0]
        module.check_model_flags(args)
        assert TrainConfig.from_dict(run_config(args)) == TrainConfig()
    else:
        args = begin_run(args, parser, "ssvae")[0]
        assert SSVAEConfig.from_dict(run_config(args)) == SSVAEConfig()


@pytest.mark.parametrize(
    "flags,preset,settings",
    [
        ([], "iw-fast", {}),
        (["--preset", "quick"], "quick", {}),
        (["--preset", "quick", "--epochs", "3"], "quick", {"epochs": 3}),
        (["--preset", "quick", "--model", "hvae"], "quick", {"model": "hvae"}),
        (["--preset", "classic", "--lr", "0.01"], "classic", {"lr": 0.01}),
    ],
)
def test_a_preset_s_config_is_the_run_its_flags_make(flags, preset, settings, tmp_path):
    """TrainConfig.from_preset(name, **settings) equals train_svi.py --preset name with the
    same settings as flags (the model's own values of the preset included)."""
    from helpers import load_script

    from pyro_vae.choices import PRESET_MODEL_OVERRIDES, PRESETS
    from pyro_vae.cli import begin_run, run_config

    module = load_script("train_svi.py")
    parser = module.build_parser()
    args = parser.parse_args([*flags, "--out", str(tmp_path / "run")])
    args = begin_run(args, parser, "vae", PRESETS, PRESET_MODEL_OVERRIDES)[0]
    module.check_model_flags(args)
    # the script names the hierarchical model's layers and guide itself
    layers = module.HVAE_DEFAULTS if settings.get("model") == "hvae" else {}
    config = TrainConfig.from_preset(preset, **settings, **layers)
    assert TrainConfig.from_dict(run_config(args)) == config
    assert config.preset == preset
    if preset == "quick":
        assert (config.epochs, config.init_output_bias, config.kl_warmup) == (
            settings.get("epochs", 25),
            True,
            "10%",
        )
    assert TrainConfig.from_preset() == TrainConfig()
    with pytest.raises(ConfigError, match="preset: must be one of"):
        TrainConfig.from_preset("fast")


@pytest.mark.parametrize(
    "changes,setting,message",
    [
        ({"m1": "runs/vae", "balance": 1.0}, "balance", "the stack (m1) does not take it"),
        ({"m1": "runs/vae", "classifier": "conv"}, "classifier", "conv classifies pixels"),
        ({"label_rotate": 200}, "label_rotate", "an angle in degrees in [0, 180]"),
        ({"labels": 0}, "labels", "from 1"),
        ({"classifier": "svm"}, "classifier", "'svm' is not one of"),
    ],
)
def test_a_bad_semi_supervised_setting_is_refused_naming_it(changes, setting, message):
    from pyro_vae.config import SSVAEConfig

    with pytest.raises(ConfigError, match=re.escape(message)) as caught:
        SSVAEConfig(**changes)
    assert caught.value.field == setting
    config = SSVAEConfig(labels=200, m1="runs/vae")
    saved = {**config.to_dict(), "labelled_indices": [1, 2], "model_class": "StackedSSVAE"}
    assert SSVAEConfig.from_dict(saved) == config
    older = {k: v for k, v in saved.items() if k not in ("balance", "classifier", "patience")}
    assert SSVAEConfig.from_dict(older) == config  # the settings' "off" values

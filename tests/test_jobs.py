"""The evaluation jobs as library calls: what the scripts print and write is one call on a
loaded run, with the same numbers, the same refusals before any work, and typed configs."""

import json

import numpy as np
import pytest
import torch
from helpers import run_in_process

from pyro_vae import (
    EvalConfig,
    GapsConfig,
    OODConfig,
    Run,
    decompose_gaps,
    evaluate_log_px,
    score_ood,
)
from pyro_vae.checks import ConfigError
from pyro_vae.io.rundir import RunDirError
from pyro_vae.jobs.evaluate import _outputs


def test_evaluate_log_px_is_the_runs_estimate_and_writes_only_when_asked(trained_run, tmp_path):
    run = Run.load(trained_run)
    config = EvalConfig(eval_size=20, num_particles=8, seed=3)
    unwritten = evaluate_log_px(run, config)
    assert unwritten.written is None
    direct = run.log_px("test", 20, num_particles=8, seed=3)
    assert torch.equal(unwritten.result.log_px, direct.log_px)
    # the report is the run's, and records its typed config, read back equal
    assert unwritten.report == {
        **run.log_px_report(direct, "test"),
        "config": config.recorded_in_report(),
    }
    assert EvalConfig.from_dict(json.loads(json.dumps(unwritten.report["config"]))) == config

    written = evaluate_log_px(run, config, tmp_path / "out")
    assert written.written == tmp_path / "out" / "marginal_likelihood_k8.json"
    saved = json.loads(written.written.read_text())
    assert saved["log_px"] == pytest.approx(unwritten.report["log_px"], abs=0)
    assert (tmp_path / "out" / "figures").is_dir()


def test_the_script_prints_what_the_call_returns(trained_run, tmp_path, capsys, data_dir):
    args = ["--checkpoint", str(trained_run), "--eval-size", "20", "--num-particles", "8"]
    status, err = run_in_process(
        "evaluate_marginal_likelihood.py",
        [*args, "--seed", "3", "--out", str(tmp_path / "s")],
        capsys,
    )
    assert status == 0, err
    from_script = json.loads((tmp_path / "s" / "marginal_likelihood_k8.json").read_text())
    from_call = evaluate_log_px(
        Run.load(trained_run), EvalConfig(eval_size=20, num_particles=8, seed=3)
    )
    assert from_script == json.loads(json.dumps(from_call.report))


def test_an_existing_report_is_refused_before_any_work(trained_run, tmp_path, monkeypatch):
    run = Run.load(trained_run)
    config = EvalConfig(eval_size=5, num_particles=2)
    evaluate_log_px(run, config, tmp_path)
    monkeypatch.setattr(Run, "log_px", lambda *a, **k: pytest.fail("worked before refusing"))
    with pytest.raises(RunDirError, match="already exists; pass --force"):
        evaluate_log_px(run, config, tmp_path)
    with pytest.raises(RunDirError, match="an input"):  # never over the run's checkpoint
        _outputs(trained_run, ("checkpoint.pt",), run, True, "--out")


def test_a_stopped_evaluation_goes_on_from_its_last_block_with_the_same_numbers(
    trained_run, tmp_path, monkeypatch
):
    """The finished blocks of an evaluation are kept beside its report while it runs: after a
    stop it scores only the images left, and the report is an uninterrupted one's, bit for
    bit; the kept blocks go once the report is written; another evaluation's are not used."""
    import pyro_vae.jobs.evaluate as job

    run = Run.load(trained_run)
    # K = 4096: chunks of 8 images; one chunk per block, 3 blocks for 20 images
    config = EvalConfig(eval_size=20, num_particles=4096, seed=5, psis=True)
    monkeypatch.setattr(job, "PROGRESS_CHUNKS", 1)
    whole = evaluate_log_px(run, config, tmp_path / "whole")
    progress = tmp_path / "stopped" / "marginal_likelihood_k4096.progress.pt"

    scored = []
    estimate = job.estimate_log_px

    def counting(model, guide, x, **kwargs):
        scored.append(len(x))
        return estimate(model, guide, x, **kwargs)

    def stop_after(n):
        blocks = []

        def pause(name):
            blocks.append(name)
            if len(blocks) == n:
                raise KeyboardInterrupt

        return pause

    monkeypatch.setattr(job, "estimate_log_px", counting)
    monkeypatch.setattr(job, "pause_point", stop_after(2))
    with pytest.raises(KeyboardInterrupt):
        evaluate_log_px(run, config, tmp_path / "stopped")
    assert scored == [8, 8] and progress.is_file()
    assert not (tmp_path / "stopped" / "marginal_likelihood_k4096.json").exists()

    scored.clear()
    monkeypatch.setattr(job, "pause_point", lambda name: None)
    resumed = evaluate_log_px(run, config, tmp_path / "stopped")
    assert scored == [4]  # only the last block was scored again
    for field in ("log_px", "elbo", "ess", "khat", "elbo_sem"):
        assert torch.equal(getattr(resumed.result, field), getattr(whole.result, field)), field
    assert resumed.written.read_bytes() == whole.written.read_bytes().replace(b"whole", b"stopped")
    assert not progress.exists()

    # kept blocks of another evaluation (another seed), or a cut file, are scored afresh
    for bad in ("seed", "cut"):
        monkeypatch.setattr(job, "pause_point", stop_after(1))
        with pytest.raises(KeyboardInterrupt):
            evaluate_log_px(run, config.replace(seed=6), tmp_path / bad)
        kept = tmp_path / bad / "marginal_likelihood_k4096.progress.pt"
        if bad == "cut":
            kept.write_bytes(kept.read_bytes()[:100])
        scored.clear()
        monkeypatch.setattr(job, "pause_point", lambda name: None)
        again = evaluate_log_px(
            run, config if bad == "seed" else config.replace(seed=6), tmp_path / bad
        )
        assert scored == [8, 8, 4]
        expected = whole if bad == "seed" else evaluate_log_px(run, config.replace(seed=6))
        assert torch.equal(again.result.log_px, expected.result.log_px)


def test_decompose_gaps_reports_nats_per_image(trained_run):
    run = Run.load(trained_run)
    config = GapsConfig(images=3, num_particles=50, elbo_particles=20, fit_steps=30)
    result = decompose_gaps(run, config)
    report = result.report
    assert report["family"] == "own" and report["num_datapoints"] == 3
    assert GapsConfig.from_dict(report["config"]) == config
    if report["status"] == "ok":  # the gaps add up: log p(x) - ELBO[q] = approx + amortised
        total = report["approximation_gap"]["mean"] + report["amortisation_gap"]["mean"]
        assert report["inference_gap"]["mean"] == pytest.approx(total, abs=1e-6)
    assert result.written is None


def test_score_ood_scores_both_sets_and_writes_them(trained_run, tmp_path):
    run = Run.load(trained_run)
    config = OODConfig(ood="noise", images=20, num_particles=4, compressor="zlib")
    result = score_ood(run, config, tmp_path)
    report = result.report
    assert report["in"] == "mnist" and report["out"] == "noise"
    assert report["images"] == {"in": 20, "out": 20}
    saved = json.loads((tmp_path / "ood_mnist_vs_noise.json").read_text())
    assert OODConfig.from_dict(saved["config"]) == config
    assert set(report["metrics"]) == set(result.result["in"]) == set(result.result["out"])
    for name, auroc in ((s, m["auroc"]) for s, m in report["metrics"].items()):
        assert 0.0 <= auroc <= 1.0, name
    scores = np.load(tmp_path / "ood_mnist_vs_noise.npz")
    assert np.array_equal(scores["log_px_in"], result.result["in"]["log_px"].numpy())
    mean = report["mean_score"]["log_px"]
    assert mean["in"] == float(result.result["in"]["log_px"].mean())
    assert mean["out"] == float(result.result["out"]["log_px"].mean())


@pytest.mark.parametrize(
    "make,field,message",
    [
        (lambda r: score_ood(r, OODConfig(ood="mnist")), "ood", "nothing to tell apart"),
        (
            lambda r: score_ood(r, OODConfig(ood="noise"), background=r),
            "background",
            "is the model itself",
        ),
    ],
)
def test_score_ood_refuses_before_any_work(trained_run, make, field, message, monkeypatch):
    import pyro_vae.jobs.evaluate as jobs

    monkeypatch.setattr(jobs, "heldout_images", lambda *a, **k: pytest.fail("worked"))
    with pytest.raises(ConfigError, match=message) as caught:
        make(Run.load(trained_run))
    assert caught.value.field == field


@pytest.mark.parametrize(
    "make,field",
    [
        (lambda: EvalConfig(split="train"), "split"),
        (lambda: EvalConfig(num_particles=0), "num_particles"),
        (lambda: EvalConfig(seed=2**32), "seed"),
        (lambda: GapsConfig(family="flow"), "family"),
        (lambda: GapsConfig(fit_lr=float("nan")), "fit_lr"),
        (lambda: OODConfig(ood="cifar"), "ood"),
        (lambda: OODConfig(compressor="bz2", select_images=50), "select_images"),
        (lambda: OODConfig(select_images=2), "select_images"),
        (lambda: OODConfig(inside="mnist", ood="mnist"), "ood"),
    ],
)
def test_evaluation_configs_name_a_bad_setting(make, field):
    with pytest.raises(ConfigError) as caught:
        make()
    assert caught.value.field == field


def test_evaluation_configs_round_trip():
    for config in (EvalConfig(eval_size=10), GapsConfig(images=5), OODConfig(ood="noise")):
        assert type(config).from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ConfigError, match="is not a setting of an evaluation"):
        EvalConfig.from_dict({**EvalConfig().to_dict(), "epochs": 3})


def test_compress_and_decompress_are_one_call_each_and_exact(trained_run, tmp_path):
    from pyro_vae import CompressConfig, compress, decompress

    run = Run.load(trained_run)
    packed = compress(run, "test", CompressConfig(count=12), tmp_path / "t.pvbb")
    assert packed.written == tmp_path / "t.pvbb"
    assert packed.report["images"] == 12 and packed.report["bytes"] == packed.written.stat().st_size
    assert CompressConfig.from_dict(packed.report["config"]) == CompressConfig(count=12)
    expected = run.heldout("test", 12).images
    back = decompress(run, packed.written.read_bytes(), tmp_path / "t.npy")
    assert np.array_equal(back.result.reshape(12, -1), expected.numpy().astype(np.uint8))
    assert np.array_equal(np.load(tmp_path / "t.npy"), back.result)
    # the same images given as an array code to the same bytes
    again = compress(run, expected.numpy().reshape(12, 28, 28), CompressConfig())
    assert again.result.to_bytes() == packed.written.read_bytes()


def test_compress_refuses_before_any_work(trained_run, tmp_path, monkeypatch):
    from pyro_vae import CompressConfig, compress
    from pyro_vae.apps.compression import BitsBackCoder

    run = Run.load(trained_run)
    (tmp_path / "exists.pvbb").write_bytes(b"mine")
    monkeypatch.setattr(BitsBackCoder, "encode", lambda *a, **k: pytest.fail("worked"))
    with pytest.raises(RunDirError, match="already exists"):
        compress(run, "test", CompressConfig(count=2), tmp_path / "exists.pvbb")
    assert (tmp_path / "exists.pvbb").read_bytes() == b"mine"
    with pytest.raises(RunDirError, match="is an input"):
        compress(run, "test", CompressConfig(count=2), run.path, force=True)
    with pytest.raises(ConfigError, match="binary") as caught:
        compress(run, np.full((2, 784), 0.5, np.float32))
    assert caught.value.field == "input"
    with pytest.raises(ConfigError) as caught:
        CompressConfig(latent_bits=17)
    assert caught.value.field == "latent_bits"


def test_compare_baselines_is_one_call_with_its_config_recorded(data_dir, tmp_path, monkeypatch):
    import pyro_vae.jobs.baselines as job
    from pyro_vae import BaselinesConfig, compare_baselines

    config = BaselinesConfig(
        z_dims=(2,), epochs=1, hidden=(16,), train_size=300, test_size=40, samples=40
    )
    seen = []
    result = compare_baselines(
        config, tmp_path, data_dir=data_dir, on_size=lambda d, r: seen.append((d, r))
    )
    assert result.written == tmp_path / "comparison.json"
    saved = json.loads(result.written.read_text())
    assert saved == json.loads(json.dumps(result.report))
    assert BaselinesConfig.from_dict(saved["config"]) == config
    assert [d for d, _ in seen] == [2] and seen[0][1] is result.result[2]
    assert set(saved["results"]["2"]) == {"PCA", "linear autoencoder", "autoencoder", "VAE", "GAN"}
    assert (tmp_path / "figures" / "samples_d2.png").is_file()
    # a second call refuses before any work; a latent size PCA cannot have, too
    monkeypatch.setattr(job, "compare_latent_models", lambda *a, **k: pytest.fail("worked"))
    with pytest.raises(RunDirError, match="comparison.json already exists"):
        compare_baselines(config, tmp_path, data_dir=data_dir)
    with pytest.raises(ConfigError, match="PCA has at most 300 components") as caught:
        compare_baselines(config.replace(z_dims=(400,)), data_dir=data_dir)
    assert caught.value.field == "z_dims"
    with pytest.raises(ConfigError, match="samples: at least 10"):
        BaselinesConfig(samples=3)

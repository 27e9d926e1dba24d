"""One library call per job: what each script does after parsing its flags.

- training (``train``): ``train_vae(TrainConfig, directory)`` and
  ``train_ssvae(SSVAEConfig, directory)`` train into a run directory (checkpoint every epoch,
  exact resume, the test evaluation and the figures) and return the trained run;
- evaluation (``evaluate``), on a run read back with ``Run.load``:
  ``evaluate_log_px(run, EvalConfig)``, ``decompose_gaps(run, GapsConfig)`` and
  ``score_ood(run, OODConfig)``, each writing its report into a directory when given one;
- bits-back coding (``compress``): ``compress(run, images, CompressConfig)`` and
  ``decompress(run, message)``;
- the comparison with other latent-variable models (``baselines``):
  ``compare_baselines(BaselinesConfig, directory)``.

    from pyro_vae import EvalConfig, Run, TrainConfig, evaluate_log_px, train_vae

    trained = train_vae(TrainConfig(epochs=5, train_size=5000), "runs/small").run
    print(evaluate_log_px(trained, EvalConfig(num_particles=1000)).report["log_px"])
"""

from pyro_vae.jobs.baselines import compare_baselines
from pyro_vae.jobs.compress import compress, decompress
from pyro_vae.jobs.evaluate import (
    EvalResult,
    EvaluationInterrupted,
    decompose_gaps,
    evaluate_log_px,
    score_ood,
)
from pyro_vae.jobs.train import (
    TrainResult,
    accuracy,
    build_model,
    curve_label,
    load_m1,
    train_ssvae,
    train_vae,
)

__all__ = [
    "EvalResult",
    "EvaluationInterrupted",
    "TrainResult",
    "accuracy",
    "build_model",
    "compare_baselines",
    "compress",
    "curve_label",
    "decompress",
    "decompose_gaps",
    "evaluate_log_px",
    "load_m1",
    "score_ood",
    "train_ssvae",
    "train_vae",
]

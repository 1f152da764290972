"""Fine-tune the normalization away (LayerNorm and RMSNorm models) and export a model any tool can load.

Heimersheim 2024; Baroni et al. 2025 (see :mod:`normscope.removal.pipeline`). Python API::

    from normscope.removal import RemoveLnOptions, TrainOptions, run
    result = run(lm, train_sample, eval_sample, RemoveLnOptions(train=TrainOptions(steps=300), control=True))
"""

from normscope.removal.export import DEFAULT_EPS, export_model, fold
from normscope.removal.frozen import FrozenNorm, Removal
from normscope.removal.pipeline import RemoveLnOptions, run, select_sites, self_generated_sample
from normscope.removal.schedule import Schedule, ScheduleOptions, build_schedule
from normscope.removal.train import StepLog, StopFlag, TrainingStopped, TrainOptions, train

__all__ = [
    "DEFAULT_EPS", "FrozenNorm", "Removal", "RemoveLnOptions", "Schedule", "ScheduleOptions", "StepLog",
    "StopFlag", "TrainOptions", "TrainingStopped", "build_schedule", "export_model", "fold", "run",
    "select_sites", "self_generated_sample", "train",
]

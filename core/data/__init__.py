"""Data sets shipped with the emulator, the deterministic batch sampler, and the loss.

Entry point: ``DataConfig(...).build(seed=...)`` (also reachable as
``Dataset.Config``). See README.md in this folder for the sources and licenses
of the shipped files.
"""

from core.data.dataset import SHIPPED_DATA, DataConfig, Dataset, Task
from core.data.objectives import loss_sum, num_correct, num_targets
from core.data.sampler import BatchSampler

__all__ = [
    "SHIPPED_DATA",
    "BatchSampler",
    "DataConfig",
    "Dataset",
    "Task",
    "loss_sum",
    "num_correct",
    "num_targets",
]

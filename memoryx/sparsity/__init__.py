"""Selectable weight sparsity: per-parameter masks that MemoryX keeps next to the weights.

See ``config`` for the user-facing config, ``algorithms`` for static, gmp,
set and rigl, ``schedules`` for sparsity/drop-fraction schedules and update
steps, ``masks`` for mask construction and application, and ``filters`` for
which parameters are sparse.
"""

from memoryx.sparsity.algorithms import ALGORITHMS, GMP, SET, RigL, SparsityAlgorithm, Static
from memoryx.sparsity.config import ParamGroupConfig, Sparsity
from memoryx.sparsity.filters import ParamSparsity, is_default_sparse, select_parameters
from memoryx.sparsity.masks import apply_mask, apply_masks, density, init_mask, num_to_prune
from memoryx.sparsity.schedules import SCHEDULES, Schedule, UpdateSchedule

__all__ = [
    "ALGORITHMS",
    "GMP",
    "SCHEDULES",
    "SET",
    "ParamGroupConfig",
    "ParamSparsity",
    "RigL",
    "Schedule",
    "Sparsity",
    "SparsityAlgorithm",
    "Static",
    "UpdateSchedule",
    "apply_mask",
    "apply_masks",
    "density",
    "init_mask",
    "is_default_sparse",
    "num_to_prune",
    "select_parameters",
]

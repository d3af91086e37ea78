"""Loss and accuracy counts, summed so that data-parallel shards add up exactly.

Each node returns the SUM over its shard; the caller divides by the number of
targets in the global batch, which makes the mean independent of how the
batch was split.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from core.data.dataset import Task

_TASKS = ("classification", "language-model")


def _check_task(task: str) -> None:
    if task not in _TASKS:
        raise ValueError(
            f"task = {task!r} is not valid; choose one of {', '.join(map(repr, _TASKS))}."
        )


def loss_sum(task: Task, logits: Tensor, targets: Tensor) -> Tensor:
    """Sum of per-target cross-entropy, nats (language models: over every token)."""
    _check_task(task)
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
    )


def num_targets(task: Task, targets: Tensor) -> int:
    """How many targets ``loss_sum`` adds up: samples, or tokens for a language model."""
    _check_task(task)
    return targets.numel()


def num_correct(task: Task, logits: Tensor, targets: Tensor) -> int:
    """How many targets the arg-max of ``logits`` predicts exactly."""
    _check_task(task)
    return int((logits.argmax(dim=-1) == targets).sum())

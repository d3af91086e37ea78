"""Deterministic global batches, and each node's shard of them."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


class BatchSampler:
    """Deterministic global batches: epoch-wise seeded permutation of the training set.

    Epoch ``e`` visits the samples in the order of a permutation drawn from
    ``(seed, e)``, ``batch_size`` at a time. The last ``num_samples % batch_size``
    samples of each permutation are dropped so that every global batch is full;
    with a fresh permutation each epoch, no sample is left out for good.
    """

    def __init__(self, num_samples: int, batch_size: int, *, seed: int):
        if not 1 <= batch_size <= num_samples:
            raise ValueError(
                f"batch_size = {batch_size} must be between 1 and the {num_samples} training samples."
            )
        if seed < 0:
            raise ValueError(f"seed = {seed} must be a non-negative integer.")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.steps_per_epoch = num_samples // batch_size
        self._epoch: int | None = None
        self._order: Tensor | None = None

    def epoch_order(self, epoch: int) -> Tensor:
        """The permutation of all training indices that epoch ``epoch`` walks through."""
        if epoch != self._epoch:
            # numpy's SeedSequence mixes (seed, epoch) portably, so every node
            # derives the same permutation without communicating.
            permutation = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            self._order, self._epoch = torch.from_numpy(permutation), epoch
        assert self._order is not None
        return self._order

    def global_batch(self, step: int) -> Tensor:
        """Indices (int64, ``batch_size`` of them) of the global batch of ``step``; a pure function of (seed, step)."""
        if step < 0:
            raise ValueError(f"step = {step} must be a non-negative integer.")
        epoch, position = divmod(step, self.steps_per_epoch)
        start = position * self.batch_size
        return self.epoch_order(epoch)[start : start + self.batch_size].clone()

    def shard(self, step: int, rank: int, num_nodes: int) -> Tensor:
        """The contiguous slice of ``global_batch(step)`` that node ``rank`` of ``num_nodes`` trains on."""
        if num_nodes < 1 or self.batch_size % num_nodes != 0:
            raise ValueError(
                f"batch_size = {self.batch_size} must be divisible by num_nodes = {num_nodes} "
                f"so that every node gets an equal shard; pick a batch_size that is a multiple of {num_nodes}."
            )
        if not 0 <= rank < num_nodes:
            raise ValueError(
                f"rank = {rank} must be between 0 and num_nodes - 1 = {num_nodes - 1}."
            )
        shard_size = self.batch_size // num_nodes
        return self.global_batch(step)[rank * shard_size : (rank + 1) * shard_size]

    def span(self, step: int, start: int, stop: int) -> Tensor:
        """Samples ``start:stop`` of ``global_batch(step)``: a node's share when shares differ.

        A heterogeneous cluster gives its nodes unequal shares (``balance: throughput``);
        the shares tile the global batch, so every sample is still trained once per step.
        """
        if not 0 <= start < stop <= self.batch_size:
            raise ValueError(
                f"share {start}:{stop} must be a non-empty span of the {self.batch_size} samples "
                "of the global batch."
            )
        return self.global_batch(step)[start:stop]

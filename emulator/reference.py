"""Plain single-process PyTorch training: the ground truth for the emulator.

The emulator must reproduce these weights and losses (to 1e-5) and is
benchmarked against this loop's step time. It uses the same global batches
(``BatchSampler``) and the same loss normalization (sum over the global
batch divided by its number of targets) as the emulator.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from core.data import BatchSampler, Dataset, loss_sum, num_correct, num_targets
from emulator.zoo import model_blocks


def torch_optimizer(config: Any, params) -> torch.optim.Optimizer:
    """The torch optimizer matching ``config`` (a ``memoryx.optim.Optimizer.Config``).

    Read by duck typing (name, lr, momentum, dampening, nesterov, weight_decay,
    beta1, beta2, eps). ``foreach=False`` keeps the per-parameter arithmetic in
    the same order as an update applied one block at a time.
    """
    if config.name == "sgd":
        return torch.optim.SGD(
            params,
            lr=config.lr,
            momentum=config.momentum,
            dampening=config.dampening,
            nesterov=config.nesterov,
            weight_decay=config.weight_decay,
            foreach=False,
        )
    optimizers = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    if config.name not in optimizers:
        raise ValueError(
            f"name = {config.name!r} is not valid; choose one of 'sgd', 'adam', 'adamw'."
        )
    return optimizers[config.name](
        params,
        lr=config.lr,
        betas=(config.beta1, config.beta2),
        eps=config.eps,
        weight_decay=config.weight_decay,
        foreach=False,
    )


@dataclass
class ReferenceResult:
    """What a reference run produced."""

    blocks: list[nn.Module]  # trained copies of the blocks
    block_weights: list[
        dict[str, Tensor]
    ]  # per block: parameter name -> final value (detached clone)
    losses: list[float]  # mean loss over the global batch at each step, nats, before the update
    step_times_s: list[float]  # wall time of each step (batch gather, forward, backward, update), s
    #: CPU time of this process in each step (all its threads), s: less sensitive than the wall
    #: time to other jobs on a shared machine.
    step_cpu_times_s: list[float] = field(default_factory=list)


def _forward(blocks: list[nn.Module], x: Tensor) -> Tensor:
    for block in blocks:
        x = block(x)
    return x


def reference_train(
    blocks: list[nn.Module] | nn.Sequential,
    dataset: Dataset,
    *,
    optimizer_config: Any,
    batch_size: int,
    num_steps: int,
    seed: int,
) -> ReferenceResult:
    """Train a deep copy of ``blocks`` for ``num_steps`` steps (the caller's model is untouched).

    ``seed`` picks the global batches and seeds the random state that dropout
    draws from; the global random state is restored afterwards.
    """
    if num_steps < 0:
        raise ValueError(f"num_steps = {num_steps} must be a non-negative integer.")
    trained = [copy.deepcopy(block) for block in model_blocks(blocks)]
    model = nn.Sequential(*trained)
    model.train()
    sampler = BatchSampler(dataset.num_train, batch_size, seed=seed)
    optimizer = torch_optimizer(optimizer_config, model.parameters())
    losses: list[float] = []
    step_times_s: list[float] = []
    step_cpu_times_s: list[float] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for step in range(num_steps):
            start, start_cpu = time.perf_counter(), time.process_time()
            indices = sampler.global_batch(step)
            inputs, targets = dataset.train_inputs[indices], dataset.train_targets[indices]
            logits = _forward(trained, inputs)
            loss = loss_sum(dataset.task, logits, targets) / num_targets(dataset.task, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step_times_s.append(time.perf_counter() - start)
            step_cpu_times_s.append(time.process_time() - start_cpu)
            losses.append(loss.item())
    block_weights = [
        {name: p.detach().clone() for name, p in block.named_parameters()} for block in trained
    ]
    return ReferenceResult(
        blocks=trained,
        block_weights=block_weights,
        losses=losses,
        step_times_s=step_times_s,
        step_cpu_times_s=step_cpu_times_s,
    )


def evaluate(
    blocks: list[nn.Module] | nn.Sequential, dataset: Dataset, *, batch_size: int = 256
) -> dict[str, float]:
    """Test-set ``test_loss`` (mean cross-entropy, nats) and ``test_accuracy`` (fraction).

    For a language model the accuracy is next-token accuracy. Runs in eval mode
    (no dropout), ``batch_size`` samples at a time, and restores each block's mode.
    """
    block_list = model_blocks(blocks)
    was_training = [block.training for block in block_list]
    total_loss, total_correct, total_targets = 0.0, 0, 0
    for block in block_list:
        block.eval()
    with torch.no_grad():
        for start in range(0, len(dataset.test_inputs), batch_size):
            inputs = dataset.test_inputs[start : start + batch_size]
            targets = dataset.test_targets[start : start + batch_size]
            logits = _forward(block_list, inputs)
            total_loss += loss_sum(dataset.task, logits, targets).item()
            total_correct += num_correct(dataset.task, logits, targets)
            total_targets += num_targets(dataset.task, targets)
    for block, training in zip(block_list, was_training, strict=True):
        block.train(training)
    return {"test_loss": total_loss / total_targets, "test_accuracy": total_correct / total_targets}

"""Device-level predictions for ``wafer validate``: the photonic and PCM models against chips.

Each function runs one small, seeded experiment (seconds on a CPU) and returns the number a
``references.yaml`` entry compares with a published figure. Results are cached per argument
set: ``wafer validate`` and its tests ask for the same rows more than once.

- ``lightmatter_power_w``: the calibrated photonic cost model's power for Lightmatter's
  65.5 TOPS with a given phase-shifter technology (published ~80 W).
- ``taichi_tops_per_w``: the efficiency the cost model is calibrated to (agrees by design).
- ``ffm_over_twin_accuracy``: in-situ FFM training on a seeded physical device, as a fraction
  of the digital twin's accuracy (the FFM paper: in-situ training reaches the ideal model).
- ``pcm_drift_retention``: accuracy of a network programmed onto the PCM device model, read
  after ``t`` seconds with global drift compensation, over its accuracy 1 s after programming.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from core.data.sources import digits_split
from nodes.photonic.cost import PhaseShifter, PhotonicCost, TaichiReference
from nodes.photonic.insitu import InsituExperiment
from nodes.photonic.preset import load_preset

#: Digits pooled 2 x 2 to 4 x 4 pixels: 16 inputs fit a 16-mode mesh, a chip-sized FFM setup.
_POOL = 2
_FFM_TRAIN_SAMPLES = 400


@contextmanager
def _one_thread() -> Iterator[None]:
    """Tiny tensors: more torch threads only add contention on a busy CPU (10x here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.set_num_threads(threads)


def lightmatter_power_w(tops: float, mesh_size: int, technology: str) -> float:
    """Predicted power of ``tops`` from ``mesh_size`` units with ``technology`` shifters, W."""
    cost = PhotonicCost.Config().build()
    return cost.predict_power_w(tops, mesh_size, PhaseShifter.Config(technology=technology))


def taichi_tops_per_w() -> float:
    """The calibrated model's efficiency for its Taichi execution unit, TOPS/W."""
    cost = PhotonicCost.Config().build()
    ref = cost.reference
    rc: TaichiReference.Config = ref.config
    energy_j = cost.mvm_energy_j(
        rc.num_inputs, rc.num_outputs, ref.num_shifters, rc.phase_shifter.build()
    )
    return ref.ops_per_pass / energy_j / 1e12


def _pooled_digits() -> tuple[torch.Tensor, ...]:
    x_train, y_train, x_test, y_test = digits_split(test_fraction=0.2, split_seed=0)

    def pool(x: torch.Tensor) -> torch.Tensor:
        side = 8 // _POOL
        images = x.to(torch.float64).reshape(-1, 1, 8, 8)
        return torch.nn.functional.avg_pool2d(images, _POOL).reshape(-1, side * side)

    return pool(x_train), y_train, pool(x_test), y_test


@functools.cache
def insitu_result(device: str, mesh_size: int, ffm_steps: int, seed: int):
    """Twin, deployed and FFM accuracies of a 16-16-10 MLP on pooled digits (seeded)."""
    x_train, y_train, x_test, y_test = _pooled_digits()
    x_train, y_train = x_train[:_FFM_TRAIN_SAMPLES], y_train[:_FFM_TRAIN_SAMPLES]
    physical = dataclasses.replace(load_preset(device), mesh_size=mesh_size)
    config = InsituExperiment.Config(
        hidden_width=mesh_size, ffm_steps=ffm_steps, seed=seed, device=physical
    )
    with _one_thread():
        return config.build().run(x_train, y_train, x_test, y_test)


def ffm_over_twin_accuracy(device: str, mesh_size: int, ffm_steps: int, seed: int) -> float:
    result = insitu_result(device, mesh_size, ffm_steps, seed)
    return result.ffm_accuracy / result.twin_accuracy


def deployed_over_twin_accuracy(device: str, mesh_size: int, ffm_steps: int, seed: int) -> float:
    result = insitu_result(device, mesh_size, ffm_steps, seed)
    return result.deployed_accuracy / result.twin_accuracy


@functools.cache
def pcm_drift_retention(model: str, drift_time_s: float, num_steps: int, seed: int) -> float:
    """Accuracy ``drift_time_s`` after programming over that 1 s after, global compensation on.

    The network is trained digitally in-process (``reference_train``) and programmed once onto
    the PCM device model (``drift_eval``, the code of ``wafer eval``).
    """
    from emulator.compare import drift_eval
    from emulator.config import load_config
    from emulator.prepare import prepare_layers
    from emulator.reference import reference_train

    config = load_config(
        overrides={
            "backend": {"kind": "pcm"},
            "model": {"name": model},
            "num_steps": num_steps,
            "seed": seed,
        }
    )
    with _one_thread():
        layers, dataset = prepare_layers(config)
        trained = reference_train(
            layers,
            dataset,
            optimizer_config=config.optimizer,
            batch_size=config.batch_size,
            num_steps=num_steps,
            seed=seed,
        )
        result = drift_eval(config, [1.0, drift_time_s], trained.block_weights)
    early, late = result.accuracy_compensated
    return late / early


__all__ = [
    "deployed_over_twin_accuracy",
    "ffm_over_twin_accuracy",
    "insitu_result",
    "lightmatter_power_w",
    "pcm_drift_retention",
    "taichi_tops_per_w",
]

"""Backends side by side (``wafer compare``) and PCM accuracy over drift time (``wafer eval``).

Python API:

    from emulator.compare import compare_backends, drift_eval
    result = compare_backends(["cs2", "pcm"], model="mlp-digits", num_steps=100)
    print(result.table())

``compare_backends`` trains the same model, seed and data on each backend over the real
cluster (``emulator.train.train``). Each row's time and energy per step come from:

- ``cs2``: the emulated clock of the run (``report.to_json()["emulated"]``: ``step_time_s``,
  ``energy_j``);
- ``pcm``: the PCM cost model (``PcmCost``) applied to the counters the PCM backend reports
  (``Backend.stats()``: programming time and energy, MVM time and energy) for one training
  step replayed in-process on node 0's shard with the run's final weights (every step
  programs and reads the same arrays), plus the backward pass, which hardware-aware training
  runs digitally: its FLOPs are costed on the digital baseline below.

``drift_eval`` programs trained weights once (weight-stationary) and reads them at later
times, with and without global drift compensation, in-process through the same
``PcmBackend`` and ``NodeWorker`` code path as a cluster node.
"""

from __future__ import annotations

import copy
import dataclasses
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor, nn

from emulator.atomic import write_bytes_atomic, write_json_atomic
from emulator.config import ClusterConfig, load_config
from emulator.cost.units import format_energy, format_seconds
from emulator.table import format_table
from nodes.backend import Backend
from nodes.cs2 import Cs2Backend
from nodes.pcm.backend import PcmBackend
from nodes.worker import NodeWorker

#: The digital part of hardware-aware training (backward pass), costed on an H100 at FP16
#: (REFERENCE.md s5: 989 TFLOP/s dense at 700 W).
DIGITAL_BASELINE_FLOPS_PER_S = 989e12
DIGITAL_BASELINE_WATTS = 700.0

_TERA = 1e12


@dataclass
class CompareRow:
    backend: str
    accuracy: float | None
    num_steps: int
    samples_per_step: int
    step_time_s: float
    step_energy_j: float
    flops_per_step: float
    source: str
    #: Named extras (e.g. PCM programming energy per step, projected endurance).
    details: dict[str, float] = field(default_factory=dict)

    @property
    def run_time_s(self) -> float:
        return self.step_time_s * self.num_steps

    @property
    def run_energy_j(self) -> float:
        return self.step_energy_j * self.num_steps

    @property
    def energy_per_sample_j(self) -> float:
        return self.step_energy_j / self.samples_per_step

    @property
    def tops_per_watt(self) -> float:
        return self.flops_per_step / self.step_energy_j / _TERA

    def to_json(self) -> dict:
        return {
            **dataclasses.asdict(self),
            "run_time_s": self.run_time_s,
            "run_energy_j": self.run_energy_j,
            "energy_per_sample_j": self.energy_per_sample_j,
            "tops_per_watt": self.tops_per_watt,
        }


@dataclass
class CompareResult:
    model: str
    rows: list[CompareRow]

    def table(self) -> str:
        rows = [
            (
                row.backend,
                "-" if row.accuracy is None else f"{100 * row.accuracy:.2f}%",
                format_seconds(row.run_time_s),
                format_energy(row.run_energy_j),
                format_energy(row.energy_per_sample_j),
                f"{row.tops_per_watt:.3g}",
                row.source,
            )
            for row in self.rows
        ]
        headers = ["backend", "accuracy", "emulated time", "energy", "energy/sample", "TOPS/W"]
        return format_table(
            [*headers, "what produced it"],
            rows,
            title=f"wafer compare: {self.model}, {self.rows[0].num_steps} steps",
            align="lrrrrrl",
        )

    def to_json(self) -> dict:
        return {"model": self.model, "rows": [row.to_json() for row in self.rows]}

    def plot_png(self) -> bytes:
        """Bar charts of accuracy, energy per sample and TOPS/W, one bar per backend."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = [row.backend for row in self.rows]
        panels = [
            ("eval accuracy (%)", [100 * (row.accuracy or 0.0) for row in self.rows], False),
            ("energy per sample (J)", [row.energy_per_sample_j for row in self.rows], True),
            ("achieved TOPS/W", [row.tops_per_watt for row in self.rows], True),
        ]
        figure, axes = plt.subplots(1, len(panels), figsize=(11, 3.4))
        for axis, (title, values, log) in zip(axes, panels, strict=True):
            axis.bar(
                names, values, color=["#4C72B0", "#DD8452", "#55A868", "#C44E52"][: len(names)]
            )
            axis.set_title(title)
            if log:
                axis.set_yscale("log")
        figure.suptitle(f"{self.model}: {self.rows[0].num_steps} training steps per backend")
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=110)
        plt.close(figure)
        return buffer.getvalue()


def _layers_and_data(config: ClusterConfig) -> tuple[list[nn.Module], object]:
    from emulator.train import prepare_layers

    return prepare_layers(config)


def _worker(config: ClusterConfig, layers, dataset, backend: Backend, **kwargs) -> NodeWorker:
    return NodeWorker(
        layers=[copy.deepcopy(layer) for layer in layers],
        dataset=dataset,
        batch_size=config.batch_size,
        seed=config.seed,
        backend=backend,
        max_eval_samples=config.max_eval_samples,
        **kwargs,
    )


def replay_step(
    config: ClusterConfig, weights: list[dict[str, Tensor]], step: int = 0
) -> tuple[dict[str, float], float, float]:
    """One training step of node 0 in-process: (backend counter deltas, forward and backward FLOPs).

    Uses the node's own code path (``NodeWorker`` with ``config.backend``), so the counters are
    those a cluster node reports for a step.
    """
    layers, dataset = _layers_and_data(config)
    backend = config.backend.build()
    worker = _worker(config, layers, dataset, backend, rank=0, num_nodes=config.num_nodes)
    before = backend.stats()
    forward_flops = backward_flops = 0.0
    for index, params in enumerate(weights):
        forward_flops += worker.forward(index, step, params).flops
    for index in reversed(range(len(weights))):
        backward_flops += worker.backward(index, step, weights[index])[1].flops
    after = backend.stats()
    delta = {name: value - before.get(name, 0.0) for name, value in after.items()}
    return delta, forward_flops, backward_flops


def _pcm_row(config: ClusterConfig, report, accuracy: float | None) -> CompareRow:
    counters, forward_flops, backward_flops = replay_step(config, report.final_weights)
    analog_time_s = sum(
        counters.get(f"pcm.{k}_time_s", 0.0) for k in ("program", "mvm", "calibration")
    )
    analog_energy_j = sum(
        counters.get(f"pcm.{k}_energy_j", 0.0) for k in ("program", "mvm", "calibration")
    )
    digital_time_s = backward_flops / DIGITAL_BASELINE_FLOPS_PER_S
    digital_energy_j = digital_time_s * DIGITAL_BASELINE_WATTS
    nodes = config.num_nodes
    # A fresh backend replayed one step, so its worst device's cycles are that step's wear.
    cycles_per_step = counters.get("pcm.max_write_cycles", 0.0)
    lifetime_steps = (
        config.backend.cost.endurance_cycles / cycles_per_step if cycles_per_step else float("inf")
    )
    return CompareRow(
        backend="pcm",
        accuracy=accuracy,
        num_steps=config.num_steps,
        samples_per_step=config.batch_size,
        # Nodes run in parallel; each one programs, reads, then runs its digital backward.
        step_time_s=analog_time_s + digital_time_s,
        step_energy_j=nodes * (analog_energy_j + digital_energy_j),
        flops_per_step=nodes * (forward_flops + backward_flops),
        source=(
            f"functional run, PCM {config.backend.mode}, hardware-aware training; "
            "PcmCost of one replayed step + digital backward (H100 FP16)"
        ),
        details={
            "program_time_s_per_step": counters.get("pcm.program_time_s", 0.0),
            "program_energy_j_per_step": nodes * counters.get("pcm.program_energy_j", 0.0),
            "mvm_energy_j_per_step": nodes * counters.get("pcm.mvm_energy_j", 0.0),
            "digital_backward_energy_j_per_step": nodes * digital_energy_j,
            "write_cycles_per_device_per_step": counters.get("pcm.max_write_cycles", 0.0),
            "endurance_steps": lifetime_steps,
            "endurance_lifetime_s": lifetime_steps * (analog_time_s + digital_time_s),
        },
    )


def _dense_macs_per_sample(config: ClusterConfig) -> float:
    """Multiply-accumulates per sample of the model's Linear layers (before any re-parameterizing)."""
    module = config.model.build(seed=config.seed)
    return float(
        sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))
    )


#: Optical counters of the photonic backend, summed into the row's time and energy.
_PHOTONIC_OPTICAL = ("program", "mvm", "ffm_error", "dfa_projection")


def _photonic_row(config: ClusterConfig, report, accuracy: float | None) -> CompareRow:
    """PhotonicCost of one replayed step (programming, MVMs) + the digital part on an H100.

    Digital part per training method: backprop trains on the twin, a computer, so its whole
    step (forward and backward, 3 x 2 x MACs) is digital; ffm is all optical; dfa computes its
    weight updates delta h^T (2 x MACs) digitally.
    """
    counters, _forward, _backward = replay_step(config, report.final_weights)
    optical_time_s = sum(counters.get(f"photonic.{k}_time_s", 0.0) for k in _PHOTONIC_OPTICAL)
    optical_energy_j = sum(counters.get(f"photonic.{k}_energy_j", 0.0) for k in _PHOTONIC_OPTICAL)
    optical_ops = sum(counters.get(f"photonic.{k}_ops", 0.0) for k in _PHOTONIC_OPTICAL)
    samples_per_node = config.batch_size // config.num_nodes
    dense_flops = 2.0 * _dense_macs_per_sample(config) * samples_per_node
    training = config.backend.training
    digital_flops = {"backprop": 3.0 * dense_flops, "ffm": 0.0, "dfa": dense_flops}[training]
    digital_time_s = digital_flops / DIGITAL_BASELINE_FLOPS_PER_S
    digital_energy_j = digital_time_s * DIGITAL_BASELINE_WATTS
    nodes = config.num_nodes
    return CompareRow(
        backend="photonic",
        accuracy=accuracy,
        num_steps=config.num_steps,
        samples_per_step=config.batch_size,
        step_time_s=optical_time_s + digital_time_s,
        step_energy_j=nodes * (optical_energy_j + digital_energy_j),
        flops_per_step=nodes * (optical_ops + digital_flops),
        source=(
            f"functional run, photonic {training}, accuracy "
            f"{'with an ideal-mesh forward' if training == 'dfa' else 'on the physical node'}; "
            "PhotonicCost of one replayed step (Taichi-calibrated) + digital part (H100 FP16)"
        ),
        details={
            "program_time_s_per_step": counters.get("photonic.program_time_s", 0.0),
            "program_energy_j_per_step": nodes * counters.get("photonic.program_energy_j", 0.0),
            "optical_energy_j_per_step": nodes * optical_energy_j,
            "digital_energy_j_per_step": nodes * digital_energy_j,
            "optical_ops_per_step": nodes * optical_ops,
        },
    )


def _cs2_row(config: ClusterConfig, report, accuracy: float | None) -> CompareRow:
    emulated = report.to_json()["emulated"]
    return CompareRow(
        backend=config.backend.kind,
        accuracy=accuracy,
        num_steps=config.num_steps,
        samples_per_step=config.batch_size,
        step_time_s=emulated["step_time_s"],
        step_energy_j=emulated["energy_j"],
        flops_per_step=report.steps[-1].flops,
        source=f"functional run, {emulated.get('hardware', 'cs2')} preset (emulated clock)",
    )


#: How each backend's time and energy are obtained; a backend without an entry uses the
#: run's emulated clock (the digital wafer's cost model).
_ROW_BUILDERS = {"pcm": _pcm_row, "photonic": _photonic_row}


def compare_backends(
    backends: Sequence[str],
    *,
    model: str = "mlp-digits",
    num_steps: int = 100,
    num_nodes: int = 2,
    batch_size: int = 128,
    seed: int = 0,
    config_path: str | None = None,
    progress: bool = False,
) -> CompareResult:
    from emulator.train import train

    base = {"model.name": model, "num_steps": num_steps, "num_nodes": num_nodes}
    base |= {"batch_size": batch_size, "seed": seed}
    rows = []
    for kind in backends:
        config = load_config(config_path, {**base, "backend.kind": kind})
        report = train(config, progress=progress)
        accuracy = report.evals[-1].accuracy if report.evals else None
        rows.append(_ROW_BUILDERS.get(kind, _cs2_row)(config, report, accuracy))
    return CompareResult(model=model, rows=rows)


# ---- wafer eval: accuracy over time after programming -----------------------------------


@dataclass
class DriftEvalResult:
    model: str
    num_steps: int
    digital_accuracy: float
    drift_times_s: list[float]
    accuracy_compensated: list[float]
    accuracy_uncompensated: list[float]
    arrays_used: int

    def table(self) -> str:
        rows = [("digital (same weights)", f"{100 * self.digital_accuracy:.2f}%", "")]
        for t, comp, raw in zip(
            self.drift_times_s, self.accuracy_compensated, self.accuracy_uncompensated, strict=True
        ):
            rows.append((_duration(t), f"{100 * comp:.2f}%", f"{100 * raw:.2f}%"))
        return format_table(
            ["time after programming", "global drift comp.", "no compensation"],
            rows,
            title=(
                f"wafer eval: {self.model} on PCM (weight-stationary, {self.arrays_used} arrays), "
                f"trained hardware-aware for {self.num_steps} steps"
            ),
        )

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


_DURATION_UNITS = (("year", 365 * 86400.0), ("day", 86400.0), ("h", 3600.0), ("min", 60.0))


def _duration(seconds: float) -> str:
    """``3600`` -> ``3600 s (1 h)``: the exact time and a readable one."""
    for name, size in _DURATION_UNITS:
        if seconds >= size:
            count = seconds / size
            plural = "s" if name in ("year", "day") and count != 1 else ""
            return f"{seconds:g} s ({count:.3g} {name}{plural})"
    return f"{seconds:g} s"


def check_drift_backend(config: ClusterConfig) -> None:
    """ValueError unless ``config.backend`` has analog arrays whose conductances drift."""
    if not isinstance(config.backend, PcmBackend.Config):
        raise ValueError(
            f"backend.kind = {config.backend.kind!r} has no analog arrays that drift; "
            "wafer eval needs --backend pcm."
        )


def _accuracy(worker: NodeWorker, weights: list[dict[str, Tensor]], step: int) -> float:
    for index, params in enumerate(weights):
        result = worker.evaluate(index, step, params)
    return result.num_correct / result.num_targets


def drift_eval(
    config: ClusterConfig,
    drift_times_s: Sequence[float],
    weights: list[dict[str, Tensor]],
) -> DriftEvalResult:
    """Accuracy of ``weights`` programmed once onto ``config.backend`` (a PCM config) and read
    ``t`` seconds later, for each ``t``, with global drift compensation and without."""
    check_drift_backend(config)
    if any(t < 0 for t in drift_times_s):
        raise ValueError(f"drift_times = {list(drift_times_s)} must all be >= 0 s.")
    layers, dataset = _layers_and_data(config)
    digital = _worker(config, layers, dataset, Cs2Backend.Config().build(), rank=0, num_nodes=1)
    results: dict[str, list[float]] = {}
    arrays_used = 0
    for kind in ("global", "none"):
        device = dataclasses.replace(
            config.backend.device,
            drift_compensation=dataclasses.replace(
                config.backend.device.drift_compensation, kind=kind
            ),
        )
        backend = dataclasses.replace(
            config.backend, mode="weight-stationary", device=device
        ).build()
        backend.check_layers(layers)
        worker = _worker(config, layers, dataset, backend, rank=0, num_nodes=1)
        _accuracy(worker, weights, step=0)  # programs every layer (reads at once)
        programmed_at = backend.clock_s
        results[kind] = []
        for index, t in enumerate(sorted(drift_times_s)):
            backend.advance_clock(max(0.0, programmed_at + t - backend.clock_s))
            results[kind].append(_accuracy(worker, weights, step=index + 1))
        arrays_used = int(backend.stats()["pcm.arrays_in_use"])
    return DriftEvalResult(
        model=config.model.name,
        num_steps=config.num_steps,
        digital_accuracy=_accuracy(digital, weights, step=0),
        drift_times_s=sorted(float(t) for t in drift_times_s),
        accuracy_compensated=results["global"],
        accuracy_uncompensated=results["none"],
        arrays_used=arrays_used,
    )


def trained_weights(config: ClusterConfig, checkpoint: str | None, progress: bool) -> list[dict]:
    """Weights trained hardware-aware on ``config`` over the cluster, or read from a checkpoint."""
    if checkpoint is not None:
        from memoryx.checkpoint import load_checkpoint

        store, _extra = load_checkpoint(checkpoint, config.optimizer.build())
        return [store.weights(i, store.version(i)) for i in range(store.num_layers)]
    from emulator.train import train

    return train(config, progress=progress).final_weights


def write_outputs(result, json_path: str | None, plot_path: str | None = None) -> list[str]:
    written = []
    if json_path:
        write_json_atomic(json_path, result.to_json())
        written.append(json_path)
    if plot_path:
        write_bytes_atomic(Path(plot_path), result.plot_png())
        written.append(plot_path)
    return written


__all__ = [
    "CompareResult",
    "CompareRow",
    "DriftEvalResult",
    "compare_backends",
    "check_drift_backend",
    "drift_eval",
    "replay_step",
    "trained_weights",
]

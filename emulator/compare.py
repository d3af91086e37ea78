"""Backends side by side (``wafer compare``) and PCM accuracy over drift time (``wafer eval``).

Python API:

    from emulator.compare import compare_backends, drift_eval
    result = compare_backends(["cs2", "pcm"], model="mlp-digits", num_steps=100)
    print(result.table())

``compare_backends`` trains the same model, seed and data on each backend over the real
cluster (``emulator.train.train``). Every row's time and energy per step is the run's
emulated clock (``report.emulated``): the measured workload on the preset's MemoryX and
SwarmX, with each node costed by its backend's engine (``Backend.Config.engine``: the wafer,
PCM programming + analog MVMs + digital unit, photonic reconfiguration + optical MVMs +
digital unit). Streams, the SwarmX tree and the MemoryX update are in every row.

TOPS/W counts the same operations for every backend: the model's training FLOPs in the
digital convention (``training_flops_per_sample``), whatever hardware ran them.

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

from core.atomic import write_bytes_atomic, write_json_atomic
from core.cost.workload import Workload
from core.units import format_energy, format_seconds
from emulator.config import ClusterConfig, load_config
from emulator.table import format_table
from nodes.backend import Backend
from nodes.cs2 import Cs2Backend
from nodes.worker import NodeWorker

_TERA = 1e12


@dataclass
class CompareRow:
    backend: str
    accuracy: float | None
    num_steps: int
    samples_per_step: int
    step_time_s: float
    step_energy_j: float
    #: The compute nodes' share of step_energy_j (the rest is MemoryX and SwarmX).
    node_energy_j: float
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
        """Whole cluster: MemoryX and SwarmX included."""
        return self.flops_per_step / self.step_energy_j / _TERA

    @property
    def node_tops_per_watt(self) -> float:
        """The compute nodes alone: what the device technology achieves."""
        return self.flops_per_step / self.node_energy_j / _TERA

    def to_json(self) -> dict:
        return {
            **dataclasses.asdict(self),
            "run_time_s": self.run_time_s,
            "run_energy_j": self.run_energy_j,
            "energy_per_sample_j": self.energy_per_sample_j,
            "tops_per_watt": self.tops_per_watt,
            "node_tops_per_watt": self.node_tops_per_watt,
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
                f"{row.node_tops_per_watt:.3g}",
                row.source,
            )
            for row in self.rows
        ]
        headers = ["backend", "accuracy", "emulated time", "energy", "energy/sample", "TOPS/W"]
        headers.append("node TOPS/W")
        return format_table(
            [*headers, "what produced it"],
            rows,
            title=f"wafer compare: {self.model}, {self.rows[0].num_steps} steps",
            align="lrrrrrrl",
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
            ("achieved TOPS/W (cluster)", [row.tops_per_watt for row in self.rows], True),
            ("achieved TOPS/W (nodes)", [row.node_tops_per_watt for row in self.rows], True),
        ]
        figure, axes = plt.subplots(1, len(panels), figsize=(14, 3.4))
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


def _layers_and_data(config: ClusterConfig, backend: Backend) -> tuple[list[nn.Module], object]:
    from emulator.prepare import prepare_layers

    return prepare_layers(config, backend=backend)


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


def training_flops_per_sample(workload: Workload) -> float:
    """Training FLOPs per sample as a digital node counts them, for any backend's workload.

    Nodes count mesh layers (photonic) as no FLOPs, so each layer's weight
    products are counted from their shapes where the measurement is smaller:
    forward 2 MACs, backward 4 (2 for the first layer, whose input needs no
    gradient); fixed optical stages add their dense-equivalent operations, 3x.
    """
    total = 0.0
    for index, layer in enumerate(workload.layers):
        products = sum(m.flops_per_sample for m in layer.matmuls)
        total += max(layer.forward_flops, products)
        total += max(layer.backward_flops, products * (2 if index > 0 else 1))
        # Optical stages (diffraction) count no FLOPs on a computer: dense-equivalent ops.
        total += 3 * sum(stage.ops_per_sample for stage in layer.optical_passes)
    return total


def _row(config: ClusterConfig, report, accuracy: float | None) -> CompareRow:
    emulated = report.emulated
    stats, engine, workload = emulated.stats, emulated.engine, emulated.workload
    deployment = engine.deployment(workload)
    details = {
        f"{part}_energy_j_per_step": energy for part, energy in stats.node_energy_by_part_j.items()
    }
    details |= {f"{part}_time_s_per_step": t for part, t in stats.node_time_by_part_s.items()}
    details |= {
        f"{component}_energy_j_per_step": energy
        for component, energy in stats.energy_by_component_j.items()
    }
    details |= engine.details(stats.step_time_s)
    details |= {
        "deployment_time_s": deployment.time_s,
        "deployment_energy_j": deployment.energy_j,
    }
    return CompareRow(
        backend=config.backend.kind,
        accuracy=accuracy,
        num_steps=config.num_steps,
        samples_per_step=config.batch_size,
        step_time_s=stats.step_time_s,
        step_energy_j=stats.energy_j,
        node_energy_j=stats.energy_by_component_j[engine.component],
        flops_per_step=training_flops_per_sample(workload) * workload.samples_per_step,
        source=(
            f"functional run; emulated clock: {engine.name} nodes, {stats.hardware} MemoryX "
            "and SwarmX"
        ),
        details=details,
    )


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
    node_groups: str | None = None,
    balance: str | None = None,
) -> CompareResult:
    """One row per backend; with ``node_groups`` (e.g. ``cs2:1,pcm:1``) a mixed row after them."""
    from emulator.train import train

    common = {"model.name": model, "num_steps": num_steps, "batch_size": batch_size, "seed": seed}
    base = {**common, "num_nodes": num_nodes}
    # Every config is checked before the first run, so a typo fails at once.
    configs = [
        (spec, load_config(config_path, {**base, **backend_overrides(spec)})) for spec in backends
    ]
    if node_groups is not None:
        mixed = {**common, "node_groups": node_groups}
        if balance is not None:
            mixed["balance"] = balance
        configs.append((f"mixed {node_groups}", load_config(config_path, mixed)))
    rows = []
    for spec, config in configs:
        report = train(config, progress=progress, final_weights=False)
        accuracy = report.evals[-1].accuracy if report.evals else None
        row = (
            _row(config, report, accuracy)
            if report.grouped is None
            else _mixed_row(config, report, accuracy)
        )
        rows.append(dataclasses.replace(row, backend=spec))
    return CompareResult(model=model, rows=rows)


def _mixed_row(config: ClusterConfig, report, accuracy: float | None) -> CompareRow:
    """A node-groups run: the cluster's step (the slowest group) and all groups' energy."""
    emulated = report.to_json()["emulated"]
    groups = emulated["groups"]
    details = {}
    for index, group in enumerate(groups):
        for key in ("batch_share", "node_time_s", "idle_s", "energy_j"):
            details[f"group{index}_{key}"] = group[key]
    return CompareRow(
        backend=config.node_groups[0].backend.kind,
        accuracy=accuracy,
        num_steps=config.num_steps,
        samples_per_step=config.batch_size,
        step_time_s=emulated["step_time_s"],
        step_energy_j=emulated["energy_j"],
        node_energy_j=sum(group["energy_j"] for group in groups),
        flops_per_step=training_flops_per_sample(report.emulated.workload) * config.batch_size,
        source=(
            f"functional run; emulated clock: each group on its own engine ({config.balance} "
            f"shares), the step waits for group {emulated['slowest_group']}"
        ),
        details=details,
    )


def backend_overrides(spec: str) -> dict[str, str]:
    """``KIND`` or ``KIND:TRAINING`` (e.g. ``photonic:ffm``) as config overrides."""
    kind, colon, training = spec.partition(":")
    return {"backend.kind": kind} | ({"backend.training": training} if colon else {})


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
    config.backend.check_drift_eval()


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
    # Built once each: the compensated backend also prepares the layers.
    backends = {True: config.backend.drift_eval_config(compensated=True).build()}
    layers, dataset = _layers_and_data(config, backends[True])
    backends[False] = config.backend.drift_eval_config(compensated=False).build()
    digital = _worker(config, layers, dataset, Cs2Backend.Config().build(), rank=0, num_nodes=1)
    results: dict[bool, list[float]] = {}
    arrays_used = 0
    for compensated, backend in backends.items():
        backend.check_layers(layers)
        worker = _worker(config, layers, dataset, backend, rank=0, num_nodes=1)
        _accuracy(worker, weights, step=0)  # programs every layer (reads at once)
        programmed_at = backend.clock_s
        results[compensated] = []
        for index, t in enumerate(sorted(drift_times_s)):
            backend.advance_clock(max(0.0, programmed_at + t - backend.clock_s))
            results[compensated].append(_accuracy(worker, weights, step=index + 1))
        arrays_used = int(backend.stats()["pcm.arrays_in_use"])
    return DriftEvalResult(
        model=config.model.name,
        num_steps=config.num_steps,
        digital_accuracy=_accuracy(digital, weights, step=0),
        drift_times_s=sorted(float(t) for t in drift_times_s),
        accuracy_compensated=results[True],
        accuracy_uncompensated=results[False],
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
    "backend_overrides",
    "drift_eval",
    "training_flops_per_sample",
    "trained_weights",
]

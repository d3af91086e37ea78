"""``wafer scale``: the scaling experiment, run functionally at each cluster size.

For each node count the same model trains for a few steps with the same global
batch on a freshly launched cluster (``train``). Each point holds the step time
the emulated clock measured, the analytic prediction of ``wafer simulate`` for
the same config, the emulator's own wall time per step, its launch cost and its
peak memory. Points are written as they finish, so a late failure (a size that
does not fit this machine) keeps the sizes that ran.

The emulator's wall time swings by tens of percent between runs on a shared machine,
the emulated clock not at all: with ``repeats`` every size runs that many times, in
ascending order, then descending, and so on (a drift of the machine's speed then meets
every size alike), and each point is the run with the median wall time per step, with
every run's wall time beside it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

from core.atomic import write_json_atomic
from core.config import to_dict
from core.cost.workload import Workload
from emulator.config import ClusterConfig
from emulator.cost.stats import predict
from emulator.table import format_table, human_bytes
from emulator.zoo import ZOO


@dataclass(frozen=True)
class ScalePoint:
    nodes: int
    emulated_step_time_s: float
    emulated_bound: str
    predicted_step_time_s: float | None
    wall_step_time_s: float
    time_to_first_step_s: float
    launch_time_s: float
    peak_memory_bytes: int
    memory_per_emulated_node_bytes: float
    num_processes: int
    nodes_per_process: int
    num_emulated_nodes: int
    final_loss: float
    #: Wall time per step of every run of this size, in the order they ran (one unless
    #: ``repeats``); ``wall_step_time_s`` is their median.
    wall_step_time_s_runs: tuple[float, ...] = ()

    def to_json(self) -> dict:
        return {
            "nodes": self.nodes,
            "measured": {
                "emulated_step_time_s": self.emulated_step_time_s,
                "bound": self.emulated_bound,
                "final_loss": self.final_loss,
            },
            "predicted": {"step_time_s": self.predicted_step_time_s},
            "wall_step_time_s": self.wall_step_time_s,
            "wall_step_time_s_runs": list(self.wall_step_time_s_runs),
            "time_to_first_step_s": self.time_to_first_step_s,
            "launch_time_s": self.launch_time_s,
            "peak_memory_bytes": self.peak_memory_bytes,
            "memory_per_emulated_node_bytes": self.memory_per_emulated_node_bytes,
            "num_processes": self.num_processes,
            "nodes_per_process": self.nodes_per_process,
            "num_emulated_nodes": self.num_emulated_nodes,
        }


def check_batch(config: ClusterConfig, node_counts: list[int]) -> None:
    """ValueError unless the global batch splits evenly at every node count."""
    bad = [n for n in node_counts if config.batch_size % n]
    if bad:
        lcm = math.lcm(*node_counts)
        raise ValueError(
            f"--batch-size {config.batch_size} does not split evenly over {bad} nodes; the "
            f"scaling experiment keeps one global batch, so use a multiple of {lcm} "
            f"(e.g. --batch-size {lcm}) or drop those node counts."
        )


def predicted_workload(config: ClusterConfig) -> Workload | None:
    """What ``wafer simulate --model M --batch B`` profiles; None for a model outside the zoo."""
    from emulator.cli_cost import resolve_workload

    if config.model.name not in ZOO:
        return None
    return resolve_workload(
        config.model.name, config.batch_size, config.model.seq_len, config.backend.wire_precision
    )


def run_point(config: ClusterConfig, workload: Workload | None, *, progress: bool) -> ScalePoint:
    from emulator.train import train

    report = train(config, progress=progress, final_weights=False)
    result = report.to_json()
    runtime = result["runtime"]
    predicted = None
    if workload is not None:
        hardware = config.emulated_hardware
        engine = config.backend.engine(hardware)
        predicted = predict(workload, hardware, config.num_nodes, engine=engine).step_time_s
    return ScalePoint(
        nodes=config.num_nodes,
        emulated_step_time_s=report.emulated.stats.step_time_s,
        emulated_bound=report.emulated.stats.bound,
        predicted_step_time_s=predicted,
        wall_step_time_s=result["step_wall_time_s"],
        time_to_first_step_s=runtime["time_to_first_step_s"],
        launch_time_s=runtime["launch_time_s"],
        peak_memory_bytes=runtime["memory"]["peak_bytes"],
        memory_per_emulated_node_bytes=runtime["memory"]["per_emulated_node_bytes"],
        num_processes=runtime["num_processes"],
        nodes_per_process=runtime["nodes_per_process"],
        num_emulated_nodes=runtime["num_emulated_nodes"],
        final_loss=report.final_loss,
        wall_step_time_s_runs=(result["step_wall_time_s"],),
    )


def median_point(runs: list[ScalePoint]) -> ScalePoint:
    """The run with the median wall time per step (the upper one of an even count), with
    every run's wall time in ``wall_step_time_s_runs``."""
    middle = sorted(runs, key=lambda p: p.wall_step_time_s)[len(runs) // 2]
    walls = tuple(w for run in runs for w in run.wall_step_time_s_runs)
    return dataclasses.replace(middle, wall_step_time_s_runs=walls)


def scale_json(
    config: ClusterConfig, points: list[ScalePoint], failed: dict | None, *, repeats: int = 1
) -> dict:
    return {
        "model": config.model.name,
        "backend": to_dict(config.backend),
        "hardware": config.hardware.preset,
        "batch_size": config.batch_size,
        "num_steps": config.num_steps,
        "nodes_per_process": config.runtime.nodes_per_process,
        "repeats": repeats,
        "points": [p.to_json() for p in points],
        # A size that could not run (e.g. out of memory here): the sizes before it stand.
        "failed": failed,
    }


def run_scale(
    config: ClusterConfig,
    node_counts: list[int],
    *,
    repeats: int = 1,
    json_path: str | None = None,
    progress: bool = False,
    on_point: Callable[[ScalePoint], None] | None = None,
) -> tuple[list[ScalePoint], dict | None]:
    """Train ``config`` at each node count, ``repeats`` times in alternating order; returns
    one point per size that ran (its median run) and the failure, if any."""
    check_batch(config, node_counts)
    check_repeats(repeats)
    workload = predicted_workload(config)
    runs: dict[int, list[ScalePoint]] = {}

    def points() -> list[ScalePoint]:
        return [median_point(runs[n]) for n in node_counts if n in runs]

    failed = None
    for repeat in range(repeats):
        for n in node_counts if repeat % 2 == 0 else node_counts[::-1]:
            try:
                config_n = dataclasses.replace(config, num_nodes=n)
                point = run_point(config_n, workload, progress=progress)
            except (RuntimeError, OSError, MemoryError) as exc:
                failed = {"nodes": n, "repeat": repeat, "error": f"{type(exc).__name__}: {exc}"}
                break
            runs.setdefault(n, []).append(point)
            if on_point is not None:
                on_point(point)
            if json_path:
                write_json_atomic(json_path, scale_json(config, points(), None, repeats=repeats))
        if failed is not None:
            break
    if json_path:
        write_json_atomic(json_path, scale_json(config, points(), failed, repeats=repeats))
    return points(), failed


def check_repeats(repeats: int) -> None:
    """ValueError unless ``repeats`` is a positive count."""
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(
            f"--repeats {repeats!r} is not valid; give 1 or more (every size then runs that "
            "many times, in alternating order, and its wall time per step is their median)."
        )


def _seconds(value: float | None) -> str:
    from core.units import format_seconds

    return "-" if value is None else format_seconds(value)


def _wall(point: ScalePoint) -> str:
    """Wall time per step, with the range over the runs when the size ran more than once."""
    text = f"{1000 * point.wall_step_time_s:.0f} ms"
    runs = point.wall_step_time_s_runs
    if len(runs) > 1:
        text += f" ({1000 * min(runs):.0f}-{1000 * max(runs):.0f})"
    return text


def scale_table(config: ClusterConfig, points: list[ScalePoint]) -> str:
    rows = [
        [
            p.nodes,
            _seconds(p.emulated_step_time_s),
            _seconds(p.predicted_step_time_s),
            "-"
            if p.predicted_step_time_s is None
            else f"{p.emulated_step_time_s / p.predicted_step_time_s:.3f}",
            _wall(p),
            f"{p.time_to_first_step_s:.1f} s",
            f"{p.num_processes} ({p.nodes_per_process}/proc)",
            human_bytes(p.peak_memory_bytes),
            human_bytes(p.memory_per_emulated_node_bytes),
        ]
        for p in points
    ]
    headers = [
        "nodes",
        "emulated step",
        "predicted step",
        "emulated/predicted",
        "wall/step",
        "first step",
        "processes",
        "peak memory",
        "memory/node",
    ]
    title = (
        f"wafer scale: {config.model.name} on {config.backend.kind} nodes "
        f"({config.hardware.preset}), global batch {config.batch_size}, {config.num_steps} steps"
    )
    return format_table(headers, rows, title=title)


def plot_scale(points: list[ScalePoint], path: str, *, title: str = "") -> None:
    """Emulated vs predicted step time (left); the emulator's wall time and memory (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from emulator.cost.plot import _save

    nodes = [p.nodes for p in points]
    fig, (ax_step, ax_wall) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax_step.plot(
        nodes, [1e6 * p.emulated_step_time_s for p in points], "o-", label="emulated (measured)"
    )
    predicted = [(p.nodes, p.predicted_step_time_s) for p in points if p.predicted_step_time_s]
    if predicted:
        ax_step.plot(
            [n for n, _ in predicted],
            [1e6 * t for _, t in predicted],
            "s--",
            label="predicted (wafer simulate)",
        )
    ax_step.set_xlabel("compute nodes")
    ax_step.set_ylabel("emulated step time (us)")
    ax_step.set_title("emulated hardware")
    walls = [p.wall_step_time_s for p in points]
    spread = [  # below and above the median: the range over the runs of each size
        [w - min(p.wall_step_time_s_runs or (w,)) for w, p in zip(walls, points, strict=True)],
        [max(p.wall_step_time_s_runs or (w,)) - w for w, p in zip(walls, points, strict=True)],
    ]
    wall_line = ax_wall.errorbar(
        nodes, walls, yerr=spread, fmt="o-", color="C2", capsize=3, label="wall / step"
    )
    ax_wall.set_xlabel("compute nodes")
    ax_wall.set_ylabel("emulator wall time per step (s)")
    ax_wall.set_title("the emulator itself")
    ax_mem = ax_wall.twinx()
    ax_mem.plot(
        nodes, [p.peak_memory_bytes / 1024**3 for p in points], "^:", color="C3", label="peak PSS"
    )
    ax_mem.set_ylabel("peak memory (GiB)")
    plain = matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}")
    for ax in (ax_step, ax_wall):
        if len(nodes) > 1:
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(plain)
        ax.grid(alpha=0.3)
    ax_step.legend(fontsize=8)
    handles = [wall_line, *ax_mem.get_lines()]
    ax_wall.legend(handles, [h.get_label() for h in handles], fontsize=8, loc="upper left")
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, plt, path)

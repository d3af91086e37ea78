"""Speedup and scaling efficiency against node count, as a PNG."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from emulator.cost.stats import LINEAR_SCALING_THRESHOLD, StepStats, first_nonlinear


def plot_scaling(
    stats: Sequence[StepStats],
    path: str | Path,
    *,
    threshold: float = LINEAR_SCALING_THRESHOLD,
    title: str = "",
) -> Path:
    """Speedup with the ideal line, efficiency with ``threshold``; written atomically.

    The shaded band runs from the last cluster size that still scales linearly
    to the end of the sweep: somewhere in it scaling stops being linear.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    nodes = [s.num_nodes for s in stats]
    speedup = [s.speedup for s in stats]
    efficiency = [s.scaling_efficiency for s in stats]
    stream_bound = [s.num_nodes for s in stats if s.bound == "stream"]
    knee = first_nonlinear(stats, threshold)
    if knee is not None:
        linear_before = [n for n in nodes if n < knee.num_nodes]
        band_start = linear_before[-1] if linear_before else knee.num_nodes
    fig, (ax_speed, ax_eff) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax_speed.plot(nodes, nodes, "--", color="grey", label="ideal (linear)")
    ax_speed.plot(nodes, speedup, "o-", color="C0", label="predicted")
    ax_speed.set_xlabel("systems")
    ax_speed.set_ylabel("speedup vs 1 system")
    ax_eff.plot(nodes, efficiency, "o-", color="C1", label="predicted")
    ax_eff.axhline(1.0, ls="--", color="grey", label="ideal")
    ax_eff.axhline(threshold, ls=":", color="C3", label=f"{threshold:.0%} threshold")
    ax_eff.set_xlabel("systems")
    ax_eff.set_ylabel("scaling efficiency")
    ax_eff.set_ylim(0, 1.1)
    # Cluster sizes span decades: log axes give the small clusters room too.
    ax_speed.set_xscale("log", base=2)
    ax_speed.set_yscale("log", base=2)
    ax_eff.set_xscale("log", base=2)
    plain = matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}")
    for axis in (ax_speed.xaxis, ax_speed.yaxis, ax_eff.xaxis):
        axis.set_major_formatter(plain)
    for ax in (ax_speed, ax_eff):
        if knee is not None:
            ax.axvspan(
                band_start, nodes[-1], color="C3", alpha=0.12, label="scaling turns non-linear"
            )
        if stream_bound:
            ax.plot(
                stream_bound,
                [
                    s.speedup if ax is ax_speed else s.scaling_efficiency
                    for s in stats
                    if s.bound == "stream"
                ],
                "x",
                color="k",
                ms=9,
                label="stream-bound",
            )
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left" if ax is ax_eff else "upper left", fontsize=8)
    fig.suptitle(title or f"{stats[0].model} on {stats[0].hardware}")
    fig.tight_layout()
    return _save(fig, plt, path)


def _save(fig, plt, path: str | Path) -> Path:
    """Write ``fig`` as PNG atomically (no half-written file) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return path


def plot_sparsity(points: Sequence, path: str | Path, *, title: str = "") -> Path:
    """Emulated speedup and bytes per step against sparsity, one line per cluster size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_speed, ax_bytes) = plt.subplots(1, 2, figsize=(11, 4.2))
    for num_nodes in sorted({p.stats.num_nodes for p in points}):
        curve = [p for p in points if p.stats.num_nodes == num_nodes]
        sparsity = [p.sparsity for p in curve]
        ax_speed.plot(sparsity, [p.speedup for p in curve], "o-", label=f"{num_nodes} nodes")
        ax_bytes.plot(sparsity, [p.bytes_per_step for p in curve], "o-", label=f"{num_nodes} nodes")
    ax_speed.set_xlabel("weight sparsity")
    ax_speed.set_ylabel("emulated speedup vs dense")
    ax_bytes.set_xlabel("weight sparsity")
    ax_bytes.set_ylabel("bytes streamed per step")
    ax_bytes.set_yscale("log")
    for ax in (ax_speed, ax_bytes):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, plt, path)


__all__ = ["plot_scaling", "plot_sparsity"]

"""The emulator's own wall time at weight sparsity 0 and 0.9, side by side, on a GPT model.

Both runs train the same GPT-style zoo model (same seed, batch and node
count) through ``emulator.train.train``; the sparse one keeps 10% of every
weight matrix (static random masks; embeddings, norms and the LM head stay
dense, the default ``param_filter``). It prints each run's median step wall
time (first step left out, later steps timed once the warm spare is up), the
bytes MemoryX streamed per step, the emulated step times, the CPU seconds per
step of each kind of process (``bench_train.run_emulator``), and the ratio
sparse / dense of the wall time.

With ``--repeats R`` the pair runs R times, in alternating order (dense
first, then sparse first, ...), so that a machine whose load drifts weighs on
both alike; each repeat gives its own ratio, and the summary is their median
and range.

    python benchmarks/bench_sparsity.py [--model gpt-tiny] [--steps 10] [--nodes 2] [--repeats 5]

A measurement script, not a test: it asserts nothing about time.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
from pathlib import Path

# gRPC's core logs every GOAWAY of the clusters this script stops at INFO; as `wafer` does.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import ray

from benchmarks.bench_train import run_emulator
from core.atomic import write_json_atomic
from emulator.config import load_config
from emulator.runtime import start_local_ray


def _run(model: str, steps: int, nodes: int, sparsity: float | None) -> dict:
    overrides = {"model.name": model, "num_steps": steps, "num_nodes": nodes, "batch_size": 32}
    if sparsity is not None:
        overrides["sparsity.sparsity"] = sparsity
    # bench_train's run: CPU of every process read at the steps' boundaries, and the steps
    # timed once the warm spare is up (its start is launch cost, not a step's).
    run = run_emulator(load_config(overrides=overrides))
    return {
        "step_s": statistics.median(run["step_times_s"][1:]),
        "egress": run["memoryx_egress_bytes"],
        "ingress": run["memoryx_ingress_bytes"],
        "emulated_s": run["emulated_step_time_s"],
        "loss": run["final_loss"],
        "cpu_s_per_step": run["steady_cpu_s_per_step"],
    }


def _table(runs: dict[str, dict]) -> None:
    print(
        f"{'run':<14} {'wall/step':>10} {'egress/step':>12} {'ingress/step':>13} {'emulated':>10}"
        "  CPU ms/step by process (after the first step)"
    )
    for name, r in runs.items():
        cpu = r["cpu_s_per_step"]
        by_process = ", ".join(f"{group} {cpu[group] * 1e3:.0f}" for group in sorted(cpu))
        print(
            f"{name:<14} {r['step_s'] * 1e3:>8.1f}ms {r['egress'] / 1e3:>10.1f}KB "
            f"{r['ingress'] / 1e3:>11.1f}KB {r['emulated_s'] * 1e6:>8.2f}us  "
            f"{sum(cpu.values()) * 1e3:.0f} ({by_process})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt-tiny", help="gpt-tiny | gpt-text | gpt-10m")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="dense/sparse pairs, alternating")
    parser.add_argument("--json", type=Path, help="write the runs and ratios here")
    args = parser.parse_args()
    start_local_ray(logging_level=logging.WARNING)
    sparsities = {"dense": None, "sparsity 0.9": 0.9}
    ratios, pairs = [], []
    print(f"{args.model}, {args.nodes} nodes, batch 32, {args.steps} steps, {args.repeats} pair(s)")
    for repeat in range(args.repeats):
        order = list(sparsities) if repeat % 2 == 0 else list(reversed(sparsities))
        runs = {name: _run(args.model, args.steps, args.nodes, sparsities[name]) for name in order}
        runs = {name: runs[name] for name in sparsities}
        if runs["dense"]["loss"] == runs["sparsity 0.9"]["loss"]:
            print("warning: the sparse run's loss equals the dense one's; is sparsity applied?")
        _table(runs)
        ratio = runs["sparsity 0.9"]["step_s"] / runs["dense"]["step_s"]
        print(f"wall time per step, sparse / dense: {ratio:.2f} (order: {' then '.join(order)})")
        ratios.append(ratio)
        pairs.append(runs)
    if args.repeats > 1:
        print(
            f"sparse / dense over {args.repeats} pairs: median {statistics.median(ratios):.2f}, "
            f"range {min(ratios):.2f}-{max(ratios):.2f}, "
            f"{sum(r <= 1.0 for r in ratios)} of {args.repeats} at or below 1"
        )
    if args.json:
        write_json_atomic(
            args.json,
            {
                "model": args.model,
                "nodes": args.nodes,
                "steps": args.steps,
                "pairs": pairs,
                "ratios": ratios,
                "median_ratio": statistics.median(ratios),
            },
        )
    ray.shutdown()


if __name__ == "__main__":
    main()

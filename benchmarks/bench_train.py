"""Emulator step time over plain PyTorch step time, same model and global batch, side by side.

For each model and node count the emulator trains through
``emulator.train.train`` (Ray actors, gRPC weight streaming) and the plain
single-process loop ``emulator.reference.reference_train`` trains the same
layers on the same global batches. Per-step wall times come from
``report.steps[i].wall_time_s`` and ``ReferenceResult.step_times_s``; each
side's step time is the median over its steps, leaving out the first
(warm-up) step of every run.

To keep the ratio honest on a shared, noisy machine the runs of one model
are interleaved: torch, emulator(n1), torch, emulator(n2), torch, ... and
each emulator run is compared with the torch runs just before and after it.

The emulator's launch overhead (``report.wall_time_s`` minus the sum of its
step times: model and data build, actor start-up, weight load, the final
evaluation, weight fetch and shutdown) is reported on its own, as is the
one-off Ray start-up.

A pass of several training steps (``runtime.steps_per_pass``) times each step from the
last answer of the step before to its own last answer, and shares the pass's CPU
evenly among its steps.

    python benchmarks/bench_train.py            # mlp-digits at 1 and 4 nodes, gpt-10m at 4
    python benchmarks/bench_train.py --quick    # mlp-digits at 4 nodes only, ~30-50 s
    python benchmarks/bench_train.py --gpt-nodes 1 4 --json out.json
    python benchmarks/bench_train.py --quick --steps-per-pass 1   # a round trip per step

This is a measurement script, not a test: it asserts nothing about time.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

# gRPC's core logs every GOAWAY of the clusters this script stops at INFO; as `wafer` does.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import ray
import torch

from benchmarks.cpu_time import CpuMarks
from core.atomic import write_json_atomic
from emulator.config import ClusterConfig, load_config
from emulator.coordinator import Coordinator
from emulator.prepare import prepare_layers
from emulator.reference import reference_train
from emulator.runtime import start_local_ray
from emulator.train import train


@dataclass(frozen=True)
class ModelPlan:
    name: str
    nodes: tuple[int, ...]
    num_steps: int
    batch_size: int
    shared_memory: str = "auto"  # runtime.shared_memory of the emulator runs
    nodes_per_process: int | str = "auto"  # runtime.nodes_per_process of the emulator runs
    steps_per_pass: int | str | None = None  # runtime.steps_per_pass (None: its default)


def _median_after_warmup(runs: list[list[float]]) -> float:
    """Median over all runs' step times, each run's first (warm-up) step left out."""
    samples = [t for run in runs for t in run[1:]]
    if not samples:
        raise ValueError("need at least 2 steps per run to leave out the warm-up step")
    return statistics.median(samples)


def _min_after_warmup(runs: list[list[float]]) -> float:
    return min(t for run in runs for t in run[1:])


def _config(plan: ModelPlan, nodes: int, seed: int) -> ClusterConfig:
    return load_config(
        overrides={
            "model.name": plan.name,
            "num_nodes": nodes,
            "batch_size": plan.batch_size,
            "num_steps": plan.num_steps,
            "seed": seed,
            # The final evaluation is part of the launch overhead; keep it small.
            "max_eval_samples": nodes,
            "runtime.shared_memory": plan.shared_memory,
            "runtime.nodes_per_process": plan.nodes_per_process,
            **(
                {}
                if plan.steps_per_pass is None
                else {"runtime.steps_per_pass": plan.steps_per_pass}
            ),
        }
    )


def run_reference(config: ClusterConfig, threads: int) -> dict:
    layers, dataset = prepare_layers(config)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        result = reference_train(
            layers,
            dataset,
            optimizer_config=config.optimizer,
            batch_size=config.batch_size,
            num_steps=config.num_steps,
            seed=config.seed,
        )
    finally:
        torch.set_num_threads(previous)
    return {
        "step_times_s": result.step_times_s,
        "step_cpu_times_s": result.step_cpu_times_s,
        "losses": result.losses,
    }


def _process_group(name: str, components: list[str]) -> str:
    """A process's share of the emulator: by the kinds of component it hosts (``memoryx``,
    ``swarmx``, ``node``, joined by ``+`` where they share it), the driver (coordinator),
    and Ray's own processes together."""
    if components:
        return "+".join(sorted({c.split("-")[0] for c in components}))
    return "driver" if name == "driver" else "ray"


def _host_pids(cluster) -> dict[int, list[str]]:
    """pid -> the components each host process of ``cluster`` runs."""
    by_handle: dict = {}
    for name, handle in cluster.host_of.items():
        by_handle.setdefault(handle, []).append(name)
    pids = ray.get([handle.pid.remote() for handle in by_handle], timeout=30)
    return dict(zip(pids, by_handle.values(), strict=True))


def run_emulator(config: ClusterConfig) -> dict:
    """One ``train`` run, with the CPU seconds of every process in each step."""
    # Per pass of training steps (``Coordinator.train_steps``): its start, end and steps.
    windows: list[tuple[float, float, int]] = []
    hosts: dict[int, list[str]] = {}
    train_steps = Coordinator.train_steps

    spare_up: list[bool] = []
    # Read at each pass's boundaries, between the passes (not by a thread during them).
    marks = CpuMarks()

    def timed_steps(self, first, count):
        if not hosts:
            hosts.update(_host_pids(self.cluster))
        if not spare_up and self.cluster.spare is not None:
            # The warm spare starts after the first step (``train``): seconds of one core
            # for its process, once. That is launch cost, not a step's: the steps after it
            # are timed once it is up (``launch_overhead_s`` keeps the wait).
            with contextlib.suppress(Exception):
                ray.get(self.cluster.spare.pid.remote(), timeout=120)
            spare_up.append(True)
        marks.mark()
        started = time.perf_counter()
        records = None
        try:
            records = train_steps(self, first, count)
            return records
        finally:
            windows.append((started, time.perf_counter(), count))
            marks.mark()
            # A step that recovered from a fault may run on a replacement process. Only
            # then: asking every host through Ray after each pass wakes them all between
            # passes, on the cores the next pass runs on.
            if records is None or any(r.num_attempts > 1 for r in records):
                with contextlib.suppress(Exception):
                    hosts.update(_host_pids(self.cluster))

    Coordinator.train_steps = timed_steps
    try:
        report = train(config, progress=False)
    finally:
        Coordinator.train_steps = train_steps
    step_cpu = []  # per step: a pass's CPU shared evenly among its steps
    for start, end, count in windows:
        groups: dict[str, float] = {}
        for pid, (name, cpu_s) in marks.window(start, end).items():
            group = _process_group(name, hosts.get(pid, []))
            groups[group] = groups.get(group, 0.0) + cpu_s / count
        step_cpu += [groups] * count
    # Per step, over all steps after the warm-up one (as the step times).
    steady_cpu: dict[str, float] = {}
    if len(windows) > 1:
        steady_start, steady_end = windows[1][0], windows[-1][1]
        num_steady = sum(count for _, _, count in windows[1:])
        for pid, (name, cpu_s) in marks.window(steady_start, steady_end).items():
            group = _process_group(name, hosts.get(pid, []))
            steady_cpu[group] = steady_cpu.get(group, 0.0) + cpu_s / num_steady
    step_times = [s.wall_time_s for s in report.steps]
    summary = report.to_json()
    return {
        "num_params": report.num_params,
        "num_layers": report.num_layers,
        "wall_time_s": report.wall_time_s,
        "step_times_s": step_times,
        "launch_overhead_s": report.wall_time_s - sum(step_times),
        "node_compute_s": [s.node_compute_seconds for s in report.steps],
        "bytes_to_nodes_per_step": report.steps[-1].bytes_to_nodes,
        "losses": [s.loss for s in report.steps],
        "num_attempts": [s.num_attempts for s in report.steps],
        "step_cpu_s": step_cpu,
        "steady_cpu_s_per_step": steady_cpu,
        "memoryx_egress_bytes": summary["traffic"]["memoryx_egress_bytes"],
        "memoryx_ingress_bytes": summary["traffic"]["memoryx_ingress_bytes"],
        "emulated_step_time_s": summary["emulated"]["step_time_s"],
        "final_loss": report.final_loss,
    }


def measure_model(plan: ModelPlan, *, seed: int, threads: int) -> list[dict]:
    print(f"[{plan.name}] torch reference ...", flush=True)
    first = _config(plan, plan.nodes[0], seed)
    references = [run_reference(first, threads)]
    emulators = []
    for nodes in plan.nodes:
        print(f"[{plan.name}] emulator, {nodes} node(s) ...", flush=True)
        emulators.append(run_emulator(_config(plan, nodes, seed)))
        print(f"[{plan.name}] torch reference ...", flush=True)
        references.append(run_reference(first, threads))

    rows = []
    for index, (nodes, emu) in enumerate(zip(plan.nodes, emulators, strict=True)):
        neighbours = references[index : index + 2]  # the torch runs just before and after
        torch_s = _median_after_warmup([r["step_times_s"] for r in neighbours])
        emu_s = _median_after_warmup([emu["step_times_s"]])
        torch_min_s = _min_after_warmup([r["step_times_s"] for r in neighbours])
        emu_min_s = _min_after_warmup([emu["step_times_s"]])
        torch_cpu_s = _median_after_warmup([r["step_cpu_times_s"] for r in neighbours])
        cpu_by_group_ms = {
            g: cpu_s * 1e3 for g, cpu_s in sorted(emu["steady_cpu_s_per_step"].items())
        }
        emu_cpu_s = sum(emu["steady_cpu_s_per_step"].values())
        loss_gap = max(
            abs(a - b) for a, b in zip(emu["losses"], references[0]["losses"], strict=True)
        )
        rows.append(
            {
                "model": plan.name,
                "params": emu["num_params"],
                "layers": emu["num_layers"],
                "nodes": nodes,
                "global_batch": plan.batch_size,
                "steps": plan.num_steps,
                "emulator_ms": emu_s * 1e3,
                "torch_ms": torch_s * 1e3,
                "ratio": emu_s / torch_s,
                # Minimums are less sensitive to other jobs on a shared machine.
                "emulator_min_ms": emu_min_s * 1e3,
                "torch_min_ms": torch_min_s * 1e3,
                "ratio_of_min": emu_min_s / torch_min_s,
                # CPU seconds per step: the emulator's over all its processes.
                "emulator_cpu_ms": emu_cpu_s * 1e3,
                "emulator_cpu_ms_by_process": cpu_by_group_ms,
                "torch_cpu_ms": torch_cpu_s * 1e3,
                "cpu_ratio": emu_cpu_s / torch_cpu_s,
                "emulator_warmup_step_ms": emu["step_times_s"][0] * 1e3,
                "launch_overhead_s": emu["launch_overhead_s"],
                "emulator_wall_time_s": emu["wall_time_s"],
                "node_compute_ms_per_step": statistics.median(emu["node_compute_s"][1:]) * 1e3,
                "bytes_to_nodes_per_step": emu["bytes_to_nodes_per_step"],
                "max_abs_loss_diff": loss_gap,
                "emulator_step_times_s": emu["step_times_s"],
                "torch_step_times_s": [r["step_times_s"] for r in neighbours],
                "num_attempts": emu["num_attempts"],
            }
        )
    return rows


def start_private_ray() -> float:
    """Start a Ray instance of our own; ``train`` reuses it. Returns the seconds it took.

    A fresh local instance on loopback, as ``wafer train`` starts it: a bare
    ``ray.init()`` would join whatever cluster ``RAY_ADDRESS`` or
    /tmp/ray/ray_current_cluster names (another user's ``ray start``, possibly
    dead), and its load would pollute the timings.
    """
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    started = time.perf_counter()
    start_local_ray(logging_level=logging.WARNING)
    return time.perf_counter() - started


def measure_with_retry(plan: ModelPlan, *, seed: int, threads: int, retries: int) -> list[dict]:
    """``measure_model``; if the cluster fails under it, restart Ray and run the model again."""
    for attempt in range(retries + 1):
        try:
            return measure_model(plan, seed=seed, threads=threads)
        except (RuntimeError, ray.exceptions.RayError) as exc:
            if attempt == retries:
                raise
            print(f"[{plan.name}] failed ({str(exc).splitlines()[0]}); restarting Ray", flush=True)
            ray.shutdown()
            start_private_ray()
    raise AssertionError("unreachable")


def _machine() -> dict:
    return {
        "cpus": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def print_table(result: dict) -> None:
    print(
        f"\n{result['machine']['cpus']} CPUs, load {result['machine']['load_avg_1m']:.2f} at the end, "
        f"torch reference on {result['torch_threads']} thread(s), emulator nodes on 1 thread each; "
        f"Ray start-up {result['ray_init_s']:.1f} s (once)"
    )
    header = (
        f"{'model':<11} {'params':>11} {'nodes':>5} {'batch':>5} {'emu ms/step':>12} "
        f"{'torch ms/step':>14} {'ratio':>7} {'min ratio':>9} {'launch s':>9} {'node compute ms':>16} {'|dloss|':>8}"
    )
    print(header)
    print("-" * len(header))
    for row in result["rows"]:
        print(
            f"{row['model']:<11} {row['params']:>11,} {row['nodes']:>5} {row['global_batch']:>5} "
            f"{row['emulator_ms']:>12.1f} {row['torch_ms']:>14.1f} {row['ratio']:>7.1f} "
            f"{row['ratio_of_min']:>9.1f} "
            f"{row['launch_overhead_s']:>9.1f} {row['node_compute_ms_per_step']:>16.1f} "
            f"{row['max_abs_loss_diff']:>8.1e}"
        )
    print(
        "\nCPU ms/step (emulator: mean over the steps after the warm-up one, summed over its "
        "processes; torch: median)"
    )
    for row in result["rows"]:
        parts = ", ".join(f"{g} {ms:.0f}" for g, ms in row["emulator_cpu_ms_by_process"].items())
        print(
            f"{row['model']:<11} {row['nodes']:>2} node(s): emulator {row['emulator_cpu_ms']:.0f} "
            f"({parts}); torch {row['torch_cpu_ms']:.0f}; cpu ratio {row['cpu_ratio']:.2f}"
        )
    print(
        "\nratio = emulator ms/step / torch ms/step (medians, warm-up step left out); "
        "launch s = emulator wall time minus its step times;\nnode compute ms = compute time "
        "summed over nodes per step; |dloss| = max loss gap to the torch run (a sanity check)."
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="mlp-digits at 4 nodes only")
    parser.add_argument(
        "--models", nargs="+", default=None, help="models to run (default: mlp-digits gpt-10m)"
    )
    parser.add_argument(
        "--nodes", type=int, nargs="+", default=None, help="node counts for mlp-digits (1 4)"
    )
    parser.add_argument(
        "--gpt-nodes", type=int, nargs="+", default=[4], help="node counts for gpt-10m (4)"
    )
    parser.add_argument("--mlp-steps", type=int, default=None, help="steps of mlp-digits (30)")
    parser.add_argument("--mlp-batch", type=int, default=128, help="global batch of mlp-digits")
    parser.add_argument("--gpt-steps", type=int, default=4, help="steps of gpt-10m (4)")
    parser.add_argument(
        "--gpt-batch", type=int, default=8, help="global batch of gpt-10m, sequences"
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch threads of the reference loop (default 1, as one emulator node)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--retries",
        type=int,
        default=1,
        help="times a model is run again if its cluster dies (e.g. someone's `ray stop`)",
    )
    parser.add_argument(
        "--shared-memory",
        choices=["auto", "off"],
        default="auto",
        help="runtime.shared_memory of the emulator runs (off: chunk payloads as gRPC bytes)",
    )
    parser.add_argument(
        "--nodes-per-process",
        type=lambda text: text if text == "auto" else int(text),
        default="auto",
        help="runtime.nodes_per_process of the emulator runs (auto, or a count)",
    )
    parser.add_argument(
        "--steps-per-pass",
        type=lambda text: text if text == "auto" else int(text),
        default=None,
        help="runtime.steps_per_pass of the emulator runs (auto, or a count; default: auto)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.models is None:
        args.models = ["mlp-digits"] if args.quick else ["mlp-digits", "gpt-10m"]
    if args.nodes is None:
        args.nodes = [4] if args.quick else [1, 4]
    if args.mlp_steps is None:
        args.mlp_steps = 10 if args.quick else 30

    plans = {
        "mlp-digits": ModelPlan(
            "mlp-digits",
            tuple(args.nodes),
            args.mlp_steps,
            args.mlp_batch,
            args.shared_memory,
            args.nodes_per_process,
            args.steps_per_pass,
        ),
        "gpt-10m": ModelPlan(
            "gpt-10m",
            tuple(args.gpt_nodes),
            args.gpt_steps,
            args.gpt_batch,
            args.shared_memory,
            args.nodes_per_process,
            args.steps_per_pass,
        ),
    }
    unknown = [m for m in args.models if m not in plans]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {sorted(plans)}")

    started = time.perf_counter()
    ray_init_s = start_private_ray()
    rows = []
    try:
        for name in args.models:
            rows += measure_with_retry(
                plans[name], seed=args.seed, threads=args.torch_threads, retries=args.retries
            )
    finally:
        ray.shutdown()
    result = {
        "benchmark": "train",
        "machine": _machine(),
        "torch_threads": args.torch_threads,
        "shared_memory": args.shared_memory,
        "nodes_per_process": args.nodes_per_process,
        "steps_per_pass": args.steps_per_pass or "auto",
        "ray_init_s": ray_init_s,
        "total_s": time.perf_counter() - started,
        "rows": rows,
    }
    print_table(result)
    if args.json is not None:
        write_json_atomic(args.json, result)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()

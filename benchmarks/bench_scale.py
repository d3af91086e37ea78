"""How many emulated nodes fit on this machine: memory per node, launch and first-step time.

For each N, ``wafer train --model mlp-digits --nodes N`` runs as its own command
(so every size pays for its own Ray start, as a user's run does) with one
global batch for all sizes, and its JSON ``runtime`` block is read back:

- time from the command's start to the end of its first step (Ray start included),
- the launch time (Ray start, actor processes, wiring) and its phases,
- processes and emulated nodes per process (``runtime.nodes_per_process``),
- peak memory (PSS, below) of the driver, MemoryX and the host processes, and that
  peak per emulated node (compute and SwarmX nodes),
- CPU seconds to the end of the first step (the driver's, imports included; and those
  of the local Ray's services and actor processes), and CPU seconds per later step:
  what a busy machine inflates least,
- wall time and CPU seconds per warm step (the median over the steps after the first
  ``1 + --warmup-steps``: a run's first steps grow thread pools and open connections,
  which weighs most on the shortest steps, those of the smallest N) and how they grow
  with N against linear growth: (wall(N) / wall(N0)) / (N / N0) for the smallest N0 and the
  least-squares log-log slope over all (1 = linear). A run of a few steps swings by
  +-20% on a shared 2-core machine, the smallest N's most (its steps are the shortest),
  so ``--repeats R`` runs every N R times in alternating order and judges growth on each
  N's median, and prints the same ratio within each repeat beside it.

Memory is the peak of the processes' summed PSS (each shared page, a library's code or a
shared-memory ring, divided among the processes that map it), with the summed RSS beside
it in the JSON: a sum of RSS counts shared pages once per process, so it overstates what
the processes take from the machine together.

    python benchmarks/bench_scale.py                        # N = 1 2 4 8 16 32
    python benchmarks/bench_scale.py --full                 # and 64 96 128 192
    python benchmarks/bench_scale.py --nodes 4 --batch-size 192   # time to first step
    python benchmarks/bench_scale.py --nodes 1 4 16 --json out.json
    python benchmarks/bench_scale.py --nodes 32 192 --steps 12 --repeats 3  # growth, robustly
    python benchmarks/bench_scale.py --nodes-per-process 1  # one process per node (the old way)

This is a measurement script, not a test: it asserts nothing about time. A size
that fails (e.g. out of memory) is reported and the sweep stops there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(nodes: int, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report.json"
        command = [
            sys.executable,
            "-m",
            "emulator.cli",
            "train",
            "--model",
            "mlp-digits",
            "--nodes",
            str(nodes),
            "--steps",
            str(args.steps),
            "--batch-size",
            str(args.batch_size),
            "--json",
            str(out),
            "--quiet",
        ]
        config = Path(tmp) / "runtime.yaml"
        config.write_text(
            f"runtime: {{nodes_per_process: {args.nodes_per_process}}}\n"
            f"max_eval_samples: {max(nodes, 64)}\n"
        )
        command += ["--config", str(config)]
        env = {**os.environ, "PYTHONPATH": str(REPO), "GRPC_VERBOSITY": "NONE"}
        started = time.perf_counter()
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
        command_s = time.perf_counter() - started
        if result.returncode != 0:
            return {"nodes": nodes, "error": result.stderr.strip()[-2000:]}
        report = json.loads(out.read_text())
    runtime = report["runtime"]
    later_wall_s = [step["wall_time_s"] for step in report["steps"][1:]]
    later_cpu_s = runtime.get("cpu_s_by_later_step") or []
    return {
        "nodes": nodes,
        "num_swarmx_nodes": runtime["num_emulated_nodes"] - nodes,
        "num_processes": runtime["num_processes"],
        "nodes_per_process": runtime["nodes_per_process"],
        "first_step_since_command_s": runtime["first_step_since_process_start_s"],
        "launch_time_s": runtime["launch_time_s"],
        "launch_phases": runtime["launch_phases"],
        "peak_memory_bytes": runtime["memory"]["peak_bytes"],  # PSS
        "peak_rss_bytes": runtime["memory"]["peak_rss_bytes"],
        "memory_per_emulated_node_bytes": runtime["memory"]["per_emulated_node_bytes"],
        "wall_step_time_s": warm_median(later_wall_s, args.warmup_steps),
        "first_step_cpu_s": runtime["first_step_cpu_s"],
        "cpu_per_step_s": {"warm_median_s": warm_median(later_cpu_s, args.warmup_steps)},
        # The emulator's own figures, over every step after the first (warm-up included).
        "all_later_steps": {
            "wall_step_time_s": report["step_wall_time_s"],
            "cpu_per_step_s": runtime["cpu_per_step_s"],
        },
        "cpu_per_step_by_kind_s": runtime.get("cpu_per_step_by_kind_s"),
        "command_s": command_s,
        "final_loss": report["final_loss"],
    }


def warm_median(later_steps: list[float], warmup_steps: int) -> float:
    """The median of a run's per-step values after the first step, its first
    ``warmup_steps`` of them left out (all of them if too few remain)."""
    warm = later_steps[warmup_steps:] or later_steps
    ordered = sorted(warm)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def cpu_per_step_s(row: dict) -> float:
    """CPU seconds per step after the first, of the driver, MemoryX and the hosts together."""
    return sum(row["cpu_per_step_s"].values())


def growth(rows: list[dict], value=lambda row: row["wall_step_time_s"]) -> dict:
    """How ``value`` (wall time per step) grows with N, against linear growth (exponent 1)."""
    points = [(r["nodes"], value(r)) for r in rows]
    n0, w0 = points[0]
    over_linear = [(wall / w0) / (nodes / n0) for nodes, wall in points]
    local = [
        math.log(w2 / w1) / math.log(n2 / n1)
        for (n1, w1), (n2, w2) in zip(points, points[1:], strict=False)
    ]
    logs = [(math.log(n), math.log(w)) for n, w in points]
    slope = None
    if len(logs) > 1:
        mean_x = sum(x for x, _ in logs) / len(logs)
        mean_y = sum(y for _, y in logs) / len(logs)
        slope = sum((x - mean_x) * (y - mean_y) for x, y in logs) / sum(
            (x - mean_x) ** 2 for x, _ in logs
        )
    return {"over_linear": over_linear, "local_slopes": [None, *local], "slope": slope}


def _cpu(block: dict | None, key: str) -> str:
    return "-" if not block else f"{block[key]:.2f}"


def medians(rows: list[dict]) -> list[dict]:
    """One row per N (in the order of first appearance): the run with the median wall time
    per step among that N's repeats (the upper one of an even count), its CPU per step
    replaced by the median of the repeats' CPU per step."""
    by_size: dict[int, list[dict]] = {}
    for row in rows:
        by_size.setdefault(row["nodes"], []).append(row)
    out = []
    for runs in by_size.values():
        ordered = sorted(runs, key=lambda r: r["wall_step_time_s"])
        middle = dict(ordered[len(ordered) // 2])
        cpu = sorted(cpu_per_step_s(r) for r in runs)[len(runs) // 2]
        middle["cpu_per_step_s"] = {"median_s": cpu}
        middle["repeats"] = len(runs)
        out.append(middle)
    return out


def _over_linear_now(rows: list[dict], row: dict, value) -> str:
    """``row`` against linear growth from the smallest N's median so far ("-" if none)."""
    smallest = min(r["nodes"] for r in rows)
    base = [value(r) for r in rows if r["nodes"] == smallest]
    if row["nodes"] == smallest or not base:
        return "1.00" if row["nodes"] == smallest else "-"
    base_value = sorted(base)[len(base) // 2]
    return f"{(value(row) / base_value) / (row['nodes'] / smallest):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument(
        "--full", action="store_true", help="also N = 64 96 128 192 (after --nodes)"
    )
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument(
        "--warmup-steps",
        type=int,
        default=4,
        help="steps after the first left out of the per-step medians (the run warms up)",
    )
    parser.add_argument("--batch-size", type=int, default=384, help="divisible by every N")
    parser.add_argument("--nodes-per-process", default="auto")
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="run every N this many times, in alternating order (ascending, then descending, "
        "...); growth is judged on each N's median",
    )
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    sizes = args.nodes + (
        [n for n in (64, 96, 128, 192) if n not in args.nodes] if args.full else []
    )
    bad = [n for n in sizes if args.batch_size % n]
    if bad:
        parser.error(f"--batch-size {args.batch_size} does not split over {bad} nodes")
    if args.warmup_steps < 0:
        parser.error(f"--warmup-steps must be 0 or more, got {args.warmup_steps}")
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    sizes = sorted(set(sizes))
    rows: list[dict] = []
    header = (
        f"{'N':>4} {'SwarmX':>6} {'procs':>5} {'per':>4} {'1st step':>9} {'launch':>7} "
        f"{'peak PSS':>9} {'PSS/node':>9} {'wall/step':>10} {'vs linear':>9} "
        f"{'CPU/step':>9} {'vs linear':>9}"
    )
    started_load = os.getloadavg()
    print(
        f"load average {started_load[0]:.1f} {started_load[1]:.1f} {started_load[2]:.1f} "
        f"on {os.cpu_count()} cores, batch {args.batch_size}, {args.steps} steps "
        + (
            f"(per step: the median after the first {1 + args.warmup_steps}), "
            if args.steps >= args.warmup_steps + 2
            else "(per step: the median after the first; too few for --warmup-steps), "
        )
        + f"{args.repeats} run(s) per N"
    )
    print(header)
    failed = False
    for repeat in range(args.repeats):
        # Alternate the order, so that a drift of the machine's speed meets every N alike.
        for nodes in sizes if repeat % 2 == 0 else sizes[::-1]:
            row = run(nodes, args)
            row["load_average"] = os.getloadavg()[0]
            row["repeat"] = repeat
            rows.append(row)
            if "error" in row:
                print(f"{nodes:>4} failed: {row['error'][-300:]}")
                failed = True
                break
            done = [r for r in rows if "error" not in r]
            print(
                f"{nodes:>4} {row['num_swarmx_nodes']:>6} {row['num_processes']:>5} "
                f"{row['nodes_per_process']:>4} {row['first_step_since_command_s']:>8.1f}s "
                f"{row['launch_time_s']:>6.1f}s {row['peak_memory_bytes'] / 1024**3:>8.2f}G "
                f"{row['memory_per_emulated_node_bytes'] / 1024**2:>8.1f}M "
                f"{1000 * row['wall_step_time_s']:>8.0f}ms "
                f"{_over_linear_now(done, row, lambda r: r['wall_step_time_s']):>9} "
                f"{1000 * cpu_per_step_s(row):>7.0f}ms "
                f"{_over_linear_now(done, row, cpu_per_step_s):>9}",
                flush=True,
            )
            _write_json(args.json, rows)
        if failed:
            break
    _summary([r for r in rows if "error" not in r], args.repeats)
    _write_json(args.json, rows)


def _write_json(path: str | None, rows: list[dict]) -> None:
    """The runs so far and the growth of their per-N medians (rewritten after every run)."""
    if not path:
        return
    done = [r for r in rows if "error" not in r]
    middle = medians(done)
    result = {"load": os.getloadavg(), "rows": rows, "medians": middle}
    if middle:
        result["growth"] = growth(middle)
        result["cpu_growth"] = growth(middle, cpu_per_step_s)
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(path)  # atomic: a failure late in a sweep keeps the runs before it


def _summary(done: list[dict], repeats: int) -> None:
    load = os.getloadavg()
    print(f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} at the end")
    print(
        "launch phases, s (Ray start, processes up, components serving, wiring); CPU s to the "
        "first step (driver, Ray + actors) and per later step, warm-up included (driver, "
        "MemoryX + hosts):"
    )
    for row in done:
        phases = row["launch_phases"]
        first, per_step = row["first_step_cpu_s"], row["all_later_steps"]["cpu_per_step_s"]
        print(
            f"{row['nodes']:>4} ray {phases['ray_s']:.1f}  processes {phases['processes_up_s']:.1f}"
            f"  components {phases['components_s']:.1f}  wiring {phases['wiring_s']:.2f}"
            f"  | cpu to 1st step {_cpu(first, 'driver_s')} + {_cpu(first, 'ray_and_actors_s')}"
            f"  | cpu/step {_cpu(per_step, 'driver_s')} + {_cpu(per_step, 'actors_s')}"
            + (
                f" (MemoryX {_cpu(kinds, 'memoryx_s')}, SwarmX {_cpu(kinds, 'swarmx_s')},"
                f" nodes {_cpu(kinds, 'nodes_s')})"
                if (kinds := row.get("cpu_per_step_by_kind_s"))
                else ""
            )
        )
    middle = medians(done)
    if len(middle) < 2:
        return
    median_of = f" (medians of {repeats} runs per N)" if repeats > 1 else ""
    for what, value in (
        ("wall time per step", lambda row: row["wall_step_time_s"]),
        ("CPU time per step", cpu_per_step_s),
    ):
        grown = growth(middle, value)
        worst = max(range(len(middle)), key=lambda i: grown["over_linear"][i])
        at_most_linear = grown["over_linear"][worst] <= 1.0
        print(
            f"{what} from N={middle[0]['nodes']} to N={middle[-1]['nodes']}{median_of}: "
            f"least-squares log-log slope {grown['slope']:.2f} (1 = linear); largest "
            f"({what[:4]}(N)/{what[:4]}(N0))/(N/N0) = {grown['over_linear'][worst]:.2f} at "
            f"N={middle[worst]['nodes']}: growth is "
            + ("at most linear." if at_most_linear else "FASTER than linear there.")
        )
        if repeats > 1:
            # The same ratio within each repeat (its own runs of the smallest and largest N).
            smallest, largest = middle[0]["nodes"], middle[-1]["nodes"]
            ratios = []
            for repeat in range(repeats):
                pair = {r["nodes"]: value(r) for r in done if r["repeat"] == repeat}
                if smallest in pair and largest in pair:
                    ratios.append((pair[largest] / pair[smallest]) / (largest / smallest))
            print(
                f"  within each repeat, N={largest} against linear from N={smallest}: "
                + ", ".join(f"{r:.2f}" for r in ratios)
            )


if __name__ == "__main__":
    main()

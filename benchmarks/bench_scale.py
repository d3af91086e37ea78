"""How many emulated nodes fit on this machine: memory per node, launch and first-step time.

For each N, ``wafer train --model mlp-digits --nodes N`` runs as its own command
(so every size pays for its own Ray start, as a user's run does) with one
global batch for all sizes, and its JSON ``runtime`` block is read back:

- time from the command's start to the end of its first step (Ray start included),
- the launch time (Ray start, actor processes, wiring) and its phases,
- processes and emulated nodes per process (``runtime.nodes_per_process``),
- peak resident memory of the driver, MemoryX and the host processes, and that
  peak per emulated node (compute and SwarmX nodes),
- CPU seconds to the end of the first step (the driver's, imports included; and those
  of the local Ray's services and actor processes), and CPU seconds per later step:
  what a busy machine inflates least,
- wall time per step (median after the first) and how it grows with N against
  linear growth: (wall(N) / wall(N0)) / (N / N0) for the smallest N0, the log-log slope
  between neighbouring sizes and the least-squares slope over all (1 = linear).

Memory is the peak of the processes' summed PSS (each shared page, a library's code or a
shared-memory ring, divided among the processes that map it), with the summed RSS beside
it in the JSON: a sum of RSS counts shared pages once per process, so it overstates what
the processes take from the machine together.

    python benchmarks/bench_scale.py                        # N = 1 2 4 8 16 32
    python benchmarks/bench_scale.py --full                 # and 64 96 128 192
    python benchmarks/bench_scale.py --nodes 4 --batch-size 192   # time to first step
    python benchmarks/bench_scale.py --nodes 1 4 16 --json out.json
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
        "wall_step_time_s": report["step_wall_time_s"],
        "first_step_cpu_s": runtime["first_step_cpu_s"],
        "cpu_per_step_s": runtime["cpu_per_step_s"],
        "cpu_per_step_by_kind_s": runtime.get("cpu_per_step_by_kind_s"),
        "command_s": command_s,
        "final_loss": report["final_loss"],
    }


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument(
        "--full", action="store_true", help="also N = 64 96 128 192 (after --nodes)"
    )
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=384, help="divisible by every N")
    parser.add_argument("--nodes-per-process", default="auto")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    sizes = args.nodes + (
        [n for n in (64, 96, 128, 192) if n not in args.nodes] if args.full else []
    )
    bad = [n for n in sizes if args.batch_size % n]
    if bad:
        parser.error(f"--batch-size {args.batch_size} does not split over {bad} nodes")
    rows = []
    header = (
        f"{'N':>4} {'SwarmX':>6} {'procs':>5} {'per':>4} {'1st step':>9} {'launch':>7} "
        f"{'peak PSS':>9} {'PSS/node':>9} {'wall/step':>10} {'vs linear':>9} {'slope':>6} "
        f"{'CPU/step':>9} {'vs linear':>9}"
    )
    started_load = os.getloadavg()
    print(
        f"load average {started_load[0]:.1f} {started_load[1]:.1f} {started_load[2]:.1f} "
        f"on {os.cpu_count()} cores, batch {args.batch_size}, {args.steps} steps"
    )
    print(header)
    for nodes in sizes:
        row = run(nodes, args)
        row["load_average"] = os.getloadavg()[0]
        rows.append(row)
        if "error" in row:
            print(f"{nodes:>4} failed: {row['error'][-300:]}")
            break
        grown = growth(rows)
        slope = grown["local_slopes"][-1]
        cpu_grown = growth(rows, cpu_per_step_s)
        print(
            f"{nodes:>4} {row['num_swarmx_nodes']:>6} {row['num_processes']:>5} "
            f"{row['nodes_per_process']:>4} {row['first_step_since_command_s']:>8.1f}s "
            f"{row['launch_time_s']:>6.1f}s {row['peak_memory_bytes'] / 1024**3:>8.2f}G "
            f"{row['memory_per_emulated_node_bytes'] / 1024**2:>8.1f}M "
            f"{1000 * row['wall_step_time_s']:>8.0f}ms {grown['over_linear'][-1]:>9.2f} "
            f"{'-' if slope is None else f'{slope:.2f}':>6} "
            f"{1000 * cpu_per_step_s(row):>7.0f}ms {cpu_grown['over_linear'][-1]:>9.2f}",
            flush=True,
        )
        if args.json:
            Path(args.json).write_text(
                json.dumps(
                    {
                        "load": os.getloadavg(),
                        "rows": rows,
                        "growth": grown,
                        "cpu_growth": cpu_grown,
                    }
                )
            )
    done = [r for r in rows if "error" not in r]
    load = os.getloadavg()
    print(f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} at the end")
    print(
        "launch phases, s (Ray start, processes up, components serving, wiring); CPU s to the "
        "first step (driver, Ray + actors) and per later step (driver, MemoryX + hosts):"
    )
    for row in done:
        phases = row["launch_phases"]
        first, per_step = row["first_step_cpu_s"], row["cpu_per_step_s"]
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
    if len(done) > 1:
        for what, value in (
            ("wall time per step", lambda row: row["wall_step_time_s"]),
            ("CPU time per step", cpu_per_step_s),
        ):
            grown = growth(done, value)
            worst = max(range(len(done)), key=lambda i: grown["over_linear"][i])
            at_most_linear = grown["over_linear"][worst] <= 1.0
            print(
                f"{what} from N={done[0]['nodes']} to N={done[-1]['nodes']}: "
                f"least-squares log-log slope {grown['slope']:.2f} (1 = linear); largest "
                f"({what[:4]}(N)/{what[:4]}(N0))/(N/N0) = {grown['over_linear'][worst]:.2f} at "
                f"N={done[worst]['nodes']}: growth is "
                + ("at most linear." if at_most_linear else "FASTER than linear there.")
            )


if __name__ == "__main__":
    main()

"""How many emulated nodes fit on this machine: memory per node, launch and first-step time.

For each N, ``wafer train --model mlp-digits --nodes N`` runs as its own command
(so every size pays for its own Ray start, as a user's run does) with one
global batch for all sizes, and its JSON ``runtime`` block is read back:

- time from the command's start to the end of its first step (Ray start included),
- the launch time (Ray start, actor processes, wiring) and its phases,
- processes and emulated nodes per process (``runtime.nodes_per_process``),
- peak resident memory of the driver, MemoryX and the host processes, and that
  peak per emulated node (compute and SwarmX nodes),
- wall time per step (median after the first) and its ratio to the 1-node run's,
  against the ratio N (linear growth).

RSS sums count shared library pages once per process, so they overstate what
the processes take from the machine together.

    python benchmarks/bench_scale.py                        # N = 1 2 4 8 16 32 64 128 192
    python benchmarks/bench_scale.py --nodes 1 4 16 --json out.json
    python benchmarks/bench_scale.py --nodes-per-process 1  # one process per node (the old way)

This is a measurement script, not a test: it asserts nothing about time. A size
that fails (e.g. out of memory) is reported and the sweep stops there.
"""

from __future__ import annotations

import argparse
import json
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
        "peak_memory_bytes": runtime["memory"]["peak_bytes"],
        "memory_per_emulated_node_bytes": runtime["memory"]["per_emulated_node_bytes"],
        "wall_step_time_s": report["step_wall_time_s"],
        "command_s": command_s,
        "final_loss": report["final_loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 192])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=384, help="divisible by every N")
    parser.add_argument("--nodes-per-process", default="auto")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    rows = []
    header = (
        f"{'N':>4} {'SwarmX':>6} {'procs':>5} {'per':>4} {'1st step':>9} {'launch':>7} "
        f"{'peak RSS':>9} {'RSS/node':>9} {'wall/step':>10} {'x of N=1':>8}"
    )
    print(f"load average {os.getloadavg()[0]:.1f}, batch {args.batch_size}, {args.steps} steps")
    print(header)
    for nodes in args.nodes:
        row = run(nodes, args)
        rows.append(row)
        if "error" in row:
            print(f"{nodes:>4} failed: {row['error'][-300:]}")
            break
        growth = row["wall_step_time_s"] / rows[0]["wall_step_time_s"]
        print(
            f"{nodes:>4} {row['num_swarmx_nodes']:>6} {row['num_processes']:>5} "
            f"{row['nodes_per_process']:>4} {row['first_step_since_command_s']:>8.1f}s "
            f"{row['launch_time_s']:>6.1f}s {row['peak_memory_bytes'] / 1024**3:>8.2f}G "
            f"{row['memory_per_emulated_node_bytes'] / 1024**2:>8.1f}M "
            f"{1000 * row['wall_step_time_s']:>8.0f}ms {growth:>8.2f}",
            flush=True,
        )
        if args.json:
            Path(args.json).write_text(json.dumps({"load": os.getloadavg(), "rows": rows}))
    print(f"load average {os.getloadavg()[0]:.1f}")
    print("launch phases, s (Ray start, processes up, components serving, wiring):")
    for row in rows:
        if "error" not in row:
            phases = row["launch_phases"]
            print(
                f"{row['nodes']:>4} ray {phases['ray_s']:.1f}  processes {phases['processes_up_s']:.1f}"
                f"  components {phases['components_s']:.1f}  wiring {phases['wiring_s']:.2f}"
            )


if __name__ == "__main__":
    main()

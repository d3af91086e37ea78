"""How long the analytic cost model takes (a benchmark, not a test).

    python benchmarks/bench_simulate.py

Targets (issue 3): one 192-node GPT-3 175B prediction under 0.1 s, a
20-point sweep (1..192 nodes) under 1 s. Times exclude imports and building
the workload; each figure is the best of several repeats.
"""

from __future__ import annotations

import time

from core.presets import load_hardware
from emulator.cost.gpt import gpt_workload
from emulator.cost.stats import predict, sweep

PREDICTION_TARGET_S = 0.1
SWEEP_TARGET_S = 1.0
NUM_REPEATS = 5
#: 20 cluster sizes from 1 to the CS-2 maximum, denser where scaling bends.
SWEEP_NODE_COUNTS = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 40, 48, 64, 80, 96, 112, 128, 144, 160, 192]


def best_of(fn, repeats: int = NUM_REPEATS) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    hardware = load_hardware("cs2")
    workload = gpt_workload("gpt3-175b")
    node_counts = SWEEP_NODE_COUNTS
    prediction_s = best_of(lambda: predict(workload, hardware, 192))
    sweep_s = best_of(lambda: sweep(workload, hardware, node_counts))
    print(
        f"gpt3-175b on cs2, batch {workload.samples_per_step} x {workload.tokens_per_sample} tokens"
    )
    print(
        f"one 192-node prediction: {prediction_s * 1e3:8.2f} ms  "
        f"(target < {PREDICTION_TARGET_S * 1e3:.0f} ms: {'ok' if prediction_s < PREDICTION_TARGET_S else 'MISSED'})"
    )
    print(
        f"{len(node_counts)}-point sweep 1..192:  {sweep_s * 1e3:8.2f} ms  "
        f"(target < {SWEEP_TARGET_S * 1e3:.0f} ms: {'ok' if sweep_s < SWEEP_TARGET_S else 'MISSED'})"
    )
    print(f"sweep points: {node_counts}")


if __name__ == "__main__":
    main()

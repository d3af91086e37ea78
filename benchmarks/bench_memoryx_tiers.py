"""MemoryX with a disk tier: tiered step time / in-RAM step time, and a model beyond RAM.

**ratio** (default): the same GPT trains with the whole MemoryX state in RAM and
with ``memoryx.ram_budget_bytes`` set to a fraction of that state (the rest on
disk in ``--spill-dir``). Runs are interleaved RAM, tiered, RAM, tiered, ...
and each tiered run is compared with the RAM runs just before and after it.
Step time is the median of ``report.steps[i].wall_time_s``, the first
(warm-up) step of every run left out. The losses of both must be bitwise
equal; the script says if they are not.

**--big**: a GPT whose MemoryX state (fp32 weights plus AdamW moments, 12 bytes
per parameter) is at least ``--state-over-ram`` (1.5) times the machine's RAM
trains 2 steps with a RAM budget of ``--budget-fraction`` of RAM. Reported: the
MemoryX server processes' peak RSS (``ru_maxrss``) against 50% of RAM, and
their peak tensor bytes against the budget. ``--ram-bytes`` pretends the
machine has that much RAM, to run the same case scaled down.

    python benchmarks/bench_memoryx_tiers.py                        # gpt-10m, budget 1/4 of state
    python benchmarks/bench_memoryx_tiers.py --quick                # gpt-tiny x 8 blocks
    python benchmarks/bench_memoryx_tiers.py --big                  # state >= 1.5x this RAM
    python benchmarks/bench_memoryx_tiers.py --big --ram-bytes 1e9  # the same, scaled down

The driver builds the GPT on the meta device and makes each layer's weights
as it streams them (bitwise those of the whole build); a MemoryX restart gets
them made again (no copy on disk), and the final weights are not read back
(``train(final_weights=False)``). So every process holds at most
a few layers. Reported besides: every process's peak RSS (``VmHWM``: driver,
MemoryX, the SwarmX and node hosts), the least MemAvailable seen, and the peak
disk bytes under ``--spill-dir`` (the spill files, with one step's snapshots:
the weights of version ``k``, and the run directory). Safety on a shared machine: a watchdog stops the run (the
cluster killed, Ray shut down, the spill directory removed, a message) if
MemAvailable falls below ``--min-available-gb`` (2.5) or the spill disk's free
space below ``--min-free-disk-gb`` (3).

This is a measurement script, not a test: it asserts nothing about time.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import ray
import torch

from benchmarks.host_watch import Watchdog, fixed_mmap_threshold
from core.atomic import write_json_atomic
from emulator.config import ClusterConfig, load_config
from emulator.runtime import start_local_ray
from emulator.train import train

STATE_BYTES_PER_PARAM = 12  # fp32 weight + AdamW's two fp32 moments
SPILL_ROOTS: list[str] = []  # the spill roots this run made, removed at the end


def _spill_root(parent: str | None, prefix: str) -> str:
    path = tempfile.mkdtemp(dir=parent, prefix=prefix)
    SPILL_ROOTS.append(path)
    return path


def _median_after_warmup(runs: list[list[float]]) -> float:
    return statistics.median(t for run in runs for t in run[1:])


def run(config: ClusterConfig, **kwargs) -> dict:
    report = train(config, progress=False, **kwargs)
    block = report.to_json()["memoryx"]
    return {
        "step_times_s": [s.wall_time_s for s in report.steps],
        "losses": [s.loss for s in report.steps],
        "num_params": report.num_params,
        "num_layers": report.num_layers,
        "wall_time_s": report.wall_time_s,
        "memoryx": block,
    }


def measure_ratio(args) -> dict:
    model = {"model.name": "gpt-tiny", "model.num_layers": 8} if args.quick else {}
    model = model or {"model.name": "gpt-10m", "model.seq_len": args.seq_len}
    base = {
        **model,
        "num_nodes": args.nodes,
        "batch_size": args.batch,
        "num_steps": args.steps,
        "seed": args.seed,
        "max_eval_samples": args.nodes,
    }
    probe = run(load_config(overrides={**base, "num_steps": 1}))
    state_bytes = probe["memoryx"]["state_bytes"]
    budget = int(state_bytes * args.budget_fraction)
    spill = _spill_root(args.spill_dir, "bench-tiers-")
    tiered_config = {**base, "memoryx.ram_budget_bytes": budget, "memoryx.spill_dir": spill}
    in_ram, tiered = [], []
    for round_index in range(args.rounds):
        print(f"round {round_index + 1}/{args.rounds}: in RAM ...", flush=True)
        in_ram.append(run(load_config(overrides=base)))
        print(f"round {round_index + 1}/{args.rounds}: tiered ...", flush=True)
        tiered.append(run(load_config(overrides=tiered_config)))
    print("last: in RAM ...", flush=True)
    in_ram.append(run(load_config(overrides=base)))
    ratios, min_ratios = [], []
    for index, run_tiered in enumerate(tiered):
        neighbours = in_ram[index : index + 2]
        ram_s = _median_after_warmup([r["step_times_s"] for r in neighbours])
        tiered_s = _median_after_warmup([run_tiered["step_times_s"]])
        ratios.append(tiered_s / ram_s)
        # Other jobs on a shared machine only ever add time: fastest over fastest.
        ram_min = min(t for r in neighbours for t in r["step_times_s"][1:])
        min_ratios.append(min(run_tiered["step_times_s"][1:]) / ram_min)
    bitwise = all(t["losses"] == in_ram[0]["losses"] for t in tiered)
    last = tiered[-1]["memoryx"]
    return {
        "model": base["model.name"],
        "params": probe["num_params"],
        "layers": probe["num_layers"],
        "state_bytes": state_bytes,
        "ram_budget_bytes": budget,
        "ram_ms": [1e3 * _median_after_warmup([r["step_times_s"]]) for r in in_ram],
        "tiered_ms": [1e3 * _median_after_warmup([r["step_times_s"]]) for r in tiered],
        "ratios": ratios,
        "ratio": statistics.median(ratios),
        "min_ratios": min_ratios,
        "ratio_of_min": statistics.median(min_ratios),
        "store_only": store_only_ratio(tiered_config, budget),
        "losses_bitwise_equal": bitwise,
        "tiered_peak_resident_bytes": last["peak_resident_bytes"],
        "tiered_disk_read_bytes_per_step": last["disk_read_bytes_per_step"],
        "tiered_disk_written_bytes_per_step": last["disk_written_bytes_per_step"],
        "runs": {"in_ram": in_ram, "tiered": tiered},
    }


def store_only_ratio(overrides: dict, budget: int, num_steps: int = 6) -> dict:
    """MemoryX alone, in this process: the coordinator's access pattern on both stores.

    Forward 0..L-1 then backward L-1..0 with an update per layer and a commit,
    the same layers and gradients for both; no gRPC, no nodes, so much less
    noise than the whole step. Median step time, first step left out.
    """
    from emulator.prepare import prepare_layers
    from memoryx.store import ParameterStore
    from memoryx.tiers import TieredStore

    config = load_config(overrides={k: v for k, v in overrides.items() if "memoryx" not in k})
    layers, _ = prepare_layers(config)
    tensors = [{n: p.detach() for n, p in layer.named_parameters()} for layer in layers]
    optimizer = config.optimizer.build()
    ram = ParameterStore(tensors, optimizer)

    def tiered_store(background_writes: bool) -> TieredStore:
        store = TieredStore(
            optimizer,
            spill_dir=tempfile.mkdtemp(dir=overrides["memoryx.spill_dir"]),
            ram_budget_bytes=budget,
            background_writes=background_writes,
        )
        for layer in tensors:
            store.add_layer(layer)
        return store.finish()

    tiered = tiered_store(True)
    # The same, writing updated layers on the updating thread (as before issue 15's writer).
    tiered_sync = tiered_store(False)
    gen = torch.Generator().manual_seed(0)
    grads = [
        {n: torch.randn(s, generator=gen) for n, s in ram.layout(i)} for i in range(len(tensors))
    ]

    # CPU seconds of the updating thread in apply_gradients: the step's critical path,
    # and much less disturbed by other jobs on the host than wall time.
    apply_cpu: dict[int, list[float]] = {}

    def step(store, k: int) -> float:
        started = time.perf_counter()
        for i in range(len(tensors)):
            store.weights(i, k)
        cpu = 0.0
        for i in reversed(range(len(tensors))):
            store.weights(i, k)
            before = time.thread_time()
            store.apply_gradients(i, k, grads[i])
            cpu += time.thread_time() - before
        store.commit(k)
        apply_cpu.setdefault(id(store), []).append(cpu)
        return time.perf_counter() - started

    times = {"in_ram": [], "tiered": [], "tiered_sync": []}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a MemoryX actor; 2 threads on a loaded host is 100x slower
    try:
        for k in range(num_steps):  # interleaved step by step
            times["in_ram"].append(step(ram, k))
            times["tiered"].append(step(tiered, k))
            times["tiered_sync"].append(step(tiered_sync, k))
    finally:
        torch.set_num_threads(threads)
        tiered.close()
        tiered_sync.close()
    ram_s = statistics.median(times["in_ram"][1:])
    tiered_s = statistics.median(times["tiered"][1:])
    sync_s = statistics.median(times["tiered_sync"][1:])

    def cpu_ms(store) -> float:
        return 1e3 * statistics.median(apply_cpu[id(store)][1:])

    return {
        "in_ram_ms": 1e3 * ram_s,
        "tiered_ms": 1e3 * tiered_s,
        "ratio": tiered_s / ram_s,
        "tiered_sync_writes_ms": 1e3 * sync_s,
        "sync_writes_ratio": sync_s / ram_s,
        "apply_cpu_ms": {
            "in_ram": cpu_ms(ram),
            "tiered": cpu_ms(tiered),
            "tiered_sync_writes": cpu_ms(tiered_sync),
        },
    }


def big_gpt_shape(target_params: float, *, seq_len: int, vocab_size: int) -> dict:
    """GPT overrides of about ``target_params`` parameters (12 d^2 per block), layers ~ d / 64."""
    # 12 d^2 per block and d / 64 blocks: d^3 * 12 / 64 parameters.
    d_model = 64 * max(1, round((target_params * 64 / 12) ** (1 / 3) / 64))
    num_layers = max(1, math.ceil(target_params / (12 * d_model * d_model)))
    return {
        "model.name": "gpt-10m",
        "model.d_model": d_model,
        "model.num_heads": max(1, d_model // 64),
        "model.d_ff": 4 * d_model,
        "model.num_layers": num_layers,
        "model.seq_len": seq_len,
        "model.vocab_size": vocab_size,
    }


def measure_big(args) -> dict:
    ram = (
        int(args.ram_bytes)
        if args.ram_bytes
        else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    )
    target_params = args.state_over_ram * ram / STATE_BYTES_PER_PARAM
    budget = int(args.budget_fraction * ram)
    spill = _spill_root(args.spill_dir, "bench-tiers-big-")
    overrides = {
        **big_gpt_shape(target_params, seq_len=args.seq_len, vocab_size=128),
        "num_nodes": 1,
        "batch_size": 1,
        "num_steps": 2,
        "seed": args.seed,
        "max_eval_samples": 1,
        "memoryx.ram_budget_bytes": budget,
        "memoryx.spill_dir": spill,
        # The run directory lies under the spill root: the peak disk counts it too.
        "runtime.run_dir": os.path.join(spill, "run"),
    }
    print(f"big GPT: {json.dumps(overrides)}", flush=True)
    watchdog = Watchdog(spill, args.min_available_gb * 1e9, args.min_free_disk_gb * 1e9)
    try:
        with watchdog:
            # The final weights are not read back: MemoryX holds them, the driver need not.
            result = run(
                load_config(overrides=overrides),
                on_launch=watchdog.on_launch,
                final_weights=False,
            )
    except (KeyboardInterrupt, Exception) as exc:  # RunStopped, or RunFailed once killed
        if watchdog.tripped is None:
            raise
        raise SystemExit(
            f"bench_memoryx_tiers --big stopped: {watchdog.tripped}. The cluster was stopped "
            f"and {spill} is removed. Run it when the machine has more memory free, or scale "
            "it down with --ram-bytes."
        ) from exc
    block = result["memoryx"]
    peaks = watchdog.peak_rss()
    return {
        "ram_bytes": ram,
        "pretended_ram": bool(args.ram_bytes),
        "params": result["num_params"],
        "layers": result["num_layers"],
        "state_bytes": block["state_bytes"],
        "state_over_ram": block["state_bytes"] / ram,
        "ram_budget_bytes": budget,
        "peak_resident_bytes": block["peak_resident_bytes"],
        "memoryx_peak_rss_bytes": block["process_peak_rss_bytes"],
        "memoryx_peak_rss_over_ram": block["process_peak_rss_bytes"] / ram,
        "peak_rss_bytes": peaks,
        "least_mem_available_bytes": watchdog.least_available_bytes,
        "peak_disk_bytes": watchdog.peak_disk_bytes,
        "least_free_disk_bytes": watchdog.least_free_disk_bytes,
        "disk_read_bytes_per_step": block["disk_read_bytes_per_step"],
        "disk_written_bytes_per_step": block["disk_written_bytes_per_step"],
        "step_times_s": result["step_times_s"],
        "losses": result["losses"],
        "wall_time_s": result["wall_time_s"],
        "overrides": overrides,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="gpt-tiny with 8 blocks")
    parser.add_argument("--big", action="store_true", help="a GPT whose state exceeds RAM")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--batch", type=int, default=4, help="global batch, sequences")
    parser.add_argument("--steps", type=int, default=4, help="steps per run (ratio)")
    parser.add_argument("--rounds", type=int, default=2, help="tiered runs (ratio)")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per sequence")
    parser.add_argument(
        "--budget-fraction",
        type=float,
        default=None,
        help="RAM budget: of the state (ratio, default 0.25) or of RAM (--big, default 0.2)",
    )
    parser.add_argument("--ram-bytes", type=float, default=None, help="--big: pretend RAM")
    parser.add_argument("--state-over-ram", type=float, default=1.5, help="--big: state / RAM")
    parser.add_argument("--spill-dir", default=None, help="disk tier root (default: temp dir)")
    parser.add_argument(
        "--min-available-gb", type=float, default=2.5, help="--big: stop below this MemAvailable"
    )
    parser.add_argument(
        "--min-free-disk-gb", type=float, default=3.0, help="--big: stop below this free disk"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.budget_fraction is None:
        args.budget_fraction = 0.2 if args.big else 0.25

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if args.big:
        fixed_mmap_threshold()
    started = time.perf_counter()
    start_local_ray(logging_level=logging.WARNING)  # a fresh instance, on loopback only
    try:
        body = measure_big(args) if args.big else measure_ratio(args)
    finally:
        ray.shutdown()
        for path in SPILL_ROOTS:
            shutil.rmtree(path, ignore_errors=True)
    result = {
        "benchmark": "memoryx_tiers_big" if args.big else "memoryx_tiers_ratio",
        "machine": {
            "cpus": os.cpu_count(),
            "load_avg_1m": os.getloadavg()[0],
            "python": platform.python_version(),
            "torch": torch.__version__,
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
        "total_s": time.perf_counter() - started,
        **body,
    }
    print_result(result)
    if args.json is not None:
        write_json_atomic(args.json, result)
        print(f"wrote {args.json}")
    return result


def print_result(result: dict) -> None:
    machine = result["machine"]
    print(f"\n{machine['cpus']} CPUs, load {machine['load_avg_1m']:.1f} at the end")
    if result["benchmark"] == "memoryx_tiers_ratio":
        print(
            f"{result['model']}: {result['params']:,} params, {result['layers']} layers, "
            f"state {result['state_bytes'] / 1e6:.1f} MB, RAM budget "
            f"{result['ram_budget_bytes'] / 1e6:.1f} MB"
        )
        print(f"in RAM ms/step : {', '.join(f'{x:.0f}' for x in result['ram_ms'])}")
        print(f"tiered ms/step : {', '.join(f'{x:.0f}' for x in result['tiered_ms'])}")
        print(
            f"tiered / in RAM: {result['ratio']:.2f} (median of {len(result['ratios'])}: "
            f"{', '.join(f'{r:.2f}' for r in result['ratios'])}); losses bitwise equal: "
            f"{result['losses_bitwise_equal']}"
        )
        print(
            f"fastest step over fastest step: {result['ratio_of_min']:.2f} "
            f"({', '.join(f'{r:.2f}' for r in result['min_ratios'])})"
        )
        store = result["store_only"]
        print(
            f"MemoryX alone (in process, no gRPC): in RAM {store['in_ram_ms']:.1f} ms/step, "
            f"tiered {store['tiered_ms']:.1f} ms/step, ratio {store['ratio']:.2f}; with "
            f"write-back on the updating thread {store['tiered_sync_writes_ms']:.1f} ms/step, "
            f"ratio {store['sync_writes_ratio']:.2f}"
        )
        cpu = store["apply_cpu_ms"]
        print(
            f"  updating thread's CPU in apply_gradients per step: in RAM {cpu['in_ram']:.1f} "
            f"ms, tiered {cpu['tiered']:.1f} ms, write-back on that thread "
            f"{cpu['tiered_sync_writes']:.1f} ms"
        )
        print(
            f"tiered: peak resident {result['tiered_peak_resident_bytes'] / 1e6:.1f} MB, disk "
            f"read {result['tiered_disk_read_bytes_per_step'] / 1e6:.1f} MB and written "
            f"{result['tiered_disk_written_bytes_per_step'] / 1e6:.1f} MB per step"
        )
        return
    pretend = " (pretended)" if result["pretended_ram"] else ""
    print(
        f"RAM {result['ram_bytes'] / 1e9:.2f} GB{pretend}; GPT {result['params']:,} params, "
        f"{result['layers']} layers; state {result['state_bytes'] / 1e9:.2f} GB = "
        f"{result['state_over_ram']:.2f} x RAM; budget {result['ram_budget_bytes'] / 1e9:.2f} GB"
    )
    print(
        f"MemoryX peak RSS {result['memoryx_peak_rss_bytes'] / 1e9:.2f} GB = "
        f"{100 * result['memoryx_peak_rss_over_ram']:.0f}% of RAM (target <= 50%); peak tensor "
        f"bytes {result['peak_resident_bytes'] / 1e9:.2f} GB"
    )
    peaks = result["peak_rss_bytes"]
    print(
        f"peak RSS (VmHWM): driver {peaks['driver'] / 1e9:.2f} GB, MemoryX "
        f"{peaks['memoryx'] / 1e9:.2f} GB, SwarmX/node hosts "
        f"{', '.join(f'{b / 1e9:.2f}' for b in peaks['hosts'])} GB; least MemAvailable "
        f"{result['least_mem_available_bytes'] / 1e9:.2f} GB; peak disk under the spill root "
        f"{result['peak_disk_bytes'] / 1e9:.2f} GB"
    )
    print(
        f"steps {', '.join(f'{t:.1f}' for t in result['step_times_s'])} s; disk read "
        f"{result['disk_read_bytes_per_step'] / 1e9:.2f} GB, written "
        f"{result['disk_written_bytes_per_step'] / 1e9:.2f} GB per step; losses {result['losses']}"
    )


if __name__ == "__main__":
    main()

"""Do two trees give the same numbers? Seeded ``wafer`` runs, compared bit for bit.

A refactor that must not change results (e.g. modes as strategy objects) records the
reports of a fixed set of short, seeded runs before and after, and compares every number
in them exactly; only the host's own measurements (wall clock, the nodes' measured compute
seconds, MemoryX's process peak RSS) may differ.

    # in a checkout of the old tree (e.g. `git archive main | tar -x -C /tmp/old`):
    PYTHONPATH=/tmp/old python benchmarks/same_results.py run /tmp/ref
    # in the new tree:
    PYTHONPATH=. python benchmarks/same_results.py run /tmp/new
    python benchmarks/same_results.py diff /tmp/ref /tmp/new

``run`` takes ~15 minutes at load 10 (26 runs; ``--only NAME,...`` for a few). ``diff`` exits 1
and lists the paths of the numbers that differ, if any do.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

#: Backend sections the CLI has no flags for: written next to the reports.
CONFIGS = {
    "cs2_bf16": "backend: {kind: cs2, precision: bf16}\n",
    "pcm_ws": "backend: {kind: pcm, mode: weight-stationary, weight_stationary: {num_chips: 4}}\n",
    "pcm_ws_analog": (
        "backend: {kind: pcm, mode: weight-stationary, weight_stationary: {num_chips: 4}, "
        "training: {backward: analog}}\n"
    ),
    "pcm_stream_analog": (
        "backend: {kind: pcm, mode: streaming, training: {backward: analog, forward: analog}}\n"
    ),
    "pcm_ideal_fwd": "backend: {kind: pcm, training: {forward: ideal}}\n",
    "photonic_dfa_noise": "backend: {kind: photonic, training: dfa, dfa: {noise: true}}\n",
}

_TRAIN = "train --model mlp-digits --nodes 2 --steps 20 --quiet"
_SIM = "simulate --nodes 1,2,4"


def runs(configs: Path) -> dict[str, str]:
    """Report name -> ``wafer`` arguments (without ``--json``)."""
    c = {name: f"--config {configs / name}.yaml" for name in CONFIGS}
    table = {
        "train_cs2": _TRAIN,
        "train_cs2_bf16": f"{_TRAIN} {c['cs2_bf16']}",
        "train_pcm": f"{_TRAIN} --backend pcm",
        "train_pcm_ws": f"{_TRAIN} {c['pcm_ws']}",
        "train_pcm_ws_analog": f"{_TRAIN} {c['pcm_ws_analog']}",
        "train_pcm_stream_analog": f"{_TRAIN} {c['pcm_stream_analog']}",
        "train_pcm_ideal_fwd": f"{_TRAIN} {c['pcm_ideal_fwd']}",
        "train_photonic_ffm": f"{_TRAIN} --backend photonic --training ffm",
        "train_photonic_dfa": f"{_TRAIN} --backend photonic --training dfa",
        "train_photonic_dfa_noise": f"{_TRAIN} {c['photonic_dfa_noise']}",
        "train_photonic_backprop": f"{_TRAIN} --backend photonic --training backprop",
        "train_taichi_ffm": (
            "train --model taichi-digits --nodes 2 --steps 5 --quiet --backend photonic "
            "--training ffm"
        ),
        "sim_cs2": f"{_SIM} --model mlp-digits",
        "sim_gpt_cs2": f"{_SIM} --model gpt3-125m",
        "sim_pcm": f"{_SIM} --model mlp-digits --backend pcm",
        "sim_pcm_ws_analog": f"{_SIM} --model mlp-digits --backend pcm {c['pcm_ws_analog']}",
        "sim_pcm_stream_analog": (
            f"{_SIM} --model mlp-digits --backend pcm {c['pcm_stream_analog']}"
        ),
        "sim_taichi_ffm": f"{_SIM} --model taichi-digits --backend photonic --training ffm",
        "sim_taichi_backprop": (
            f"{_SIM} --model taichi-digits --backend photonic --training backprop"
        ),
        "compare": (
            "compare --model mlp-digits --nodes 2 --steps 10 --quiet "
            "--backends cs2,pcm,photonic,photonic:ffm,photonic:dfa"
        ),
        "eval": "eval --model mlp-digits --nodes 2 --steps 10 --drift-times 1,86400 --quiet",
    }
    for training in ("backprop", "dfa", "ffm"):
        table[f"sim_photonic_{training}"] = (
            f"{_SIM} --model mlp-digits --backend photonic --training {training}"
        )
    return table


def run(out: Path, only: set[str] | None) -> int:
    out.mkdir(parents=True, exist_ok=True)
    configs = out / "configs"
    configs.mkdir(exist_ok=True)
    for name, text in CONFIGS.items():
        (configs / f"{name}.yaml").write_text(text)
    failed = 0
    for name, args in runs(configs).items():
        if only and name not in only:
            continue
        command = ["wafer", *args.split(), "--json", str(out / f"{name}.json")]
        print(f"== {name}: {' '.join(command)}", flush=True)
        with open(out / f"{name}.log", "w") as log:
            if subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode:
                print(f"FAILED {name} (see {out / name}.log)", flush=True)
                failed += 1
    return 1 if failed else 0


def _measured(key: str) -> bool:
    """A figure measured on this machine, not computed: it differs from run to run (two
    runs of one tree differ in MemoryX's process peak RSS by a few MB, too)."""
    return (
        "wall" in key
        # The report's launch timings, memory (RSS) and Ray node ids of this run's processes.
        or key == "runtime"
        or key in ("node_compute_seconds", "process_peak_rss_bytes")
        or (key.endswith("_process_peak_rss_bytes"))
    )


def differences(ref, new, path: str = "") -> list[str]:
    """Paths where two JSON documents differ; the host's timings are skipped."""
    if isinstance(ref, dict) and isinstance(new, dict):
        found = [f"{path}.{k}: only in one" for k in sorted(set(ref) ^ set(new))]
        for key in sorted(set(ref) & set(new)):
            if not _measured(key):
                found += differences(ref[key], new[key], f"{path}.{key}")
        return found
    if isinstance(ref, list) and isinstance(new, list):
        if len(ref) != len(new):
            return [f"{path}: {len(ref)} vs {len(new)} items"]
        return [
            d
            for i, (a, b) in enumerate(zip(ref, new, strict=True))
            for d in differences(a, b, f"{path}[{i}]")
        ]
    both_nan = (
        isinstance(ref, float) and isinstance(new, float) and math.isnan(ref) and math.isnan(new)
    )
    if ref != new and not both_nan:
        return [f"{path}: {ref!r} vs {new!r}"]
    return []


def diff(ref_dir: Path, new_dir: Path) -> int:
    names = sorted(p.stem for p in ref_dir.glob("*.json"))
    if not names:
        print(f"no reports in {ref_dir}")
        return 1
    bad = 0
    for name in names:
        new_path = new_dir / f"{name}.json"
        if not new_path.is_file():
            print(f"{name:28s} MISSING in {new_dir}")
            bad += 1
            continue
        found = differences(
            json.loads((ref_dir / f"{name}.json").read_text()), json.loads(new_path.read_text())
        )
        print(f"{name:28s} {'identical' if not found else f'{len(found)} numbers differ'}")
        for line in found[:20]:
            print(f"    {line}")
        bad += bool(found)
    print(f"{len(names) - bad} of {len(names)} reports identical (host timings skipped)")
    return 1 if bad else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="write the reports of the seeded runs to OUT")
    p_run.add_argument("out", type=Path)
    p_run.add_argument("--only", help="comma-separated report names")
    p_diff = sub.add_parser("diff", help="compare the reports of two runs")
    p_diff.add_argument("ref", type=Path)
    p_diff.add_argument("new", type=Path)
    args = parser.parse_args()
    if args.command == "run":
        return run(args.out, set(args.only.split(",")) if args.only else None)
    return diff(args.ref, args.new)


if __name__ == "__main__":
    sys.exit(main())

"""Fault recovery: K random faults over one run, against an undisturbed run of the same seed.

Each fault hits one component (a compute node, a SwarmX node or MemoryX), by
SIGKILL of its process, ``ray.kill`` of its handle or SIGSTOP, just before a
random layer pass (forward stream, backward stream and reduce, MemoryX update)
of its own step, through the coordinator's ``fault`` seam. The faulted run must
end with final weights, every step's loss and the eval bitwise equal to the
undisturbed run's.

Reported:
  - recovered/total: faults after which the run replaced the component and went on;
  - bit-identical: final weights, losses and eval equal to the undisturbed run;
  - recovery time (median, max): from the fault to the end of the interrupted
    step on the repaired cluster (for MemoryX: to the end of the first step run
    again from its checkpoint);
  - liveness overhead: the undisturbed run's median step time with health
    watching (``runtime.health_interval_s`` 1 s) over the same run with watching
    effectively off, runs interleaved (ratio, same machine, same moment).

    python benchmarks/bench_faults.py                 # K = 50
    python benchmarks/bench_faults.py --faults 6 --json out.json
    python benchmarks/bench_faults.py --faults 2 --steps 4 --overhead-repeats 0   # CI's run

CI runs the last one (tests/emulator/test_bench_faults.py) and checks that every
fault was recovered bit-identically; ``--overhead-repeats 0`` skips the liveness runs.

This is a measurement script, not a test: it asserts nothing about time.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import statistics
import tempfile
import time

import ray
import torch

from emulator.config import load_config
from emulator.runtime import start_local_ray
from emulator.train import train

KINDS = ("SIGKILL", "ray.kill", "SIGSTOP")
PHASES = ("forward", "backward")


def _config(args, **extra):
    return load_config(
        overrides={
            "model.name": "mlp-digits",
            "num_nodes": args.nodes,
            "batch_size": 16 * args.nodes,
            "num_steps": args.steps,
            "seed": args.seed,
            "max_eval_samples": 64,
            "runtime.max_restarts": args.faults,
            **extra,
        }
    )


class Injector:
    """The ``fault`` hook: hits the planned component before the planned layer pass."""

    def __init__(self, plan: dict[tuple[int, int, str], tuple[str, str]]):
        self.plan = dict(plan)
        self.cluster = None
        self.injected: list[dict] = []

    def bind(self, cluster) -> None:
        self.cluster = cluster

    def __call__(self, step: int, layer: int, phase: str) -> None:
        target = self.plan.pop((step, layer, phase), None)
        if target is None:
            return
        name, how = target
        handle = self.cluster.handle(name)
        pid = ray.get(handle.pid.remote())
        at = time.time()
        if how == "ray.kill":
            ray.kill(handle, no_restart=True)
        else:
            os.kill(pid, getattr(signal, how))
        # ray.kill (and a signal) take effect a moment later: the layer pass starts only
        # once the process is gone (or stopped), else a pass that is nearly done could
        # finish first and the loss be found after the run's last step.
        _wait_for_state(pid, STOPPED_STATES if how == "SIGSTOP" else GONE_STATES)
        self.injected.append({"component": name, "how": how, "step": step, "at_s": at})


#: /proc/<pid>/stat states of a process that is stopped, and of one that is gone.
STOPPED_STATES = ("T", "t")
GONE_STATES = ("Z", "X", None)
#: Longest wait for a fault to take effect, s (then the pass goes on regardless).
FAULT_EFFECT_WAIT_S = 10.0


def _wait_for_state(pid: int, states: tuple) -> None:
    deadline = time.monotonic() + FAULT_EFFECT_WAIT_S
    while _state(pid) not in states and time.monotonic() < deadline:
        time.sleep(0.005)


def _state(pid: int) -> str | None:
    """The process's state letter (R, S, T, Z ...), None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _plan(args, num_layers: int) -> dict:
    rng = random.Random(args.seed)
    components = (
        ["memoryx"]
        + [f"swarmx-0-{i}" for i in range((args.nodes + 3) // 4)]
        + [f"node-{r}" for r in range(args.nodes)]
    )
    # One fault per step, on steps 1.. (step 0 pays for connections), spread over the run.
    steps = sorted(rng.sample(range(1, args.steps), args.faults))
    plan = {}
    for step in steps:
        name = rng.choice(components)
        how = rng.choice(KINDS)
        plan[(step, rng.randrange(num_layers), rng.choice(PHASES))] = (name, how)
    return plan


def _flat(report) -> list[torch.Tensor]:
    return [t for layer in report.final_weights for t in layer.values()]


def _step_median(report) -> float:
    return statistics.median(s.wall_time_s for s in report.steps[1:])


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns the results (also printed, and written to ``--json``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faults", type=int, default=50, help="faults to inject, K")
    parser.add_argument("--steps", type=int, help="training steps (default 2K + 4)")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--overhead-repeats", type=int, default=2, help="liveness runs of each kind (0: none)"
    )
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    args.steps = args.steps or 2 * args.faults + 4
    if args.faults >= args.steps:
        parser.error("--steps must exceed --faults (one fault per step, none in step 0)")

    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    started_ray = not ray.is_initialized()  # a test session's Ray is reused, and kept
    if started_ray:
        start_local_ray(logging_level=logging.WARNING)  # as `wafer train` does: loopback only
    with tempfile.TemporaryDirectory() as scratch:
        periodic = {"checkpoint.every_steps": 2, "checkpoint.dir": os.path.join(scratch, "ck")}
        clean = train(_config(args, **periodic), progress=False)

        # Liveness overhead: watched vs effectively unwatched, interleaved.
        # The order alternates: a run right after another one starts on a warmer machine.
        watched, unwatched = [], []
        for repeat in range(args.overhead_repeats):
            kinds = [(watched, {}), (unwatched, {"runtime.health_interval_s": 1e6})]
            for times, overrides in kinds[:: 1 if repeat % 2 == 0 else -1]:
                times.append(_step_median(train(_config(args, **overrides), progress=False)))

        injector = Injector(_plan(args, clean.num_layers))
        periodic["checkpoint.dir"] = os.path.join(scratch, "ck-faulted")
        started = time.perf_counter()
        faulted = train(
            _config(args, **periodic), progress=False, fault=injector, on_launch=injector.bind
        )
        faulted_wall_s = time.perf_counter() - started

    identical = (
        all(torch.equal(a, b) for a, b in zip(_flat(faulted), _flat(clean), strict=True))
        and [s.loss for s in faulted.steps] == [s.loss for s in clean.steps]
        and faulted.evals[-1] == clean.evals[-1]
    )
    restarts = faulted.faults
    recovery_s = []
    for fault in injector.injected:
        match = next(
            (
                r
                for r in restarts
                if r["component"] == fault["component"]
                and r["detected_at_s"] >= fault["at_s"]
                and r["step_done_at_s"] is not None
            ),
            None,
        )
        if match is not None:
            recovery_s.append(match["step_done_at_s"] - fault["at_s"])
            restarts = [r for r in restarts if r is not match]
    result = {
        "faults_injected": len(injector.injected),
        "faults_recovered": len(recovery_s),
        "bit_identical": identical,
        "recovery_s_median": statistics.median(recovery_s) if recovery_s else None,
        "recovery_s_max": max(recovery_s) if recovery_s else None,
        "recovery_s": recovery_s,
        "by_kind": {kind: sum(1 for f in injector.injected if f["how"] == kind) for kind in KINDS},
        "by_component": {
            c: sum(1 for f in injector.injected if f["component"].startswith(c))
            for c in ("node", "swarmx", "memoryx")
        },
        # Per loss handled: which component, how long the replacement took to start and
        # rewire (the rest of a recovery is detection and the re-run step).
        "restarts": [
            {k: r[k] for k in ("component", "step", "restart_s", "action")} for r in faulted.faults
        ],
        "steps": args.steps,
        "nodes": args.nodes,
        "faulted_run_wall_s": faulted_wall_s,
        "clean_run_wall_s": clean.wall_time_s,
        "liveness_step_time_ratio": (
            statistics.median(watched) / statistics.median(unwatched) if watched else None
        ),
        "step_time_watched_s": watched,
        "step_time_unwatched_s": unwatched,
    }
    line = f"recovered {result['faults_recovered']}/{result['faults_injected']}, "
    line += f"bit-identical: {identical}"
    if recovery_s:
        line += f", recovery median {result['recovery_s_median']:.2f} s, max "
        line += f"{result['recovery_s_max']:.2f} s"
    if watched:
        ratio = result["liveness_step_time_ratio"]
        line += f", liveness overhead {100 * (ratio - 1):+.1f}% of the step time"
    print(line)
    print(json.dumps({k: v for k, v in result.items() if k != "recovery_s"}, indent=2))
    if args.json:
        with open(args.json, "w") as file:
            json.dump(result, file, indent=2)
    if started_ray:
        ray.shutdown()
    return result


if __name__ == "__main__":
    main()

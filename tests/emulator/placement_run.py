"""Run by test_placement_integration in a process of its own: a 3-raylet loopback cluster.

Starts three raylets on 127.0.0.1 (``ray.cluster_utils.Cluster``), then trains the same
run twice through ``runtime.address`` (the path ``wafer train --address`` takes): with
``runtime.placement: spread`` as the CLI, and with ``pack`` through the Python API.
Prints one JSON line: the raylets, and per strategy the losses and where each component
ran. A process of its own because its driver joins its own multi-raylet cluster, which
a test session's shared Ray instance would forbid.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from emulator.config import load_config
from emulator.runtime import ray_keeps_loopback
from emulator.train import train

RUN = {
    "model.name": "mlp-digits",
    "num_nodes": 4,
    "batch_size": 32,
    "num_steps": 2,
    "seed": 7,
    "swarmx.fanout": 2,
    "max_eval_samples": 64,
    # 2 compute-node hosts, 2 SwarmX hosts and MemoryX: 5 processes to place.
    "runtime.nodes_per_process": 2,
}


def _cli_run(address: str, tmp: Path) -> dict:
    """``wafer train --address ADDR`` with ``runtime.placement: spread``; its JSON."""
    config, out = tmp / "spread.yaml", tmp / "spread.json"
    config.write_text(
        "swarmx:\n  fanout: 2\nmax_eval_samples: 64\n"
        "runtime:\n  nodes_per_process: 2\n  placement: spread\n"
    )
    command = [
        sys.executable, "-m", "emulator.cli", "train", "--config", str(config),
        "--model", "mlp-digits", "--nodes", "4", "--batch-size", "32", "--steps", "2",
        "--seed", "7", "--address", address, "--json", str(out), "--quiet",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"wafer train --address failed:\n{result.stderr[-3000:]}")
    return json.loads(out.read_text())


def main() -> None:
    # Every raylet on loopback, so the test's traffic never leaves the machine.
    # (as `ray start --node-ip-address 127.0.0.1` on each would, which Ray otherwise
    # rewrites to the machine's routable address here, in process).
    args = {"num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False}
    with ray_keeps_loopback():
        cluster = Cluster(initialize_head=True, head_node_args=args)
    try:
        with ray_keeps_loopback():
            for _ in range(2):
                cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        cluster.wait_for_nodes()
        with tempfile.TemporaryDirectory() as tmp:
            spread = _cli_run(cluster.address, Path(tmp))
        config = load_config(
            overrides={**RUN, "runtime.placement": "pack", "runtime.address": cluster.address}
        )
        report = train(config, progress=False)
        result = {
            "raylets": sorted(n["NodeID"] for n in ray.nodes() if n["Alive"]),
            "spread": {
                "losses": [s["loss"] for s in spread["steps"]],
                "placement": spread["runtime"]["placement"],
            },
            "pack": {
                "losses": [s.loss for s in report.steps],
                "placement": report.runtime["placement"],
            },
        }
        print("RESULT " + json.dumps(result), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    logging.getLogger("ray").setLevel(logging.ERROR)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    main()

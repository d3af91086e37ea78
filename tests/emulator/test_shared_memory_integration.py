"""runtime.shared_memory: co-located chunk payloads through shared memory train bitwise as
gRPC bytes do, count the same fabric traffic, and leave no segment behind."""

from __future__ import annotations

import pytest
import torch

from emulator.config import load_config
from emulator.train import train
from proto.shm import SHM_DIR

pytestmark = pytest.mark.integration


def _run(shared_memory: str, **extra):
    config = load_config(
        overrides={
            "model.name": "mlp-digits",
            "num_nodes": 2,
            "batch_size": 32,
            "num_steps": 3,
            "seed": 5,
            "optimizer.name": "adamw",
            "optimizer.lr": 2e-3,
            "runtime.shared_memory": shared_memory,
            **extra,
        }
    )
    before = set(SHM_DIR.glob("wafer-*"))
    report = train(config, progress=False)
    # Every ring of the run is gone with it (the creators' and the driver's cleanup).
    assert set(SHM_DIR.glob("wafer-*")) <= before
    return report


def _flat(report) -> list[torch.Tensor]:
    return [t for layer in report.final_weights for t in layer.values()]


@pytest.mark.parametrize(
    "extra",
    [
        {},
        # Two MemoryX servers: the root splits the gradient sums into pieces per server.
        {"memoryx.num_servers": 2},
    ],
    ids=["one-memoryx", "two-memoryx"],
)
def test_shared_memory_trains_bitwise_as_grpc_bytes(ray_session, extra):
    off = _run("off", **extra)
    on = _run("auto", **extra)
    shared = on.to_json()["runtime"]["shared_memory"]
    assert off.to_json()["runtime"]["shared_memory"]["enabled"] is False
    # The path was taken: weights down (MemoryX), gradients up (nodes, SwarmX sums), and
    # every chunk read was verified unchanged; none was too large for a slot.
    assert shared["enabled"] is True
    # The run's own CPU, step by step after the first (what bench_scale judges once warm),
    # adds up to its per-step mean.
    runtime = on.to_json()["runtime"]
    later_cpu_s = runtime["cpu_s_by_later_step"]
    # /proc counts CPU in 10 ms ticks: one short step may show none, never less.
    assert len(later_cpu_s) == len(on.steps) - 1 and all(s >= 0 for s in later_cpu_s)
    assert sum(later_cpu_s) > 0
    mean_s = runtime["cpu_per_step_s"]["driver_s"] + runtime["cpu_per_step_s"]["actors_s"]
    assert sum(later_cpu_s) / len(later_cpu_s) == pytest.approx(mean_s, abs=1e-6)
    assert shared["read"] >= shared["written"] > 0 and shared["inline"] == 0
    by_kind = shared["by_kind"]
    # Weights down: MemoryX writes, the nodes read.
    assert by_kind["memoryx"]["written"] > 0 and by_kind["nodes"]["read"] > 0
    # Gradients up: the nodes write, SwarmX reads and writes the sums, MemoryX reads them.
    assert by_kind["nodes"]["written"] > 0
    assert by_kind["swarmx"]["read"] > 0 and by_kind["swarmx"]["written"] > 0
    assert by_kind["memoryx"]["read"] > 0
    assert all(torch.equal(a, b) for a, b in zip(_flat(on), _flat(off), strict=True))
    assert [s.loss for s in on.steps] == [s.loss for s in off.steps]
    # The fabric's traffic and the emulated clock count the same bytes either way.
    traffic_on, traffic_off = on.to_json()["traffic"], off.to_json()["traffic"]
    for key in ("memoryx_egress_bytes", "memoryx_ingress_bytes", "bytes_delivered_to_nodes"):
        assert traffic_on[key] == traffic_off[key] > 0

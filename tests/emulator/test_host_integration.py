"""Several emulated nodes per process (emulator.host) train exactly as one node per
process, and a lost process that hosts several nodes is replaced bit-identically."""

from __future__ import annotations

import pytest
import torch

from emulator.config import load_config
from emulator.train import train
from tests.emulator.test_faults_integration import Chaos, _assert_identical

pytestmark = pytest.mark.integration


def _config(nodes_per_process: int, **extra):
    return load_config(
        overrides={
            **extra,
            "model.name": "mlp-digits",
            "num_nodes": 4,
            "batch_size": 32,
            "num_steps": 3,
            "seed": 5,
            # Fan-out 2: a 3-node SwarmX tree, so SwarmX nodes share a process too.
            "swarmx.fanout": 2,
            "max_eval_samples": 64,
            "runtime.nodes_per_process": nodes_per_process,
            "runtime.health_timeout_s": 2.0,
            "runtime.health_interval_s": 0.5,
        }
    )


@pytest.fixture(scope="module")
def separate(ray_session):
    return train(_config(1), progress=False)


def test_shared_processes_match_one_process_per_node(separate):
    shared = train(_config(2), progress=False)
    # 4 compute nodes in 2 processes, 3 SwarmX nodes in 2, and MemoryX.
    assert shared.runtime["num_processes"] == 5
    assert separate.runtime["num_processes"] == 8
    assert shared.runtime["num_emulated_nodes"] == separate.runtime["num_emulated_nodes"] == 7
    assert [s.loss for s in shared.steps] == [s.loss for s in separate.steps]
    for got, want in zip(shared.final_weights, separate.final_weights, strict=True):
        for name in want:
            assert torch.equal(got[name], want[name]), name
    # Every node still has its own endpoint and counters: the same traffic per node.
    assert shared.traffic["nodes"] == separate.traffic["nodes"]
    memory = shared.runtime["memory"]
    assert memory["peak_bytes"] >= memory["peak_hosts_bytes"] > 0
    # PSS shares the processes' common pages (torch's code, at least) out: below summed RSS.
    assert memory["measure"] == "pss"
    assert memory["peak_rss_bytes"] > memory["peak_bytes"]
    assert memory["peak_hosts_rss_bytes"] > memory["peak_hosts_bytes"]
    assert shared.runtime["time_to_first_step_s"] > shared.runtime["launch_time_s"] > 0
    placement = shared.runtime["placement"]
    assert len(placement["nodes"]) == 4 and len(placement["swarmx"]) == 3
    # node-0 and node-1 share a process, so a Ray node; every service is on loopback.
    assert placement["nodes"][0] == {**placement["nodes"][1], "rank": 0}
    assert {p["host"] for p in placement["nodes"]} == {"127.0.0.1"}


def test_killed_process_of_two_nodes_is_replaced_bit_identically(separate):
    # SIGKILL of node-1's process mid-forward takes node-0 with it; both come back in one
    # new process, are rewired to their SwarmX parent, and the step runs again.
    chaos = Chaos("node-1", (1, 1, "forward"), "SIGKILL")
    launched = {}

    def on_launch(cluster):
        launched["pids"] = dict(cluster.process_ids)
        chaos.bind(cluster)

    report = train(_config(2), progress=False, fault=chaos, on_launch=on_launch)
    assert chaos.hit
    _assert_identical(report, separate)
    # The replacement's pid is what the memory sampler reads from then on (Cluster.pids).
    now = chaos.cluster.process_ids
    assert now["node-0"] == now["node-1"] != launched["pids"]["node-1"]
    assert now["node-1"] in chaos.cluster.pids()["hosts"]
    assert launched["pids"]["node-1"] not in chaos.cluster.pids()["hosts"]
    assert [f["component"] for f in report.faults] in (["node-1"], ["node-0"])
    assert report.faults[0]["same_process"] == (
        ["node-0"] if report.faults[0]["component"] == "node-1" else ["node-1"]
    )
    assert report.steps[1].num_attempts == 2


def test_shrink_drops_every_node_of_the_lost_process(separate):
    # node-0 and node-1 share a process: both go, their SwarmX parent (now childless)
    # leaves its shared process, and node-2 and node-3 take the global batch as ranks 0, 1.
    chaos = Chaos("node-1", (1, 1, "forward"), "SIGKILL")
    report = train(
        _config(2, **{"runtime.on_node_loss": "shrink"}),
        progress=False,
        fault=chaos,
        on_launch=chaos.bind,
    )
    assert chaos.hit
    lost = [(f["component"], f["action"], f["same_process"]) for f in report.faults]
    assert lost in ([("node-1", "shrunk", ["node-0"])], [("node-0", "shrunk", ["node-1"])])
    assert [s.step for s in report.steps] == [s.step for s in separate.steps]
    assert report.steps[0].loss == separate.steps[0].loss
    assert [s.loss for s in report.steps] == pytest.approx([s.loss for s in separate.steps])
    assert [n["rank"] for n in report.traffic["nodes"]] == [0, 1]

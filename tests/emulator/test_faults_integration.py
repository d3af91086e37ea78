"""Chaos tests: kill any actor mid-step; the run recovers and ends bit-identical.

Each test kills one component (SIGKILL of its process, ``ray.kill`` of its
handle, or SIGSTOP) at one point of a step, through the coordinator's
``fault`` seam (called before each layer pass), and compares the final
weights, losses and eval with an undisturbed run of the same seed.
"""

from __future__ import annotations

import json
import os
import signal

import pytest
import ray
import torch

from emulator.config import load_config
from emulator.faults import RunFailed
from emulator.memory import stat_fields
from emulator.train import train
from tests.polling import until

pytestmark = pytest.mark.integration

NUM_STEPS = 4


def _config(**extra):
    return load_config(
        overrides={
            "model.name": "mlp-digits",
            "num_nodes": 2,
            "batch_size": 64,
            "num_steps": NUM_STEPS,
            "seed": 5,
            "optimizer.name": "adamw",
            "optimizer.lr": 2e-3,
            "runtime.health_timeout_s": 2.0,
            "runtime.health_interval_s": 0.5,
            **extra,
        }
    )


@pytest.fixture(scope="module")
def clean_run(ray_session):
    return train(_config(), progress=False)


def _gone(pid: int) -> bool:
    """Whether process ``pid`` has ended (exited, or a zombie not yet reaped)."""
    fields = stat_fields(pid)
    return fields is None or fields[0] == "Z"


class Chaos:
    """A ``fault`` hook that hits ``target`` once, when the run reaches ``when``."""

    def __init__(self, target: str, when: tuple[int, int, str], how: str):
        self.target, self.when, self.how = target, when, how
        self.cluster = None
        self.hit = False

    def bind(self, cluster) -> None:
        self.cluster = cluster

    def __call__(self, step: int, layer: int, phase: str) -> None:
        if self.hit or (step, layer, phase) != self.when:
            return
        self.hit = True
        handle = self.cluster.handle(self.target)
        if self.how == "ray.kill":
            pid = ray.get(handle.pid.remote())
            ray.kill(handle, no_restart=True)
            # ray.kill returns before the process ends; a small layer already sent could
            # still get through, and the loss then falls in the next step. Wait for it.
            assert until(lambda: _gone(pid), timeout_s=30)
        else:
            os.kill(ray.get(handle.pid.remote()), getattr(signal, self.how))


def _run(chaos: Chaos, **extra):
    report = train(_config(**extra), progress=False, fault=chaos, on_launch=chaos.bind)
    assert chaos.hit
    return report


def _assert_identical(report, clean) -> None:
    got = [t for layer in report.final_weights for t in layer.values()]
    want = [t for layer in clean.final_weights for t in layer.values()]
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    assert [s.step for s in report.steps] == [s.step for s in clean.steps]
    assert [s.loss for s in report.steps] == [s.loss for s in clean.steps]
    assert report.evals[-1] == clean.evals[-1]


# (component, point of the step, how): the forward stream, the backward reduce
# (the gradient of the last layer is summed while the next layer streams), and
# MemoryX's update (layer 2 is updated, layers 1 and 0 not yet).
CASES = [
    ("node-1", (1, 1, "forward"), "SIGKILL"),
    ("node-0", (2, 1, "backward"), "ray.kill"),
    ("swarmx-0-0", (1, 2, "forward"), "SIGKILL"),
    ("swarmx-0-0", (2, 0, "backward"), "ray.kill"),
]


@pytest.mark.parametrize(("target", "when", "how"), CASES)
def test_lost_node_or_swarmx_is_replaced_bit_identically(clean_run, target, when, how):
    report = _run(Chaos(target, when, how))
    _assert_identical(report, clean_run)
    assert [f["component"] for f in report.faults] == [target]
    assert report.faults[0]["step"] == when[0]
    assert report.steps[when[0]].num_attempts == 2


# 4 nodes at fan-out 2: the root feeds 2 SwarmX nodes, which relay each pass to their
# compute nodes on one stream per pass and child (swarmx/pass_relay.py).
DEEP_TREE = {"num_nodes": 4, "swarmx.fanout": 2}


@pytest.fixture(scope="module")
def clean_deep_run(ray_session):
    return train(_config(**DEEP_TREE), progress=False)


def test_a_lost_swarmx_node_below_the_root_is_replaced_bit_identically(clean_deep_run):
    report = _run(Chaos("swarmx-0-0", (1, 1, "forward"), "SIGKILL"), **DEEP_TREE)
    _assert_identical(report, clean_deep_run)
    assert [f["component"] for f in report.faults] == ["swarmx-0-0"]
    assert report.steps[1].num_attempts == 2


# PCM weight-stationary arrays keep each matrix, its programming noise and its drift between
# passes: the lost node's neighbours go back to what they held when the step began, and the
# replacement starts from the lost node's state as the driver kept it after the last pass
# (each matrix's generator state at programming and its exact age), so the matrices it finds
# resident are programmed with the same noise and read at the same age. (A photonic node's
# fabrication errors come from backend.seed alone: tests/nodes/photonic/test_photonic_backend.py.)
PCM_WEIGHT_STATIONARY = {
    "backend.kind": "pcm",
    "backend.mode": "weight-stationary",
    "backend.weight_stationary.num_chips": 4,
    "num_steps": 3,
}
PCM_CASES = {
    # node-1 is lost in step 2, right after the evaluation at version 2 programmed the arrays
    # it reads; then MemoryX, in step 3: it comes back from the checkpoint at version 2, and
    # every node goes back to its arrays as they were before step 2, not to empty arrays.
    "after-eval": (
        {"eval_every": 2, "checkpoint.every_steps": 2, "num_steps": 4},
        [("node-1", (2, 0, "forward"), "SIGKILL"), ("memoryx", (3, 0, "backward"), "ray.kill")],
    ),
    # Weights that do not change (the update rounds away): the arrays date from step 0.
    "unchanged-weights": ({"optimizer.lr": 1e-30}, [("node-0", (2, 1, "forward"), "ray.kill")]),
}


class ChaosSeries:
    """Several ``Chaos`` hooks, each hitting its target once."""

    def __init__(self, hooks: list[Chaos]):
        self.hooks = hooks

    @property
    def hit(self) -> bool:
        return all(h.hit for h in self.hooks)

    def bind(self, cluster) -> None:
        for hook in self.hooks:
            hook.bind(cluster)

    def __call__(self, step: int, layer: int, phase: str) -> None:
        for hook in self.hooks:
            hook(step, layer, phase)


@pytest.mark.parametrize("case", PCM_CASES)
def test_pcm_weight_stationary_node_is_replaced_bit_identically(ray_session, tmp_path, case):
    extra, faults = PCM_CASES[case]
    extra = {**PCM_WEIGHT_STATIONARY, **extra}
    own_dir = (
        {"checkpoint.dir": str(tmp_path / "clean")} if "checkpoint.every_steps" in extra else {}
    )
    clean = train(_config(**extra, **own_dir), progress=False)
    if own_dir:
        extra["checkpoint.dir"] = str(tmp_path / "ckpt")
    report = _run(ChaosSeries([Chaos(*fault) for fault in faults]), **extra)
    _assert_identical(report, clean)
    assert [e.step for e in report.evals] == [e.step for e in clean.evals]
    assert [e.loss for e in report.evals] == [e.loss for e in clean.evals]
    assert [f["component"] for f in report.faults] == [target for target, _, _ in faults]
    target = faults[0][0]  # a compute node

    # The replacement programmed the matrices it found resident again, from the kept state.
    def node_stats(run, name):
        return next(n for n in run.traffic["nodes"] if f"node-{n['rank']}" == name)["backend"]

    restored = node_stats(report, target)["pcm.restored_programmings"]
    assert restored > 0
    if case == "unchanged-weights":  # every matrix, each programmed once, at step 0
        assert restored == node_stats(clean, target)["pcm.programmings"]


def test_memoryx_restarts_from_the_newest_checkpoint(clean_run, tmp_path):
    # Killed in step 3's update, after the checkpoint at step 2: steps 2 and 3 run again.
    chaos = Chaos("memoryx", (3, 1, "backward"), "SIGKILL")
    directory = tmp_path / "ckpt"
    report = _run(chaos, **{"checkpoint.every_steps": 2, "checkpoint.dir": str(directory)})
    _assert_identical(report, clean_run)
    assert [f["component"] for f in report.faults] == ["memoryx"]
    # keep = 2: the checkpoints after steps 2 and 4 (MemoryX versions 2 and 4).
    assert sorted(p.name for p in directory.glob("step-*.pt")) == [
        "step-00000002.pt",
        "step-00000004.pt",
    ]


def test_memoryx_without_checkpoints_restarts_from_the_first_step(clean_run):
    report = _run(Chaos("memoryx", (1, 2, "backward"), "ray.kill"))
    _assert_identical(report, clean_run)
    assert [f["component"] for f in report.faults] == ["memoryx"]


def test_stopped_node_is_detected_and_replaced(clean_run):
    # SIGSTOP: the process lives but answers nothing; its health check times out.
    report = _run(Chaos("node-0", (2, 0, "forward"), "SIGSTOP"))
    _assert_identical(report, clean_run)
    assert [f["component"] for f in report.faults] == ["node-0"]
    assert "health check" in report.faults[0]["cause"]


def test_exhausted_restarts_name_component_and_step_and_keep_the_work(ray_session, tmp_path):
    chaos = Chaos("node-1", (2, 0, "backward"), "SIGKILL")
    directory = tmp_path / "ckpt"
    with pytest.raises(RunFailed) as failed:
        _run(chaos, **{"runtime.max_restarts": 0, "checkpoint.dir": str(directory)})
    message = str(failed.value)
    assert "node-1" in message and "step 2" in message and "max_restarts" in message
    assert "\n" not in message
    partial = failed.value.partial
    assert [s["step"] for s in partial["steps"]] == [0, 1]
    assert partial["completed"] is False
    json.dumps(partial)  # the CLI writes it as the report
    # The committed state after step 1 is kept.
    assert failed.value.checkpoint == str(directory.resolve() / "step-00000002.pt")
    assert os.path.isfile(failed.value.checkpoint)


def test_resume_dir_continues_a_run_whose_driver_died(clean_run, tmp_path):
    directory = tmp_path / "ckpt"
    periodic = {"checkpoint.every_steps": 1, "checkpoint.dir": str(directory)}

    class DriverDies(Exception):
        pass

    def die(step: int, layer: int, phase: str) -> None:
        if (step, layer, phase) == (3, 0, "forward"):
            raise DriverDies

    with pytest.raises(DriverDies):
        train(_config(**periodic), progress=False, fault=die)
    resumed = train(_config(**periodic, resume="auto"), progress=False)
    assert [s.step for s in resumed.steps] == [3]
    got = [t for layer in resumed.final_weights for t in layer.values()]
    want = [t for layer in clean_run.final_weights for t in layer.values()]
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    assert resumed.evals[-1] == clean_run.evals[-1]


def test_shrink_continues_on_the_survivors_with_the_same_global_batch(clean_run):
    report = _run(
        Chaos("node-1", (2, 1, "forward"), "SIGKILL"), **{"runtime.on_node_loss": "shrink"}
    )
    assert [(f["component"], f["action"]) for f in report.faults] == [("node-1", "shrunk")]
    assert [s.step for s in report.steps] == [s.step for s in clean_run.steps]
    # node-0 alone now reads the whole global batch: the steps before the loss are bitwise
    # those of the undisturbed run; after it, the sum over one node instead of two may
    # round differently, so the run stays close but is not bit-identical.
    assert [s.loss for s in report.steps[:2]] == [s.loss for s in clean_run.steps[:2]]
    assert [s.loss for s in report.steps] == pytest.approx([s.loss for s in clean_run.steps])
    assert [n["rank"] for n in report.traffic["nodes"]] == [0]
    assert report.steps[-1].bytes_to_nodes < clean_run.steps[-1].bytes_to_nodes


def test_sharded_memoryx_root_swarmx_is_replaced_bit_identically(clean_run):
    # Two MemoryX servers: the new root is wired to both, each layer to its owner.
    report = _run(Chaos("swarmx-0-0", (1, 2, "forward"), "SIGKILL"), **{"memoryx.num_servers": 2})
    _assert_identical(report, clean_run)
    assert [f["component"] for f in report.faults] == ["swarmx-0-0"]


def test_lost_memoryx_server_of_two_with_a_disk_tier_restarts_both_bit_identically(
    clean_run, tmp_path
):
    # The survivor, and the state on disk, are at a later version than any checkpoint: both
    # servers come back from the newest directory checkpoint (step 2; the loss is in step
    # 3's update of layer 1), each taking its own layers into a new disk tier.
    extra = {
        "memoryx.num_servers": 2,
        "memoryx.ram_budget_bytes": 10**8,
        "memoryx.spill_dir": str(tmp_path / "spill"),
        "checkpoint.every_steps": 2,
        "checkpoint.dir": str(tmp_path / "ckpt"),
    }
    spill = tmp_path / "spill"
    seen: list[set[str]] = []

    class WatchSpill(Chaos):
        """Lists the spill root when it kills, and when the first step after the restart runs."""

        def __call__(self, step: int, layer: int, phase: str) -> None:
            if len(seen) == int(self.hit):
                seen.append({p.name for p in spill.iterdir()})
            super().__call__(step, layer, phase)

    chaos = WatchSpill("memoryx-1", (3, 1, "backward"), "SIGKILL")
    report = _run(chaos, **extra)
    _assert_identical(report, clean_run)
    assert [f["component"] for f in report.faults] == ["memoryx-1"]
    # Steps 2 and 3 ran again after the restart; the report keeps one record of each.
    assert [s.step for s in report.steps] == list(range(NUM_STEPS))
    # Once the new servers serve, only their two directories are left: the survivor removed
    # its own when stopped, and the lost server's was removed for it.
    before, after = seen[0], seen[-1]
    assert len(before) == len(after) == 2 and not before & after
    assert list(spill.iterdir()) == []  # and the run removed the rest when it ended


def test_sharded_memoryx_lost_before_any_checkpoint_restarts_from_the_first_step(clean_run):
    report = _run(Chaos("memoryx", (1, 0, "backward"), "ray.kill"), **{"memoryx.num_servers": 2})
    _assert_identical(report, clean_run)
    assert [f["component"] for f in report.faults] == ["memoryx"]


def test_resume_auto_continues_a_sharded_run_from_its_directory_checkpoints(clean_run, tmp_path):
    directory = tmp_path / "ckpt"
    periodic = {
        "checkpoint.every_steps": 1,
        "checkpoint.dir": str(directory),
        "checkpoint.keep": 2,
        "memoryx.num_servers": 2,
    }

    class DriverDies(Exception):
        pass

    def die(step: int, layer: int, phase: str) -> None:
        if (step, layer, phase) == (3, 0, "forward"):
            raise DriverDies

    with pytest.raises(DriverDies):
        train(_config(**periodic), progress=False, fault=die)
    # Directory checkpoints, the newest two kept.
    assert sorted(p.name for p in directory.glob("step-*")) == ["step-00000002", "step-00000003"]
    resumed = train(_config(**periodic, resume="auto"), progress=False)
    assert [s.step for s in resumed.steps] == [3]
    got = [t for layer in resumed.final_weights for t in layer.values()]
    want = [t for layer in clean_run.final_weights for t in layer.values()]
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))

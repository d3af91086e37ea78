"""End-to-end weight-streamed training on real Ray actors and real gRPC on loopback."""

from __future__ import annotations

import pytest
import torch

from emulator.config import load_config
from emulator.prepare import prepare_layers
from emulator.reference import reference_train
from emulator.steps import StepFault
from emulator.train import train

pytestmark = pytest.mark.integration

NUM_STEPS = 20
BATCH = 64

OPTIMIZERS = {
    "sgd-momentum": {"optimizer.name": "sgd", "optimizer.lr": 0.05, "optimizer.momentum": 0.9},
    "adamw": {"optimizer.name": "adamw", "optimizer.lr": 2e-3, "optimizer.weight_decay": 0.01},
}


def _config(num_nodes: int, optimizer: str, **extra):
    return load_config(
        overrides={
            "model.name": "mlp-digits",
            "num_nodes": num_nodes,
            "batch_size": BATCH,
            "num_steps": NUM_STEPS,
            "seed": 3,
            **OPTIMIZERS[optimizer],
            **extra,
        }
    )


def _flat(weights: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    return [t for layer in weights for t in layer.values()]


def _reference(config):
    layers, dataset = prepare_layers(config)
    result = reference_train(
        layers,
        dataset,
        optimizer_config=config.optimizer,
        batch_size=config.batch_size,
        num_steps=config.num_steps,
        seed=config.seed,
    )
    return result


def _max_rel_diff(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    assert [t.shape for t in got] == [t.shape for t in want]
    return max(float((g - w).abs().max() / w.abs().max()) for g, w in zip(got, want, strict=True))


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("num_nodes", [1, 2, 4])
def test_weight_streaming_equals_plain_pytorch(ray_session, num_nodes, optimizer):
    config = _config(num_nodes, optimizer)
    report = train(config, progress=False)
    reference = _reference(config)
    # The weights moved: equality is not the trivial "nothing trained".
    initial = _flat(
        [
            {n: p.detach() for n, p in layer.named_parameters()}
            for layer in prepare_layers(config)[0]
        ]
    )
    assert _max_rel_diff(_flat(reference.block_weights), initial) > 1e-3
    assert _max_rel_diff(_flat(report.final_weights), _flat(reference.block_weights)) < 1e-5
    losses = [s.loss for s in report.steps]
    assert losses == pytest.approx(reference.losses, rel=1e-5)


def test_a_step_takes_memoryx_traffic_from_its_answers_and_commits_on_the_next_pass(
    ray_session, monkeypatch
):
    """MemoryX's counters come back with each backward answer: a step right after another
    reads no Stats; one after an evaluation (which moves MemoryX's bytes) reads them again,
    and every step still counts exactly its own bytes. A step is committed by the next
    training pass's requests, or by a CommitStep before anything else (the evaluations)."""
    from proto.clients import MemoryXClient

    stats_calls, commits = [], []
    stats, commit_step = MemoryXClient.stats, MemoryXClient.commit_step
    monkeypatch.setattr(
        MemoryXClient, "stats", lambda self, **kw: stats_calls.append(1) or stats(self, **kw)
    )
    monkeypatch.setattr(
        MemoryXClient,
        "commit_step",
        lambda self, step, **kw: commits.append(step) or commit_step(self, step, **kw),
    )
    report = train(_config(2, "adamw", num_steps=5, eval_every=3), progress=False).to_json()
    model_bytes = report["model"]["num_params"] * 4
    assert [s["memoryx_egress_bytes"] for s in report["steps"]] == [2 * model_bytes] * 5
    assert [s["memoryx_ingress_bytes"] for s in report["steps"]] == [model_bytes] * 5
    assert len(report["evals"]) == 2  # after step 3, and at the end
    # Before step 1, before step 4 (after the evaluation), and the report's totals.
    assert len(stats_calls) == 3
    # Before the evaluation after step 3 (index 2) and the one at the end.
    assert commits == [2, 4]


def test_memoryx_traffic_is_independent_of_node_count(ray_session):
    reports = {n: train(_config(n, "adamw", num_steps=3), progress=False).to_json() for n in (1, 8)}
    one, eight = reports[1]["traffic"], reports[8]["traffic"]
    model_bytes = reports[1]["model"]["num_params"] * 4
    for traffic in (one, eight):
        # Weights stream twice per step (forward, backward); gradients come back once.
        assert traffic["memoryx_egress_bytes"] == 2 * model_bytes
        assert traffic["memoryx_ingress_bytes"] == model_bytes
        assert [s["memoryx_egress_bytes"] for s in reports[1]["steps"]] == [2 * model_bytes] * 3
    assert one["memoryx_egress_bytes"] == eight["memoryx_egress_bytes"]
    assert one["memoryx_ingress_bytes"] == eight["memoryx_ingress_bytes"]
    # ... while every node receives the whole model twice per step.
    assert one["bytes_delivered_to_nodes"] == 2 * model_bytes
    assert eight["bytes_delivered_to_nodes"] == 8 * 2 * model_bytes
    assert all(n["weight_bytes_held"] == 0 for n in eight["totals"]["nodes"])


@pytest.fixture(scope="module")
def clean_run(ray_session):
    """Six uninterrupted steps on 2 nodes: the baseline for re-run and resume."""
    return train(_config(2, "adamw", num_steps=6), progress=False)


# (fault, steps_per_pass) -> attempts per step. A run's first step goes alone, then up to
# steps_per_pass steps per pass; a pass that fails keeps the steps it completed, and its
# steps from the one that failed run again.
RERUNS = {
    ((3, 0, "backward"), 1): [1, 1, 1, 2, 1, 1],
    ((3, 0, "backward"), 2): [1, 1, 1, 2, 1, 1],  # passes [0] [1 2] [3 4] [5]
    # Steps 1 and 2 of the pass are done, step 3 half: only step 3 runs again.
    ((3, 0, "backward"), 3): [1, 1, 1, 2, 1, 1],  # passes [0] [1 2 3] [4 5]
    # Failed in its second step's forward, after the first step's updates.
    ((4, 1, "forward"), 2): [1, 1, 1, 1, 2, 1],
}


@pytest.mark.parametrize(("fault_at", "steps_per_pass"), list(RERUNS))
def test_failed_step_is_rerun_without_double_updates(
    ray_session, clean_run, fault_at, steps_per_pass
):
    config = _config(2, "adamw", num_steps=6, **{"runtime.steps_per_pass": steps_per_pass})
    failed = set()

    def fault(step: int, layer: int, phase: str) -> None:
        # Fail half-way through a step's pass, before that layer phase is sent (the last
        # layer's update of step 3 is applied by then).
        if (step, layer, phase) == fault_at and step not in failed:
            failed.add(step)
            raise StepFault("injected failure")

    rerun = train(config, progress=False, fault=fault)
    assert failed == {fault_at[0]}
    assert [s.num_attempts for s in rerun.steps] == RERUNS[fault_at, steps_per_pass]
    assert [s.step for s in rerun.steps] == list(range(6))
    if fault_at[2] == "backward":  # (the failed step's updates before it come again)
        assert rerun.traffic["num_duplicate_gradients"] > 0
    for got, want in zip(_flat(rerun.final_weights), _flat(clean_run.final_weights), strict=True):
        assert torch.equal(got, want)
    # Every step counts its own MemoryX bytes, passes of several steps as well.
    for record, clean in zip(rerun.steps, clean_run.steps, strict=True):
        if record.num_attempts == 1:
            assert record.memoryx_egress_bytes == clean.memoryx_egress_bytes
            assert record.loss == clean.loss


def test_checkpoint_resume_continues_the_run(ray_session, clean_run, tmp_path):
    path = tmp_path / "ckpt.pt"
    train(_config(2, "adamw", num_steps=3, save_checkpoint=str(path)), progress=False)
    assert path.is_file()
    resumed = train(_config(2, "adamw", num_steps=3, resume=str(path)), progress=False)
    assert [s.step for s in resumed.steps] == [3, 4, 5]
    for got, want in zip(_flat(resumed.final_weights), _flat(clean_run.final_weights), strict=True):
        assert torch.equal(got, want)


def test_reduced_precision_halves_weight_stream(ray_session):
    report = train(
        _config(2, "adamw", num_steps=3, **{"backend.precision": "bf16"}), progress=False
    ).to_json()
    params = report["model"]["num_params"]
    assert report["traffic"]["memoryx_egress_bytes"] == 2 * 2 * params
    assert report["traffic"]["memoryx_ingress_bytes"] == 4 * params
    assert report["final_loss"] < report["steps"][0]["loss"]


# Every backend (photonic with backprop as well costs 20 s a run, most of it its first step).
BACKENDS = {
    "cs2": {},  # weights streamed in the backward too
    "pcm": {"backend.kind": "pcm"},  # streaming: no state between passes
    "photonic-dfa": {"backend.kind": "photonic", "backend.training": "dfa"},  # no weights back
}


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_passes_of_several_steps_train_the_bits_of_one_step_passes(
    ray_session, backend, monkeypatch
):
    """Every backend and training method whose nodes keep no state between passes: steps
    sent 2 to a pass (the next step's layers asked for before this step's updates; the
    second pass knows the layers' sizes, so it would join asks and held-back layers
    across the step's end if it could) train bit for bit what one step per pass trains,
    and count the same bytes."""
    from emulator.coordinator import Coordinator

    passes: list[int] = []
    train_steps = Coordinator.train_steps
    monkeypatch.setattr(
        Coordinator,
        "train_steps",
        lambda self, first, count: passes.append(count) or train_steps(self, first, count),
    )
    runs = {
        n: train(
            _config(
                2,
                "adamw",
                num_steps=3,
                max_eval_samples=64,
                **BACKENDS[backend],
                **{"runtime.steps_per_pass": n},
            ),
            progress=False,
        )
        for n in (1, 2)
    }
    one, two = runs[1], runs[2]
    assert passes == [1] * 3 + [1, 2]  # the run's first step alone, then 2 to a pass
    assert [s.loss for s in two.steps] == [s.loss for s in one.steps]
    for got, want in zip(_flat(two.final_weights), _flat(one.final_weights), strict=True):
        assert torch.equal(got, want)
    for field in ("memoryx_egress_bytes", "memoryx_ingress_bytes", "bytes_to_nodes"):
        assert [getattr(s, field) for s in two.steps] == [getattr(s, field) for s in one.steps]
    assert all(s.num_attempts == 1 for s in two.steps)

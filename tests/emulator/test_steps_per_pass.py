"""Which training steps go in one pass (``runtime.steps_per_pass``): no Ray, no gRPC."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from emulator.config import load_config
from emulator.faults import CheckpointDir
from emulator.train import _steps_in_pass


def _passes(config, steps_per_pass: int, first: int = 0) -> list[list[int]]:
    coordinator = SimpleNamespace(
        steps_per_pass=steps_per_pass, checkpoints=CheckpointDir(config.checkpoint)
    )
    final = first + config.num_steps
    passes, step = [], first
    while step < final:
        count = _steps_in_pass(config, coordinator, step, first, final)
        passes.append(list(range(step, step + count)))
        step += count
    return passes


def test_a_pass_ends_where_the_driver_has_work_between_steps(tmp_path):
    config = load_config(
        overrides={
            "num_steps": 10,
            "eval_every": 4,  # after steps 3 and 7
            "checkpoint.dir": str(tmp_path),
            "checkpoint.every_steps": 3,  # after steps 2, 5 and 8
        }
    )
    # The run's first step goes alone (the warm spare starts after it).
    assert _passes(config, 4) == [[0], [1, 2], [3], [4, 5], [6, 7], [8], [9]]
    assert _passes(config, 1) == [[k] for k in range(10)]


def test_passes_fill_up_to_steps_per_pass_and_stop_at_the_run_s_end():
    config = load_config(overrides={"num_steps": 9})
    assert _passes(config, 4) == [[0], [1, 2, 3, 4], [5, 6, 7, 8]]
    assert _passes(config, 3, first=5) == [[5], [6, 7, 8], [9, 10, 11], [12, 13]]


@pytest.mark.parametrize("bad", [0, 65, True, "some"])
def test_steps_per_pass_is_auto_or_a_count(bad):
    with pytest.raises(ValueError, match="runtime.steps_per_pass"):
        load_config(overrides={"runtime.steps_per_pass": bad})


def test_answers_go_to_their_requests_places():
    """The root answers layers as they complete: step 1's first forward layer may be
    answered before step 0's last update."""
    from emulator.steps import StepFault, in_pass_order
    from proto.domain import LayerAck, LayerRequest, Phase

    order = [(0, 0, Phase.FORWARD), (0, 0, Phase.BACKWARD), (1, 0, Phase.FORWARD)]
    requests = [LayerRequest(layer=i, step=s, phase=p, dtype="float32") for s, i, p in order]
    acks = [LayerAck(layer=i, step=s, phase=p) for s, i, p in order]
    assert in_pass_order(requests, [acks[0], acks[2], acks[1]]) == acks
    with pytest.raises(StepFault, match="do not answer the pass"):
        in_pass_order(requests, [acks[0], acks[1], acks[1]])
    with pytest.raises(StepFault, match="do not answer the pass"):
        in_pass_order(requests, acks[:2])


@pytest.mark.parametrize(
    ("num_nodes", "layer_bytes", "kept_state", "want"),
    [
        (1, 1 << 20, False, 4),  # a small model on one node: the most
        (1, 20 << 20, False, 3),  # 3 x 20 MiB per extra snapshot: two fit 128 MiB
        (1, 64 << 20, False, 1),  # none fits
        (1, 1 << 20, True, 1),  # nodes that keep state are read after each step
        (4, 1 << 20, False, 1),  # several nodes: the step is bound by CPU, not the chain
    ],
)
def test_auto_steps_per_pass(num_nodes, layer_bytes, kept_state, want):
    from emulator.coordinator import Coordinator
    from proto.domain import LayerLayout, TensorSpec

    config = load_config(overrides={"num_nodes": num_nodes})
    spec = LayerLayout(tensors=(TensorSpec("weight", (layer_bytes // 4,)),), num_kept=0)
    coordinator = SimpleNamespace(
        config=config,
        cluster=SimpleNamespace(memoryx_split=False, node_addresses=["n"] * num_nodes),
        supervisor=SimpleNamespace(keeps_node_states=lambda: kept_state),
        memoryx=SimpleNamespace(layout=lambda: SimpleNamespace(layers=[spec])),
        _auto_steps_per_pass=None,
    )
    assert Coordinator.steps_per_pass.fget(coordinator) == want

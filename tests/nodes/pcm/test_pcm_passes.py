"""Weight-stationary arrays across passes: a re-run reads what the first attempt read, and a
replacement node reads what the lost node would have (nodes/pcm/backend.py ``begin_pass``).

A node seeds torch per (seed, rank, step, layer) before each layer pass (nodes.worker); these
tests do the same, so each pass draws the same noise wherever it runs.
"""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

from nodes.pcm.backend import PcmBackend
from nodes.pcm.state import _tensor_bytes
from nodes.worker import EVAL_PASS, TRAIN_PASS

IN, OUT, BATCH = 40, 24, 6


def _block() -> nn.Module:
    return nn.Sequential(nn.Linear(IN, OUT), nn.ReLU(), nn.Linear(OUT, OUT))


def _weights(version: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(100 + version)
    return {n: p.detach().clone() for n, p in _block().named_parameters()}


def _x() -> torch.Tensor:
    return torch.randn(BATCH, IN, generator=torch.Generator().manual_seed(7))


def _pass(backend: PcmBackend, step: int, kind: int, version: int) -> torch.Tensor:
    """Layer 0's forward in pass (step, kind) with the weights of ``version``."""
    backend.begin_pass(step, kind)
    torch.manual_seed(hash((5, 1, step, kind)) & 0x7FFF_FFFF_FFFF)
    return backend.forward(0, _block(), _weights(version), _x())


def _weight_stationary(**overrides) -> PcmBackend:
    return PcmBackend.Config(mode="weight-stationary", **overrides).build()


def test_a_rerun_pass_reads_what_its_first_attempt_read():
    backend = _weight_stationary()
    _pass(backend, 0, TRAIN_PASS, version=0)
    first = _pass(backend, 1, TRAIN_PASS, version=1)
    # The attempt failed elsewhere; the step runs again on arrays that already hold version 1.
    again = _pass(backend, 1, TRAIN_PASS, version=1)
    assert torch.equal(again, first)
    # Without going back, the re-run reads the resident arrays later and with other noise.
    undisturbed = _weight_stationary()
    _pass(undisturbed, 0, TRAIN_PASS, version=0)
    _pass(undisturbed, 1, TRAIN_PASS, version=1)
    undisturbed.begin_pass = lambda step, kind: None  # the behaviour before begin_pass existed
    assert not torch.equal(_pass(undisturbed, 1, TRAIN_PASS, version=1), first)


def test_a_replacement_node_reads_what_the_lost_node_would_have():
    lost = _weight_stationary()
    outputs = [_pass(lost, step, TRAIN_PASS, version=step) for step in range(3)]
    # Replaced before step 1: it starts with empty arrays and a clock at 0.
    replacement = _weight_stationary()
    assert torch.equal(_pass(replacement, 1, TRAIN_PASS, version=1), outputs[1])
    assert torch.equal(_pass(replacement, 2, TRAIN_PASS, version=2), outputs[2])


def test_arrays_left_by_an_evaluation_are_read_at_the_same_age_after_a_replacement():
    # An evaluation at version 2 programs the arrays that step 2 then reads, resident: their
    # age is a difference of clock readings, which must not depend on when the clock began.
    lost = _weight_stationary()
    lost.advance_clock(86400.0)  # its arrays had been busy for a day: a later clock
    for step in range(2):
        _pass(lost, step, TRAIN_PASS, version=step)
    _pass(lost, 2, EVAL_PASS, version=2)
    want = _pass(lost, 2, TRAIN_PASS, version=2)
    replacement = _weight_stationary()
    _pass(replacement, 1, TRAIN_PASS, version=1)
    _pass(replacement, 2, EVAL_PASS, version=2)
    assert torch.equal(_pass(replacement, 2, TRAIN_PASS, version=2), want)
    assert replacement.stats()["pcm.programmings"] == 2 * 2  # step 2 programmed nothing
    # Exactly the same age, not merely the same within float32 rounding of the reads.
    assert lost._programmed.keys() == replacement._programmed.keys()
    for key in lost._programmed:
        assert lost._age_s(key) == replacement._age_s(key) > 0


def test_a_rewind_to_an_earlier_pass_starts_from_empty_arrays():
    backend = _weight_stationary()
    outputs = [_pass(backend, step, TRAIN_PASS, version=step) for step in range(3)]
    # MemoryX came back at step 1: the arrays of step 2 must not stand in for step 1's.
    assert torch.equal(_pass(backend, 1, TRAIN_PASS, version=1), outputs[1])
    assert torch.equal(_pass(backend, 2, TRAIN_PASS, version=2), outputs[2])


@pytest.mark.parametrize("mode", ["streaming", "weight-stationary"])
def test_wear_and_counters_keep_the_aborted_attempt(mode):
    backend = PcmBackend.Config(mode=mode).build()
    _pass(backend, 0, TRAIN_PASS, version=0)
    once = backend.stats()["pcm.programmings"]
    _pass(backend, 0, TRAIN_PASS, version=0)
    # The devices were written by the first attempt and are written again by the re-run.
    assert backend.stats()["pcm.programmings"] == 2 * once


def _replacement_of(lost: PcmBackend) -> PcmBackend:
    """A new node given the lost node's state as the driver kept it (pickled, as Ray ships it)."""
    replacement = _weight_stationary()
    replacement.adopt_pass_state(pickle.loads(pickle.dumps(lost.pass_state())))
    return replacement


def test_a_replacement_after_an_evaluation_reads_the_arrays_the_evaluation_programmed():
    # Lost right after the evaluation at version 2: step 2 reads, resident, what that pass
    # programmed, at the age it has then. The replacement's arrays are empty and its clock
    # new; with the state the driver kept, it programs the same noise and reads the same age.
    lost = _weight_stationary()
    lost.advance_clock(3600.0)
    for step in range(2):
        _pass(lost, step, TRAIN_PASS, version=step)
    _pass(lost, 2, EVAL_PASS, version=2)
    kept = lost.pass_state()
    want = _pass(lost, 2, TRAIN_PASS, version=2)
    replacement = _weight_stationary()
    replacement.adopt_pass_state(pickle.loads(pickle.dumps(kept)))
    assert torch.equal(_pass(replacement, 2, TRAIN_PASS, version=2), want)
    assert replacement.stats()["pcm.restored_programmings"] == 2
    assert "pcm.programmings" not in replacement.stats()  # resident: nothing programmed
    for key in lost._programmed:
        assert replacement._age_s(key) == lost._age_s(key) > 0
    # Without the state it programs afresh, with other noise, read at age 0 (the old gap).
    fresh = _weight_stationary()
    assert not torch.equal(_pass(fresh, 2, TRAIN_PASS, version=2), want)


def test_a_replacement_reads_arrays_whose_weights_did_not_change_since_an_earlier_step():
    lost = _weight_stationary()
    outputs = [_pass(lost, step, TRAIN_PASS, version=0) for step in range(2)]
    replacement = _replacement_of(lost)  # lost in step 2: the arrays date from step 0
    outputs.append(_pass(lost, 2, TRAIN_PASS, version=0))
    assert not torch.equal(outputs[2], outputs[0])  # the arrays drifted meanwhile
    assert torch.equal(_pass(replacement, 2, TRAIN_PASS, version=0), outputs[2])
    # Later steps with new weights, and a retry of one, go on identically.
    assert torch.equal(_pass(replacement, 3, TRAIN_PASS, version=3), _pass(lost, 3, TRAIN_PASS, 3))
    assert torch.equal(_pass(replacement, 3, TRAIN_PASS, version=3), _pass(lost, 3, TRAIN_PASS, 3))


def test_a_replacement_whose_weights_changed_programs_them_afresh():
    lost = _weight_stationary()
    _pass(lost, 0, TRAIN_PASS, version=0)
    replacement = _replacement_of(lost)
    assert torch.equal(_pass(replacement, 1, TRAIN_PASS, 1), _pass(lost, 1, TRAIN_PASS, 1))
    assert replacement.stats()["pcm.programmings"] == 2
    assert "pcm.restored_programmings" not in replacement.stats()


def test_a_replacement_rewound_to_the_pass_it_inherited_starts_from_empty_arrays():
    lost = _weight_stationary()
    outputs = [_pass(lost, step, TRAIN_PASS, version=step) for step in range(2)]
    replacement = _replacement_of(lost)
    assert torch.equal(_pass(replacement, 1, TRAIN_PASS, version=1), outputs[1])


def test_the_pass_start_snapshot_keeps_no_second_copy_of_the_arrays():
    # Every train step reprograms every matrix (new weights): a snapshot holding the old
    # conductances would double the node's arrays by the end of the pass.
    backend = _weight_stationary(tile=PcmBackend.Config().tile.__class__(rows=16, cols=16))
    for step in range(3):
        _pass(backend, step, TRAIN_PASS, version=step)
    arrays = sum(_tensor_bytes(p) for p in backend._programmed.values())
    snapshot = backend._pass_start[1]
    assert all(not hasattr(p, "g_programmed_SRCIO") for p in snapshot.held.values())
    records = sum(p.nbytes for p in snapshot.held.values())
    assert records < 3 * 5100  # two matrices: a generator state and a digest each
    assert backend.stats()["pcm.array_state_bytes"] <= arrays + 2 * records + 64
    state = pickle.dumps(backend.pass_state())
    assert len(state) < 20_000 < arrays
    # Copy-on-write: a re-run still reads what the first attempt read.
    first = _pass(backend, 3, TRAIN_PASS, version=3)
    assert torch.equal(_pass(backend, 3, TRAIN_PASS, version=3), first)


def test_a_node_rewound_to_a_kept_state_reads_what_it_read_then():
    # MemoryX came back at step 2 (its checkpoint): the node's arrays go back to the state
    # the driver kept before step 2, not to empty arrays.
    node = _weight_stationary()
    _pass(node, 0, TRAIN_PASS, version=0)
    _pass(node, 1, TRAIN_PASS, version=1)
    _pass(node, 2, EVAL_PASS, version=2)
    kept = pickle.loads(pickle.dumps(node.pass_state()))
    want = _pass(node, 2, TRAIN_PASS, version=2)
    _pass(node, 3, TRAIN_PASS, version=3)
    node.adopt_pass_state(kept)
    assert torch.equal(_pass(node, 2, TRAIN_PASS, version=2), want)
    node.adopt_pass_state(None)  # back at the run's first step: empty arrays
    assert node.arrays_in_use == 0 and node.pass_state() is None

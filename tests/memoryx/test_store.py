"""Versioned parameter store: step versions, re-runs, commits and locking."""

from __future__ import annotations

import threading

import pytest
import torch

from memoryx.optim import Optimizer
from memoryx.store import ParameterStore, StepError

NUM_LAYERS = 4
# Long enough for a blocked thread to show it is blocked; tests wait on events, not sleeps,
# for everything that must happen, so this only bounds how long a failing test hangs.
JOIN_TIMEOUT_S = 10.0
BLOCKED_PROBE_S = 0.2


def _layers(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    # Distinct widths so that each layer has its own layout.
    return [
        {
            "weight": torch.randn(3 + i, 2 + i, generator=gen),
            "bias": torch.randn(3 + i, generator=gen),
        }
        for i in range(NUM_LAYERS)
    ]


def _grads(store: ParameterStore, layer: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=gen) for name, shape in store.layout(layer)}


def _adam() -> Optimizer:
    return Optimizer.Config(name="adam", lr=1e-2, weight_decay=0.01).build()


def _clone(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.clone() for name, t in weights.items()}


def _assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _full_state(store: ParameterStore) -> dict:
    """Everything a committed store holds, for bitwise comparison."""
    return store.state_dict()


def _assert_states_equal(a: dict, b: dict) -> None:
    assert len(a["layers"]) == len(b["layers"])
    for la, lb in zip(a["layers"], b["layers"], strict=True):
        assert la["version"] == lb["version"]
        assert la["num_updates"] == lb["num_updates"]
        _assert_equal(la["params"], lb["params"])
        assert la["optimizer_state"].keys() == lb["optimizer_state"].keys()
        for name in la["optimizer_state"]:
            _assert_equal(la["optimizer_state"][name], lb["optimizer_state"][name])


# --- construction and layout -------------------------------------------------------------


def test_init_copies_to_private_contiguous_fp32() -> None:
    source = {"w": torch.arange(12, dtype=torch.float64).reshape(3, 4).t(), "b": torch.ones(2)}
    assert not source["w"].is_contiguous()
    store = ParameterStore([source], _adam(), step=5)
    weights = store.weights(0, 5)
    assert weights["w"].dtype == torch.float32 and weights["w"].is_contiguous()
    assert torch.equal(weights["w"], source["w"].float())
    source["b"].add_(1.0)
    assert torch.equal(weights["b"], torch.ones(2))
    assert store.version(0) == 5


def test_layout_and_counts() -> None:
    store = ParameterStore(_layers(), _adam())
    assert store.num_layers == NUM_LAYERS
    assert store.layout(1) == [("weight", (4, 3)), ("bias", (4,))]
    assert store.num_params(0) == 3 * 2 + 3
    assert store.num_params() == sum(store.num_params(i) for i in range(NUM_LAYERS))
    with pytest.raises(ValueError, match=r"layer must be in \[0, 4\), got 4"):
        store.layout(NUM_LAYERS)


@pytest.mark.parametrize(
    ("layers", "step", "message"),
    [
        ([], 0, "layers must hold at least one layer"),
        ([{}], 0, "layer 0 must hold at least one parameter"),
        ([{"w": torch.zeros(1)}], -1, "step must be >= 0, got -1"),
    ],
)
def test_init_validation(layers, step: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ParameterStore(layers, _adam(), step=step)


# --- versions --------------------------------------------------------------------------------


def test_weights_serve_current_then_snapshot_and_never_mix() -> None:
    store = ParameterStore(_layers(), _adam(), step=3)
    before = store.weights(2, 3)
    before_copy = _clone(before)
    assert store.apply_gradients(2, 3, _grads(store, 2, seed=1))
    # What was handed out earlier is never written: copy-on-write.
    _assert_equal(before, before_copy)
    _assert_equal(store.weights(2, 3), before_copy)
    after = store.weights(2, 4)
    assert not torch.equal(after["weight"], before_copy["weight"])
    assert not torch.equal(after["bias"], before_copy["bias"])
    # Layers not yet updated serve only version 3.
    with pytest.raises(
        StepError, match=r"layer 1 has no weights for step 4; available versions: \[3\]"
    ):
        store.weights(1, 4)


@pytest.mark.parametrize("step", [2, 5, 6])
def test_weights_of_unavailable_step_raise(step: int) -> None:
    store = ParameterStore(_layers(), _adam(), step=3)
    store.apply_gradients(0, 3, _grads(store, 0, seed=1))
    with pytest.raises(
        StepError, match=rf"layer 0 has no weights for step {step}; available versions: \[3, 4\]"
    ):
        store.weights(0, step)


def test_apply_equals_direct_optimizer_update() -> None:
    layers = _layers()
    optimizer = _adam()
    store = ParameterStore(layers, optimizer)
    grads = [_grads(store, 0, seed=s) for s in range(3)]
    for step, g in enumerate(grads):
        assert store.apply_gradients(0, step, g)
        store.apply_gradients(1, step, _grads(store, 1, seed=9))
        store.apply_gradients(2, step, _grads(store, 2, seed=9))
        store.apply_gradients(3, step, _grads(store, 3, seed=9))
        store.commit(step)
    expected = _clone(layers[0])
    for name, param in expected.items():
        state = optimizer.init_state(param)
        for step, g in enumerate(grads, start=1):
            optimizer.update(param, g[name], state, step)
    _assert_equal(store.weights(0, 3), expected)


def test_bias_correction_counts_updates_not_the_start_step() -> None:
    """A store started at step 100 with fresh state must behave like torch from scratch."""
    layers = _layers()
    store = ParameterStore(layers, _adam(), step=100)
    param = torch.nn.Parameter(layers[0]["bias"].clone())
    reference = torch.optim.Adam([param], lr=1e-2, weight_decay=0.01, foreach=False)
    for step in range(100, 103):
        grads = _grads(store, 0, seed=step)
        store.apply_gradients(0, step, grads)
        param.grad = grads["bias"].clone()
        reference.step()
    assert torch.equal(store.weights(0, 103)["bias"], param.detach())


def test_duplicate_gradients_are_ignored() -> None:
    store = ParameterStore(_layers(), _adam())
    assert store.apply_gradients(1, 0, _grads(store, 1, seed=1))
    weights_after_first = _clone(store.weights(1, 1))
    # Even different gradient values are not applied a second time.
    assert store.apply_gradients(1, 0, _grads(store, 1, seed=2)) is False
    assert store.version(1) == 1
    _assert_equal(store.weights(1, 1), weights_after_first)


def test_duplicate_gradients_leave_optimizer_state_untouched() -> None:
    a = ParameterStore(_layers(), _adam())
    b = ParameterStore(_layers(), _adam())
    for store, num_pushes in ((a, 1), (b, 3)):
        for layer in range(NUM_LAYERS):
            for push in range(num_pushes):
                store.apply_gradients(layer, 0, _grads(store, layer, seed=10 + push))
        store.commit(0)
    _assert_states_equal(_full_state(a), _full_state(b))


@pytest.mark.parametrize(("step", "version"), [(1, 0), (5, 0), (0, 2)])
def test_gradients_for_wrong_step_raise(step: int, version: int) -> None:
    store = ParameterStore(_layers(), _adam())
    for k in range(version):
        for layer in range(NUM_LAYERS):
            store.apply_gradients(layer, k, _grads(store, layer, seed=k))
        store.commit(k)
    with pytest.raises(
        StepError,
        match=rf"layer 0 cannot take gradients of step {step}: it is at version {version}",
    ):
        store.apply_gradients(0, step, _grads(store, 0, seed=1))
    assert store.version(0) == version


def test_a_step_behind_a_later_one_is_already_applied_until_committed() -> None:
    """A pass of two steps run again: step 0's gradients reach layers at version 2; they
    are ignored while step 0 keeps its snapshot, and refused once it is committed."""
    store = ParameterStore(_layers(), _adam())
    for k in range(2):
        for layer in range(NUM_LAYERS):
            assert store.apply_gradients(layer, k, _grads(store, layer, seed=k))
    before = store.weights(0, 2)
    assert not store.apply_gradients(0, 0, _grads(store, 0, seed=9))
    assert all(torch.equal(before[n], t) for n, t in store.weights(0, 2).items())
    store.commit(0)
    with pytest.raises(StepError, match="cannot take gradients of step 0: it is at version 2"):
        store.apply_gradients(0, 0, _grads(store, 0, seed=9))
    assert not store.apply_gradients(0, 1, _grads(store, 0, seed=9))  # the step before


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda g: g.pop("bias"), r"must cover exactly \['weight', 'bias'\]; missing \['bias'\]"),
        (
            lambda g: g.update(extra=torch.zeros(1)),
            r"missing \[\], unknown \['extra'\]",
        ),
        (
            lambda g: g.update(weight=torch.zeros(2, 3)),
            r"param 'weight' must be float32 of shape \(3, 2\), got torch.float32 of shape \(2, 3\)",
        ),
        (
            lambda g: g.update(bias=torch.zeros(3, dtype=torch.bfloat16)),
            r"param 'bias' must be float32 of shape \(3,\), got torch.bfloat16 of shape \(3,\)",
        ),
    ],
    ids=["missing", "unknown", "shape", "dtype"],
)
def test_bad_gradients_raise_and_change_nothing(mutate, message: str) -> None:
    store = ParameterStore(_layers(), _adam())
    before = _clone(store.weights(0, 0))
    grads = _grads(store, 0, seed=1)
    mutate(grads)
    with pytest.raises(ValueError, match=message):
        store.apply_gradients(0, 0, grads)
    assert store.version(0) == 0
    _assert_equal(store.weights(0, 0), before)
    # The store still takes the correct gradient and holds no stray snapshot.
    assert store.apply_gradients(0, 0, _grads(store, 0, seed=1))
    with pytest.raises(StepError, match=r"available versions: \[0, 1\]"):
        store.weights(0, 2)


# --- commit and rollback ----------------------------------------------------------------------


def test_commit_requires_every_layer_and_drops_snapshots() -> None:
    store = ParameterStore(_layers(), _adam(), step=7)
    store.apply_gradients(0, 7, _grads(store, 0, seed=1))
    store.apply_gradients(2, 7, _grads(store, 2, seed=1))
    with pytest.raises(
        StepError,
        match=r"cannot commit step 7: layers \[1, 3\] are not updated yet \(versions \[7, 7\], need 8\)",
    ):
        store.commit(7)
    # A refused commit keeps the snapshots needed by a re-run.
    store.weights(0, 7)
    store.apply_gradients(1, 7, _grads(store, 1, seed=1))
    store.apply_gradients(3, 7, _grads(store, 3, seed=1))
    store.commit(7)
    for layer in range(NUM_LAYERS):
        with pytest.raises(StepError, match=r"available versions: \[8\]"):
            store.weights(layer, 7)
        assert store.version(layer) == 8
    store.commit(7)  # idempotent: a retried commit RPC is harmless


def test_rollback_restores_weights_and_optimizer_state() -> None:
    store = ParameterStore(_layers(), _adam())
    for layer in range(NUM_LAYERS):
        store.apply_gradients(layer, 0, _grads(store, layer, seed=layer))
    store.commit(0)
    committed = _full_state(store)
    store.apply_gradients(0, 1, _grads(store, 0, seed=20))
    store.apply_gradients(3, 1, _grads(store, 3, seed=20))
    assert store.rollback(1) == [0, 3]
    assert [store.version(i) for i in range(NUM_LAYERS)] == [1] * NUM_LAYERS
    _assert_states_equal(_full_state(store), committed)


def test_rollback_of_committed_step_raises() -> None:
    store = ParameterStore(_layers(), _adam())
    for layer in range(NUM_LAYERS):
        store.apply_gradients(layer, 0, _grads(store, layer, seed=layer))
    store.commit(0)
    with pytest.raises(StepError, match=r"cannot roll back step 0: layers \[0, 1, 2, 3\]"):
        store.rollback(0)
    assert store.version(0) == 1


# --- re-running a failed step -----------------------------------------------------------------


class InjectedFailure(Exception):
    pass


def _fake_gradients(
    all_weights: list[dict[str, torch.Tensor]], layer: int, data: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Deterministic gradient of one layer that depends on every layer's weights and the data."""
    coupling = sum(w["weight"].sum() + w["bias"].sum() for w in all_weights) * 1e-2
    return {name: torch.tanh(w * data[layer] + coupling) for name, w in all_weights[layer].items()}


def _train_step(
    store: ParameterStore, step: int, data: torch.Tensor, fail_after: int | None = None
) -> list[bool]:
    """Forward over every layer, backward last layer first, then commit."""
    all_weights = [store.weights(layer, step) for layer in range(store.num_layers)]
    applied = []
    for count, layer in enumerate(reversed(range(store.num_layers))):
        if count == fail_after:
            raise InjectedFailure
        applied.append(
            store.apply_gradients(layer, step, _fake_gradients(all_weights, layer, data))
        )
    store.commit(step)
    return applied


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize("fail_after", [0, 1, 3])
def test_rerun_of_failed_step_equals_uninterrupted_run(name: str, fail_after: int) -> None:
    num_steps, failing_step = 5, 2
    data = torch.randn(num_steps, NUM_LAYERS, generator=torch.Generator().manual_seed(11))
    config = Optimizer.Config(name=name, lr=1e-2, weight_decay=0.01)

    reference = ParameterStore(_layers(), config.build())
    for step in range(num_steps):
        assert _train_step(reference, step, data[step]) == [True] * NUM_LAYERS

    store = ParameterStore(_layers(), config.build())
    for step in range(num_steps):
        if step == failing_step:
            with pytest.raises(InjectedFailure):
                _train_step(store, step, data[step], fail_after=fail_after)
            # Layers updated before the failure are one version ahead.
            versions = [store.version(layer) for layer in range(NUM_LAYERS)]
            assert versions == [step] * (NUM_LAYERS - fail_after) + [step + 1] * fail_after
            applied = _train_step(store, step, data[step])
            assert applied == [False] * fail_after + [True] * (NUM_LAYERS - fail_after)
        else:
            _train_step(store, step, data[step])

    _assert_states_equal(_full_state(store), _full_state(reference))


def test_rerun_with_mixed_weights_would_differ() -> None:
    """The re-run test can fail: feeding version k+1 weights of updated layers changes the result."""
    data = torch.randn(3, NUM_LAYERS, generator=torch.Generator().manual_seed(11))
    config = Optimizer.Config(name="adam", lr=1e-2)
    reference = ParameterStore(_layers(), config.build())
    for step in range(3):
        _train_step(reference, step, data[step])

    store = ParameterStore(_layers(), config.build())
    _train_step(store, 0, data[0])
    with pytest.raises(InjectedFailure):
        _train_step(store, 1, data[1], fail_after=2)
    mixed = [
        store.weights(layer, store.version(layer)) for layer in range(NUM_LAYERS)
    ]  # newest weights of every layer: versions 1 and 2 mixed
    for layer in reversed(range(NUM_LAYERS)):
        store.apply_gradients(layer, 1, _fake_gradients(mixed, layer, data[1]))
    store.commit(1)
    _train_step(store, 2, data[2])
    final, expected = _full_state(store), _full_state(reference)
    assert not torch.equal(
        final["layers"][0]["params"]["weight"], expected["layers"][0]["params"]["weight"]
    )


# --- locking ----------------------------------------------------------------------------------


class _BlockingOptimizer(Optimizer):
    """SGD that blocks inside the update of one layer until released."""

    name = "sgd"

    def __init__(self, blocked_shape: tuple[int, ...]) -> None:
        super().__init__(Optimizer.Config(name="sgd", lr=0.1, momentum=0.0))
        self._inner = self.config.build()
        self.blocked_shape = blocked_shape
        self.entered = threading.Event()
        self.release = threading.Event()

    def init_state(self, param: torch.Tensor) -> dict[str, torch.Tensor]:
        return self._inner.init_state(param)

    def _update(self, param, grad, state, step) -> None:
        if tuple(param.shape) == self.blocked_shape:
            self.entered.set()
            assert self.release.wait(JOIN_TIMEOUT_S)
        self._inner.update(param, grad, state, step)


def _start(target, *args) -> tuple[threading.Thread, list]:
    result: list = []
    thread = threading.Thread(target=lambda: result.append(target(*args)), daemon=True)
    thread.start()
    return thread, result


def test_different_layers_do_not_block_each_other_same_layer_serialises() -> None:
    layers = _layers()
    optimizer = _BlockingOptimizer(blocked_shape=tuple(layers[0]["weight"].shape))
    store = ParameterStore(layers, optimizer)
    grads = [_grads(store, layer, seed=layer) for layer in range(NUM_LAYERS)]

    blocked, blocked_result = _start(store.apply_gradients, 0, 0, grads[0])
    assert optimizer.entered.wait(JOIN_TIMEOUT_S)
    try:
        # Other layers proceed while layer 0 is held mid-update.
        for layer in range(1, NUM_LAYERS):
            other, other_result = _start(store.apply_gradients, layer, 0, grads[layer])
            other.join(JOIN_TIMEOUT_S)
            assert other_result == [True]
            assert store.weights(layer, 1)
        # The same layer waits: neither the reader nor a duplicate push gets through.
        reader, reader_result = _start(store.weights, 0, 0)
        duplicate, duplicate_result = _start(store.apply_gradients, 0, 0, grads[0])
        reader.join(BLOCKED_PROBE_S)
        duplicate.join(BLOCKED_PROBE_S)
        assert reader.is_alive() and duplicate.is_alive()
        assert blocked.is_alive()
    finally:
        optimizer.release.set()
    for thread in (blocked, reader, duplicate):
        thread.join(JOIN_TIMEOUT_S)
        assert not thread.is_alive()
    assert blocked_result == [True]
    assert duplicate_result == [False]  # serialised after the update, so it sees version 1
    # The reader asked for step 0 and got version 0 (the snapshot), not a half update.
    _assert_equal(reader_result[0], layers[0])
    store.commit(0)


def _push_concurrently(
    store: ParameterStore, step: int, grads: list[dict[str, torch.Tensor]], num_threads: int
) -> list[tuple[int, bool]]:
    """Push layer ``i % num_layers`` from thread ``i``, all released at once; (layer, applied)."""
    barrier = threading.Barrier(num_threads)
    results: list[tuple[int, bool]] = []
    results_lock = threading.Lock()

    def push(thread_index: int) -> None:
        layer = thread_index % store.num_layers
        barrier.wait(JOIN_TIMEOUT_S)
        applied = store.apply_gradients(layer, step, grads[layer])
        with results_lock:
            results.append((layer, applied))

    threads = [threading.Thread(target=push, args=(i,), daemon=True) for i in range(num_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN_TIMEOUT_S)
        assert not thread.is_alive()
    return results


def test_concurrent_pushes_apply_each_update_exactly_once() -> None:
    store = ParameterStore(_layers(), _adam())
    reference = ParameterStore(_layers(), _adam())
    for step in range(3):
        grads = [_grads(store, layer, seed=100 * step + layer) for layer in range(NUM_LAYERS)]
        for layer in range(NUM_LAYERS):
            reference.apply_gradients(layer, step, grads[layer])
        reference.commit(step)
        # Two threads per layer: exactly one of them applies the update.
        results = _push_concurrently(store, step, grads, num_threads=2 * NUM_LAYERS)
        for layer in range(NUM_LAYERS):
            assert sorted(applied for lay, applied in results if lay == layer) == [False, True]
        store.commit(step)
    _assert_states_equal(_full_state(store), _full_state(reference))


# --- state dict -------------------------------------------------------------------------------


def test_state_dict_round_trip_continues_identically() -> None:
    config = Optimizer.Config(name="sgd", lr=0.05, momentum=0.9, nesterov=True)
    data = torch.randn(4, NUM_LAYERS, generator=torch.Generator().manual_seed(3))
    reference = ParameterStore(_layers(), config.build(), step=10)
    for step in range(10, 14):
        _train_step(reference, step, data[step - 10])

    store = ParameterStore(_layers(), config.build(), step=10)
    for step in range(10, 12):
        _train_step(store, step, data[step - 10])
    restored = ParameterStore.from_state_dict(store.state_dict(), config.build())
    # The restored store owns its tensors.
    restored_weights = restored.weights(0, 12)
    assert restored_weights["weight"].data_ptr() != store.weights(0, 12)["weight"].data_ptr()
    for step in range(12, 14):
        _train_step(restored, step, data[step - 10])
    _assert_states_equal(_full_state(restored), _full_state(reference))


def test_state_dict_refuses_uncommitted_step() -> None:
    store = ParameterStore(_layers(), _adam())
    store.apply_gradients(2, 0, _grads(store, 2, seed=1))
    with pytest.raises(
        ValueError, match=r"layers \[2\] still hold snapshots of steps \[0\]; commit the step first"
    ):
        store.state_dict()


def test_committed_state_dict_of_a_step_in_flight_is_the_state_before_it() -> None:
    store = ParameterStore(_layers(), _adam())
    before = store.state_dict()
    last = store.num_layers - 1
    store.apply_gradients(last, 0, _grads(store, last, seed=1))
    assert store.committed_step() == 0
    _assert_states_equal(store.state_dict(committed_only=True), before)
    for layer in reversed(range(store.num_layers - 1)):
        store.apply_gradients(layer, 0, _grads(store, layer, seed=layer))
    store.commit(0)
    assert store.committed_step() == 1
    _assert_states_equal(store.state_dict(committed_only=True), store.state_dict())


def test_from_state_dict_rejects_state_of_other_rule() -> None:
    store = ParameterStore(_layers(), Optimizer.Config(name="sgd", momentum=0.0).build())
    with pytest.raises(
        ValueError,
        match=r"layer 0 param 'weight' holds \[\], but SGD with this config needs \['momentum_buffer'\]",
    ):
        ParameterStore.from_state_dict(store.state_dict(), Optimizer.Config(name="sgd").build())

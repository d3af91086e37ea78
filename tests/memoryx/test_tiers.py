"""TieredStore: layers on disk, a RAM cache within budget, bitwise the in-RAM store."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from memoryx.checkpoint import (
    MANIFEST_NAME,
    load_checkpoint,
    load_checkpoint_dir,
    read_manifest,
    save_checkpoint_part,
    write_manifest,
)
from memoryx.config import MemoryXConfig, partition
from memoryx.layer_files import layer_state_bytes, min_budget_bytes
from memoryx.optim import Optimizer
from memoryx.sparsity import Sparsity, UpdateSchedule
from memoryx.store import NonFiniteUpdate, ParameterStore, StepError
from memoryx.tier_cache import STATE, WEIGHTS, StreamOrder
from memoryx.tiers import TieredStore

NUM_LAYERS = 8
WIDTH = 24
CONFIG = Optimizer.Config(name="adamw", lr=1e-2, weight_decay=0.1)


def _layers(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        {
            "weight": torch.randn(WIDTH, WIDTH, generator=gen),
            "bias": torch.randn(WIDTH, generator=gen),
        }
        for _ in range(NUM_LAYERS)
    ]


def _layer_bytes() -> tuple[int, int]:
    shapes = {"weight": (WIDTH, WIDTH), "bias": (WIDTH,)}
    return layer_state_bytes(shapes, CONFIG.build())


def _tiered(
    tmp_path: Path,
    budget: int,
    layers=None,
    sparsity: Sparsity | None = None,
    offset: int = 0,
    prefetch: bool = True,
) -> TieredStore:
    store = TieredStore(
        CONFIG.build(),
        spill_dir=tmp_path / "spill",
        ram_budget_bytes=budget,
        layer_offset=offset,
        prefetch=prefetch,
    )
    for layer in layers if layers is not None else _layers():
        store.add_layer(layer)
    return store.finish(sparsity)


def _grads(store: ParameterStore, layer: int, step: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + layer)
    return {name: torch.randn(shape, generator=gen) for name, shape in store.layout(layer)}


def _stream_step(store: ParameterStore, step: int, *, stop_after: int | None = None) -> None:
    """One step the way the coordinator streams it: forward 0..L-1, backward L-1..0."""
    ids = list(store.layer_ids)
    for layer in ids:
        store.weights(layer, step)
        store.masks(layer, step)
    for count, layer in enumerate(reversed(ids)):
        if stop_after is not None and count == stop_after:
            return
        store.weights(layer, step)
        store.apply_gradients(layer, step, _grads(store, layer, step))
    store.commit(step)


def _assert_same_state(a: ParameterStore, b: ParameterStore) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert len(sa["layers"]) == len(sb["layers"])
    for la, lb in zip(sa["layers"], sb["layers"], strict=True):
        assert (la["version"], la["num_updates"]) == (lb["version"], lb["num_updates"])
        assert list(la["params"]) == list(lb["params"])
        for name in la["params"]:
            assert torch.equal(la["params"][name], lb["params"][name]), name
            for key in la["optimizer_state"][name]:
                assert torch.equal(
                    la["optimizer_state"][name][key], lb["optimizer_state"][name][key]
                )
        assert la["masks"].keys() == lb["masks"].keys()
        for name in la["masks"]:
            assert torch.equal(la["masks"][name], lb["masks"][name])


def test_state_four_times_the_budget_trains_bitwise_within_budget(tmp_path: Path) -> None:
    weights, state = _layer_bytes()
    budget = min_budget_bytes(weights, state)
    ram = ParameterStore(_layers(), CONFIG.build())
    tiered = _tiered(tmp_path, budget)
    assert tiered.state_bytes == ram.state_bytes >= 4 * budget
    for step in range(3):
        _stream_step(ram, step)
        _stream_step(tiered, step)
        for layer in range(NUM_LAYERS):
            assert all(
                torch.equal(a, b)
                for a, b in zip(
                    ram.weights(layer, step + 1).values(),
                    tiered.weights(layer, step + 1).values(),
                    strict=True,
                )
            )
    assert 0 < tiered.peak_resident_bytes <= budget
    read, written = tiered.io_bytes()
    # Every step reads and writes the whole state at least once: it does not fit in RAM.
    assert read >= 3 * tiered.state_bytes and written >= 3 * tiered.state_bytes
    _assert_same_state(ram, tiered)
    tiered.close()


def test_a_budget_that_holds_the_state_reads_each_layer_once(tmp_path: Path) -> None:
    # Without the prefetch thread the count is exact (prefetch may also read a version
    # that an update is about to replace).
    tiered = _tiered(tmp_path, budget=10**8, prefetch=False)
    for step in range(4):
        _stream_step(tiered, step)
    read, written = tiered.io_bytes()
    # The first step reads everything; later ones find the updated layers cached.
    assert read == tiered.state_bytes
    assert written == 5 * tiered.state_bytes  # the load, then every step
    tiered.close()


def test_rerun_after_a_failed_half_step_serves_disk_snapshots(tmp_path: Path) -> None:
    weights, state = _layer_bytes()
    ram = ParameterStore(_layers(), CONFIG.build())
    tiered = _tiered(tmp_path, min_budget_bytes(weights, state))
    for store in (ram, tiered):
        _stream_step(store, 0)
        _stream_step(store, 1, stop_after=3)  # layers 7, 6, 5 are at version 2 now
        assert [store.version(i) for i in range(NUM_LAYERS)] == [1] * 5 + [2] * 3
        with pytest.raises(StepError, match="cannot commit step 1"):
            store.commit(1)
        # The re-run streams version 1 again; updated layers ignore the repeated gradient.
        assert not store.apply_gradients(7, 1, _grads(store, 7, 1))
        _stream_step(store, 1)
    _assert_same_state(ram, tiered)
    tiered.close()  # waits for the deletions the commits queued
    files = sorted(p.name for p in (tmp_path / "spill").rglob("layer-*"))
    assert files == [f"layer-{i:05d}-v00000002.safetensors" for i in range(NUM_LAYERS)]


def test_rollback_is_refused_once_a_layer_kept_only_its_weights(tmp_path: Path) -> None:
    ram = ParameterStore(_layers(), CONFIG.build())
    tiered = _tiered(tmp_path, 10**8)
    for store in (ram, tiered):
        _stream_step(store, 0)
    assert tiered.rollback(1) == []  # no layer took step 1: nothing to undo
    _stream_step(tiered, 1, stop_after=4)
    with pytest.raises(
        StepError, match=r"layers \[4, 5, 6, 7\] took its update.*version-1 weights"
    ):
        tiered.rollback(1)
    # The re-run still serves version 1 and ends bitwise as a run without the failure.
    _stream_step(tiered, 1)
    _stream_step(ram, 1)
    _assert_same_state(ram, tiered)
    tiered.close()


def _allocated_bytes(directory: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in directory.rglob("*") if p.is_file())


@pytest.mark.parametrize("punch", [True, False])
def test_a_step_in_flight_holds_the_state_and_its_weights_on_disk_not_twice_the_state(
    tmp_path: Path, monkeypatch, punch: bool
) -> None:
    import errno

    if not punch:  # a file system without hole punching: snapshots rewritten weights-only

        def no_punch(fd, start, length):
            raise OSError(errno.EOPNOTSUPP, "not here")

        monkeypatch.setattr("memoryx.layer_files.punch_hole", no_punch)
    width = 256  # layers of 0.8 MB: file headers and block rounding are small beside them
    gen = torch.Generator().manual_seed(0)
    layers = [
        {
            "weight": torch.randn(width, width, generator=gen),
            "bias": torch.randn(width, generator=gen),
        }
        for _ in range(6)
    ]
    ram = ParameterStore(layers, CONFIG.build())
    tiered = TieredStore(
        CONFIG.build(),
        spill_dir=tmp_path / "spill",
        ram_budget_bytes=10**8,
        background_writes=False,
    )
    for layer in layers:
        tiered.add_layer(layer)
    tiered.finish()
    weights_bytes = 4 * sum(t.numel() for layer in layers for t in layer.values())
    assert tiered.state_bytes == 3 * weights_bytes  # AdamW: weights and two moments
    for store in (ram, tiered):
        _stream_step(store, 0)
    # Step 1 taken by every layer, not committed: the peak of a step.
    for layer in reversed(tiered.layer_ids):
        tiered.weights(layer, 1)
        assert tiered.apply_gradients(layer, 1, _grads(tiered, layer, 1))
    held = _allocated_bytes(tmp_path / "spill")
    expected = tiered.state_bytes + weights_bytes
    assert expected <= held <= expected + 6 * 2 * 16384  # headers and partial blocks
    assert held < 1.4 * tiered.state_bytes  # before: twice the state
    # A re-run of step 1 from the snapshots' weights is bitwise the uninterrupted step.
    for layer in tiered.layer_ids:
        assert torch.equal(tiered.weights(layer, 1)["weight"], ram.weights(layer, 1)["weight"])
    _stream_step(ram, 1)
    _stream_step(tiered, 1)
    _assert_same_state(ram, tiered)
    tiered.close()
    assert _allocated_bytes(tmp_path / "spill") <= tiered.state_bytes + 6 * 16384


def test_commit_leaves_a_manifest_of_current_files(tmp_path: Path) -> None:
    import json

    tiered = _tiered(tmp_path, 10**8)
    _stream_step(tiered, 0)
    manifest = json.loads((tmp_path / "spill" / "manifest.json").read_text())
    assert [e["version"] for e in manifest["layers"]] == [1] * NUM_LAYERS
    for entry in manifest["layers"]:
        assert (tmp_path / "spill" / entry["file"]).is_file()
    tiered.close()


def test_sparse_tiered_store_equals_sparse_ram_store(tmp_path: Path) -> None:
    layers = _layers()
    config = Sparsity.Config(
        algorithm="set", sparsity=0.75, update=UpdateSchedule.Config(freq=2, stop=100)
    )
    shapes = {
        f"{i}.{n}": tuple(t.shape) for i, layer in enumerate(layers) for n, t in layer.items()
    }
    ram = ParameterStore(layers, CONFIG.build(), sparsity=config.build(shapes))
    tiered = _tiered(tmp_path, 10**8, layers, sparsity=config.build(shapes))
    for step in range(4):
        _stream_step(ram, step)
        _stream_step(tiered, step)
    assert [tiered.num_kept(i) for i in range(NUM_LAYERS)] == [
        ram.num_kept(i) for i in range(NUM_LAYERS)
    ]
    _assert_same_state(ram, tiered)
    tiered.close()


def test_checkpoint_links_files_and_restores_bitwise(tmp_path: Path) -> None:
    weights, state = _layer_bytes()
    # No prefetch thread: nothing but the save itself can read while it runs.
    tiered = _tiered(tmp_path, min_budget_bytes(weights, state), prefetch=False)
    for step in range(2):
        _stream_step(tiered, step)
    peak, resident, read = tiered.peak_resident_bytes, tiered.resident_bytes, tiered.io_bytes()[0]
    part, num_bytes = save_checkpoint_part(tiered, tmp_path / "ckpt")
    # Hard links: the checkpoint read nothing and pulled no tensor through RAM.
    assert tiered.io_bytes()[0] == read
    assert tiered.resident_bytes == resident and tiered.peak_resident_bytes == peak
    write_manifest(tmp_path / "ckpt", [part], optimizer=CONFIG)
    assert not part.exists() and (tmp_path / "ckpt" / MANIFEST_NAME).is_file()
    entries = read_manifest(tmp_path / "ckpt")["layers"]
    assert [e["version"] for e in entries] == [2] * NUM_LAYERS
    assert num_bytes == sum((tmp_path / "ckpt" / e["file"]).stat().st_size for e in entries)
    assert os.path.samefile(tmp_path / "ckpt" / entries[0]["file"], tiered.committed_files()[0][0])
    # Loaded into RAM (the plain loader reads directories) and onto disk again: both equal.
    in_ram, extra = load_checkpoint(tmp_path / "ckpt", CONFIG.build())
    assert extra == {}
    _assert_same_state(tiered, in_ram)
    again = load_checkpoint_dir(
        tmp_path / "ckpt", CONFIG.build(), spill_dir=tmp_path / "spill2", ram_budget_bytes=10**8
    )
    _assert_same_state(tiered, again)
    # Training on continues identically from both.
    for store in (tiered, again, in_ram):
        _stream_step(store, 2)
    _assert_same_state(tiered, again)
    _assert_same_state(tiered, in_ram)
    tiered.close()
    again.close()


def test_checkpoint_of_two_shards_is_one_directory_with_the_manifest_last(tmp_path: Path) -> None:
    layers = _layers()
    whole = ParameterStore(layers, CONFIG.build())
    shards = [
        ParameterStore(layers[:3], CONFIG.build()),
        _tiered(tmp_path, 10**8, layers[3:], offset=3),
    ]
    assert [list(s.layer_ids) for s in shards] == [[0, 1, 2], [3, 4, 5, 6, 7]]
    for step in range(2):
        _stream_step(whole, step)
        for shard in shards:
            _stream_step(shard, step)
    parts = [save_checkpoint_part(s, tmp_path / "ckpt")[0] for s in shards]
    # Until the manifest is written, the directory is no checkpoint.
    with pytest.raises(ValueError, match="has no manifest.json"):
        read_manifest(tmp_path / "ckpt")
    with pytest.raises(ValueError, match=r"cover layers \[3, 4, 5, 6, 7\]"):
        write_manifest(tmp_path / "ckpt", parts[1:], optimizer=CONFIG)
    write_manifest(tmp_path / "ckpt", parts, optimizer=CONFIG)
    _assert_same_state(whole, load_checkpoint(tmp_path / "ckpt", CONFIG.build())[0])
    second = load_checkpoint_dir(tmp_path / "ckpt", CONFIG.build(), layers=range(3, 8))
    assert list(second.layer_ids) == [3, 4, 5, 6, 7]
    shards[1].close()


def test_layer_offset_names_model_layers(tmp_path: Path) -> None:
    store = ParameterStore(_layers()[:2], CONFIG.build(), layer_offset=5)
    assert list(store.layer_ids) == [5, 6]
    with pytest.raises(ValueError, match=r"layer must be in \[5, 7\), got 0"):
        store.weights(0, 0)
    tiered = _tiered(tmp_path, 10**8, _layers()[:2], offset=5)
    assert tiered.layout(6) == store.layout(6)
    tiered.close()


# --- config -------------------------------------------------------------------------------


def _shapes() -> list[dict[str, tuple[int, ...]]]:
    return [{"weight": (WIDTH, WIDTH), "bias": (WIDTH,)}] * NUM_LAYERS


def test_budget_below_the_layer_in_flight_is_refused_with_numbers(tmp_path: Path) -> None:
    weights, state = _layer_bytes()
    need = min_budget_bytes(weights, state)
    config = MemoryXConfig(ram_budget_bytes=need - 1, spill_dir=str(tmp_path))
    with pytest.raises(ValueError) as info:
        config.check(_shapes(), CONFIG)
    message = str(info.value)
    assert f"memoryx.ram_budget_bytes = {need - 1}" in message
    assert f"{need} bytes in all" in message and f"({state} bytes)" in message
    MemoryXConfig(ram_budget_bytes=need, spill_dir=str(tmp_path)).check(_shapes(), CONFIG)


def test_unwritable_spill_dir_is_refused(tmp_path: Path) -> None:
    # A regular file where a directory must be: refused even for root, who ignores modes.
    (tmp_path / "a-file").write_text("")
    config = MemoryXConfig(ram_budget_bytes=10**8, spill_dir=str(tmp_path / "a-file" / "spill"))
    with pytest.raises(ValueError) as info:
        config.check(_shapes(), CONFIG)
    assert f"memoryx.spill_dir = {str(tmp_path / 'a-file' / 'spill')!r} is not a writable" in str(
        info.value
    )


def test_disk_too_small_for_the_state_is_refused(tmp_path: Path, monkeypatch) -> None:
    import shutil

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(
        "memoryx.config.shutil.disk_usage",
        lambda path: usage._replace(free=1000),
    )
    config = MemoryXConfig(ram_budget_bytes=10**8, spill_dir=str(tmp_path))
    weights, state = _layer_bytes()
    total = NUM_LAYERS * (weights + state)
    with pytest.raises(ValueError) as info:
        config.check(_shapes(), CONFIG)
    assert "has 1000 bytes free" in str(info.value)
    # The state and the weights of one step in flight: a third more under AdamW, not twice.
    snapshots = NUM_LAYERS * weights
    assert 3 * snapshots == total
    assert (
        f"needs {total + snapshots} bytes: the state ({total} bytes) and the weights of one "
        in (str(info.value))
    )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"num_servers": 0}, "num_servers = 0 must be at least 1"),
        ({"ram_budget_bytes": 0, "spill_dir": "x"}, "ram_budget_bytes = 0 must be positive"),
        ({"ram_budget_bytes": 10}, "set both"),
        ({"spill_dir": "x"}, "set both"),
    ],
)
def test_config_validation(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MemoryXConfig(**fields)


@pytest.mark.parametrize(
    ("sizes", "servers", "expected"),
    [
        ([1] * 8, 2, [range(0, 4), range(4, 8)]),
        ([1] * 8, 1, [range(0, 8)]),
        ([10, 1, 1, 1], 2, [range(0, 1), range(1, 4)]),
        ([1, 1, 1, 10], 2, [range(0, 3), range(3, 4)]),
        ([1, 1, 1], 3, [range(0, 1), range(1, 2), range(2, 3)]),
    ],
)
def test_partition_is_contiguous_and_balanced(sizes, servers, expected) -> None:
    assert partition(sizes, servers) == expected


def test_partition_refuses_more_servers_than_layers() -> None:
    with pytest.raises(ValueError, match="num_servers = 3 must be between 1 and the model's 2"):
        partition([1, 1], 3)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_nonfinite_gradient_is_never_written_and_rolls_the_step_back(tmp_path, bad):
    store = _tiered(tmp_path, budget=10**9)
    ids = list(store.layer_ids)
    for layer in reversed(ids):
        store.apply_gradients(layer, 0, _grads(store, layer, 0))
    store.commit(0)
    before = store.state_dict()
    grads = _grads(store, ids[-1], 1)
    grads["weight"][0, 0] = bad
    # The first layer of the step: nothing taken yet, so nothing to undo.
    with pytest.raises(NonFiniteUpdate, match="rolled the step back in every layer"):
        store.apply_gradients(ids[-1], 1, grads)
    after = store.state_dict()
    for old, new in zip(before["layers"], after["layers"], strict=True):
        assert new["version"] == 1
        for name, tensor in old["params"].items():
            assert torch.equal(tensor, new["params"][name])
    # The re-run of step 1 now applies cleanly.
    for layer in reversed(ids):
        assert store.apply_gradients(layer, 1, _grads(store, layer, 1))
    store.commit(1)
    assert all(torch.isfinite(t).all() for t in store.state_dict()["layers"][0]["params"].values())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_nonfinite_gradient_after_other_layers_took_the_step_is_never_committed(tmp_path, bad):
    store = _tiered(tmp_path, budget=10**9)
    ids = list(store.layer_ids)
    for layer in reversed(ids):
        store.apply_gradients(layer, 0, _grads(store, layer, 0))
    store.commit(0)
    first = store.weights(ids[0], 1)
    last = ids[-1]
    store.apply_gradients(last, 1, _grads(store, last, 1))  # the last layer takes step 1 first
    grads = _grads(store, ids[0], 1)
    grads["weight"][0, 0] = bad
    with pytest.raises(
        NonFiniteUpdate, match=rf"layer {ids[0]}: the gradient of 'weight'.*layers \[{last}\] had"
    ):
        store.apply_gradients(ids[0], 1, grads)
    assert store.version(ids[0]) == 1 and all(
        torch.equal(a, b)
        for a, b in zip(first.values(), store.weights(ids[0], 1).values(), strict=True)
    )
    with pytest.raises(StepError, match="cannot commit step 1: a non-finite update"):
        store.commit(1)
    with pytest.raises(ValueError, match="cannot save uncommitted state"):
        store.state_dict()
    store.close()
    for path in (tmp_path / "spill").glob("layer-*"):  # nothing non-finite was ever written
        loaded = load_file(path)
        assert all(torch.isfinite(t).all() for k, t in loaded.items() if not k.startswith("m/"))


def test_stream_order_runs_forward_then_backward_with_updates():
    order = StreamOrder(3)
    order.advance(0)
    assert order.upcoming() == [
        (1, WEIGHTS),
        (2, WEIGHTS),
        (2, STATE),
        (2, WEIGHTS),
        (1, STATE),
        (1, WEIGHTS),
        (0, STATE),
        (0, WEIGHTS),
        (0, WEIGHTS),
    ]
    assert order.distance(1, WEIGHTS) == 1  # next in the forward pass
    assert order.distance(2, STATE) == 3  # first update of the backward pass
    order.advance(2)
    order.advance(2)  # the last layer again: the backward pass starts
    assert order.cursor == (2, -1)
    assert order.distance(1, STATE) == 1


def test_updated_layers_are_written_off_the_step_and_durable_at_commit(tmp_path, monkeypatch):
    import threading

    import memoryx.tiers as tiers

    tiered = _tiered(tmp_path, 10**7)
    ram = ParameterStore(_layers(), CONFIG.build())
    _stream_step(ram, 0)
    release = threading.Event()
    real_save = tiers.save_file

    def held_save(tensors, path, metadata=None):
        assert release.wait(10), "the test never released the writer"
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(tiers, "save_file", held_save)
    last = NUM_LAYERS - 1
    # The update returns while its file is still unwritten: the write is not on the step's path.
    assert tiered.apply_gradients(last, 0, _grads(tiered, last, 0))
    written = tmp_path / "spill" / tiers.version_file_name(last, 1)
    assert not written.exists()
    assert torch.equal(tiered.weights(last, 1)["weight"], ram.weights(last, 1)["weight"])
    for layer in reversed(range(last)):
        tiered.apply_gradients(layer, 0, _grads(tiered, layer, 0))
    committed = threading.Thread(target=tiered.commit, args=(0,))
    committed.start()
    committed.join(0.3)
    assert committed.is_alive()  # the commit waits for the step's writes
    release.set()
    committed.join(10)
    assert not committed.is_alive() and written.exists()
    _stream_step(ram, 1)
    _stream_step(tiered, 1)
    _assert_same_state(ram, tiered)
    tiered.close()


def test_a_failed_background_write_fails_the_commit(tmp_path, monkeypatch):
    import memoryx.tiers as tiers

    tiered = _tiered(tmp_path, 10**7)

    def full_disk(tensors, path, metadata=None):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tiers, "save_file", full_disk)
    # The failure surfaces in the next update that queues a write, or else in the commit.
    raised = None
    for layer in reversed(range(NUM_LAYERS)):
        try:
            tiered.apply_gradients(layer, 0, _grads(tiered, layer, 0))
        except OSError as exc:
            raised = exc
            break
    if raised is None:
        with pytest.raises(OSError) as failed:
            tiered.commit(0)
        raised = failed.value
    assert "could not be written" in str(raised) and "No space left" in str(raised)
    with pytest.raises((OSError, StepError)):
        tiered.commit(0)  # never a commit of a step whose files are not all on disk

"""Atomic MemoryX checkpoints: round trip, crash safety, and loud failures."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest
import torch

from memoryx.checkpoint import (
    checkpoint_name,
    confined_path,
    load_checkpoint,
    load_confined_checkpoint,
    save_checkpoint,
)
from memoryx.optim import Optimizer
from memoryx.store import ParameterStore

NUM_LAYERS = 3
CONFIG = Optimizer.Config(name="adamw", lr=1e-2, weight_decay=0.1)


def _store(step: int = 0) -> ParameterStore:
    gen = torch.Generator().manual_seed(0)
    layers = [
        {"weight": torch.randn(4, 3, generator=gen), "bias": torch.randn(4, generator=gen)}
        for _ in range(NUM_LAYERS)
    ]
    return ParameterStore(layers, CONFIG.build(), step=step)


def _run_step(store: ParameterStore, step: int) -> None:
    for layer in range(store.num_layers):
        gen = torch.Generator().manual_seed(1000 * step + layer)
        grads = {name: torch.randn(shape, generator=gen) for name, shape in store.layout(layer)}
        store.apply_gradients(layer, step, grads)
    store.commit(step)


def _assert_stores_equal(a: ParameterStore, b: ParameterStore) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    for la, lb in zip(sa["layers"], sb["layers"], strict=True):
        assert (la["version"], la["num_updates"]) == (lb["version"], lb["num_updates"])
        for name in la["params"]:
            assert torch.equal(la["params"][name], lb["params"][name])
            for key in la["optimizer_state"][name]:
                assert torch.equal(
                    la["optimizer_state"][name][key], lb["optimizer_state"][name][key]
                )


def test_round_trip_resumes_bitwise(tmp_path: Path) -> None:
    reference = _store(step=5)
    for step in range(5, 9):
        _run_step(reference, step)

    store = _store(step=5)
    for step in range(5, 7):
        _run_step(store, step)
    extra = {"model": {"name": "mlp", "widths": [3, 4]}, "seed": 7, "note": None}
    path = tmp_path / "ckpt.pt"
    save_checkpoint(store, path, extra=extra)

    restored, restored_extra = load_checkpoint(path, CONFIG.build())
    assert restored_extra == extra
    assert [restored.version(i) for i in range(NUM_LAYERS)] == [7] * NUM_LAYERS
    _assert_stores_equal(restored, store)
    for step in range(7, 9):
        _run_step(restored, step)
    _assert_stores_equal(restored, reference)


def test_file_holds_plain_containers_with_config(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    save_checkpoint(_store(), path)
    payload = torch.load(path, weights_only=True)
    assert payload["optimizer"]["name"] == "adamw"
    assert payload["optimizer"]["weight_decay"] == 0.1
    assert payload["extra"] == {}
    assert payload["store"]["layers"][0]["version"] == 0


def test_loading_with_changed_hyperparameters_keeps_state(tmp_path: Path) -> None:
    store = _store()
    _run_step(store, 0)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(store, path)
    lower_lr = Optimizer.Config(name="adamw", lr=1e-4, weight_decay=0.1).build()
    restored, _ = load_checkpoint(path, lower_lr)
    assert restored.optimizer is lower_lr
    _assert_stores_equal(restored, store)


def test_crash_during_save_keeps_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "ckpt.pt"
    store = _store()
    save_checkpoint(store, path, extra={"generation": 1})
    previous_bytes = path.read_bytes()
    _run_step(store, 0)

    def crashing_save(obj, file, *args, **kwargs) -> None:
        file.write(b"half a checkpoint")
        raise RuntimeError("disk went away")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(RuntimeError, match="disk went away"):
        save_checkpoint(store, path, extra={"generation": 2})
    monkeypatch.undo()

    assert path.read_bytes() == previous_bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]
    restored, extra = load_checkpoint(path, CONFIG.build())
    assert extra == {"generation": 1}
    assert restored.version(0) == 0


def test_save_overwrites_and_leaves_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    store = _store()
    save_checkpoint(store, path, extra={"generation": 1})
    _run_step(store, 0)
    save_checkpoint(store, str(path), extra={"generation": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]
    restored, extra = load_checkpoint(str(path), CONFIG.build())
    assert extra == {"generation": 2}
    assert restored.version(0) == 1


def test_save_fsyncs_file_then_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    save_checkpoint(_store(), tmp_path / "ckpt.pt")
    assert synced == ["file", "dir"]


def test_save_refuses_uncommitted_step(tmp_path: Path) -> None:
    store = _store()
    store.apply_gradients(0, 0, {name: torch.zeros(shape) for name, shape in store.layout(0)})
    with pytest.raises(ValueError, match="commit the step first"):
        save_checkpoint(store, tmp_path / "ckpt.pt")
    assert list(tmp_path.iterdir()) == []


def test_save_rejects_extra_that_cannot_be_loaded_back(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"extra\['model'\]\['path'\] must hold only dicts"):
        save_checkpoint(_store(), tmp_path / "ckpt.pt", extra={"model": {"path": Path("/x")}})
    assert list(tmp_path.iterdir()) == []


def test_load_missing_file_raises(tmp_path: Path) -> None:
    path = tmp_path / "absent.pt"
    with pytest.raises(ValueError, match=rf"checkpoint {re.escape(str(path))} does not exist"):
        load_checkpoint(path, CONFIG.build())


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is not a MemoryX checkpoint: torch cannot read it"),
        (b"not a checkpoint at all", "is not a MemoryX checkpoint: torch cannot read it"),
        ("truncated", "is not a MemoryX checkpoint: torch cannot read it"),
        ("foreign", "is not a MemoryX checkpoint"),
        ("no_store", "is corrupt: entry 'store' is missing"),
    ],
)
def test_load_corrupt_file_raises(tmp_path: Path, content, message: str) -> None:
    path = tmp_path / "ckpt.pt"
    if content == "truncated":
        save_checkpoint(_store(), path)
        path.write_bytes(path.read_bytes()[:200])
    elif content == "foreign":
        torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    elif content == "no_store":
        save_checkpoint(_store(), path)
        payload = torch.load(path, weights_only=True)
        del payload["store"]
        torch.save(payload, path)
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"checkpoint {re.escape(str(path))} {message}"):
        load_checkpoint(path, CONFIG.build())


def test_load_with_other_optimizer_raises(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    save_checkpoint(_store(), path)
    with pytest.raises(
        ValueError, match="holds state of optimizer 'adamw', but the optimizer given is 'adam'"
    ):
        load_checkpoint(path, Optimizer.Config(name="adam").build())


# -- confinement: no path from the wire leads out of the run's checkpoint directory --


@pytest.mark.parametrize(
    "name",
    ["../outside.pt", "a/b.pt", "/etc/passwd", ".hidden", "..", ".", "", "x" * 200, "-rf"],
)
def test_confined_path_refuses_names_that_are_not_plain(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="not a plain file name"):
        confined_path(tmp_path, name)


def test_confined_path_refuses_a_symlink_even_to_a_checkpoint(tmp_path: Path) -> None:
    directory = tmp_path / "checkpoints"
    directory.mkdir()
    outside = tmp_path / "outside.pt"
    save_checkpoint(_store(), outside)
    (directory / "step-00000000.pt").symlink_to(outside)
    with pytest.raises(ValueError, match="symlink"):
        confined_path(directory, "step-00000000.pt")
    with pytest.raises(ValueError, match="symlink"):
        load_confined_checkpoint(directory, "step-00000000.pt", CONFIG.build())
    # A plain file in the directory loads.
    (directory / "step-00000000.pt").unlink()
    save_checkpoint(_store(), directory / checkpoint_name(0))
    store, _ = load_confined_checkpoint(directory, checkpoint_name(0), CONFIG.build())
    _assert_stores_equal(store, _store())


def test_confined_path_refuses_a_directory_symlinked_out(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    save_checkpoint(_store(), outside / "real.pt")
    directory = tmp_path / "checkpoints"
    directory.mkdir()
    (directory / "sub").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ValueError):
        confined_path(directory, "sub/real.pt")


def test_memoryx_resume_reads_only_inside_its_checkpoint_directory(tmp_path: Path) -> None:
    from memoryx.service import MemoryXServicer

    save_checkpoint(_store(), tmp_path / "outside.pt")
    directory = tmp_path / "checkpoints"
    directory.mkdir()
    for name in ("../outside.pt", str(tmp_path / "outside.pt")):
        with pytest.raises(ValueError, match="plain file name"):
            MemoryXServicer(CONFIG.build(), checkpoint_dir=str(directory), resume=name)
    with pytest.raises(ValueError, match="no checkpoint_dir"):
        MemoryXServicer(CONFIG.build(), resume="outside.pt")

"""Atomic checkpoints of a committed ParameterStore.

A checkpoint is one ``torch.save`` file of plain containers (loadable with
``weights_only=True``): the store's committed weights, optimizer state and
per-layer versions, the optimizer config, and a caller-supplied ``extra`` dict
(model and run description). It is written to a temporary file in the target
directory and renamed over the target, so a crash mid-save leaves the previous
checkpoint intact.

Over gRPC no path travels: MemoryX saves into the run's checkpoint directory
under a name it chooses (``checkpoint_name``) and restores only a plain file
name inside that directory (``confined_path``), never through a symlink.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from core.atomic import write_json_atomic
from core.config import to_dict
from memoryx.layer_files import (
    checkpoint_file_name,
    file_metadata,
    link_or_copy,
    param_names,
    unflatten,
)
from memoryx.optim import Optimizer
from memoryx.shard_plan import join_pieces, parse_piece_key
from memoryx.sparsity import Sparsity
from memoryx.store import STATE_FORMAT_VERSION, ParameterStore, _Version
from memoryx.tiers import TieredStore

CHECKPOINT_KIND = "memoryx-checkpoint"
# Bumped when the checkpoint layout changes.
CHECKPOINT_FORMAT_VERSION = 1

_PLAIN_SCALARS = (str, int, float, bool, type(None), torch.Tensor)
# A plain file name: no separator, no "..", no leading dot or dash.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def checkpoint_name(step: int) -> str:
    """The file name MemoryX gives the checkpoint whose next step to run is ``step``."""
    return f"step-{step:08d}.pt"


def checkpoint_dir_name(step: int) -> str:
    """The directory name MemoryX servers give a directory checkpoint (tiered or sharded)."""
    return f"step-{step:08d}"


def confined_path(directory: str | Path, name: str) -> Path:
    """``directory/name`` if ``name`` is a plain file name that stays inside ``directory``.

    Raises ValueError for a separator, ``..``, a hidden name, or a symlink at
    that place (which could lead out of the directory).
    """
    if not _NAME.fullmatch(name) or ".." in name:
        raise ValueError(
            f"checkpoint name {name!r} is not a plain file name "
            "(letters, digits, '.', '_', '-'; no '/' or '..')."
        )
    root = Path(directory).resolve()
    path = root / name
    if path.is_symlink():
        raise ValueError(f"checkpoint {name!r} in {root} is a symlink; it is not followed.")
    if path.resolve().parent != root:
        raise ValueError(f"checkpoint {name!r} leads out of {root}.")
    return path


def save_checkpoint(
    store: ParameterStore,
    path: str | Path,
    *,
    extra: dict | None = None,
    committed_only: bool = False,
) -> None:
    """Atomically write ``store`` (committed state only) and ``extra`` to ``path``.

    A step in flight is refused, or with ``committed_only`` left out (see
    ``ParameterStore.state_dict``).
    """
    path = Path(path)
    extra = {} if extra is None else extra
    _check_plain(extra, "extra")
    payload = {
        "kind": CHECKPOINT_KIND,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "optimizer": to_dict(store.optimizer.config),
        "store": store.state_dict(committed_only=committed_only),
        "extra": extra,
    }
    fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            torch.save(payload, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    # The rename itself is only durable once the directory entry is on disk.
    directory_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory_fd)
    finally:
        os.close(directory_fd)


def load_confined_checkpoint(
    directory: str | Path,
    name: str,
    optimizer: Optimizer,
    sparsity: Sparsity.Config | None = None,
) -> tuple[ParameterStore, dict]:
    """``load_checkpoint`` of ``name`` inside ``directory`` only (see ``confined_path``)."""
    path = confined_path(directory, name)
    try:
        # O_NOFOLLOW: a symlink swapped in after the check is refused, not followed.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise ValueError(f"checkpoint {name!r} cannot be opened in {directory}: {exc}") from None
    with os.fdopen(fd, "rb") as file:
        return load_checkpoint(path, optimizer, sparsity, file=file)


def load_checkpoint(
    path: str | Path,
    optimizer: Optimizer,
    sparsity: Sparsity.Config | None = None,
    *,
    file: Any = None,
) -> tuple[ParameterStore, dict]:
    """Rebuild the store saved at ``path`` with ``optimizer``; returns it and ``extra``.

    ``optimizer`` may change hyperparameters such as ``lr`` but must be the same
    update rule as the saved one, whose state it takes over. ``sparsity`` must
    select the parameters the checkpoint holds masks for; the masks themselves
    come from the checkpoint.
    """
    path = Path(path)
    if file is None and path.is_dir():
        return load_checkpoint_dir(path, optimizer, sparsity), {}
    if file is None and not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist or is not a file.")
    try:
        payload = torch.load(path if file is None else file, map_location="cpu", weights_only=True)
    except Exception as exc:
        # torch's own message runs to several paragraphs about pickling; the type says enough.
        raise ValueError(
            f"checkpoint {path} is not a MemoryX checkpoint: torch cannot read it "
            f"({type(exc).__name__})."
        ) from exc
    if not isinstance(payload, dict) or payload.get("kind") != CHECKPOINT_KIND:
        raise ValueError(f"checkpoint {path} is not a MemoryX checkpoint (kind is missing).")
    if payload.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise ValueError(
            f"checkpoint {path} has format_version {payload.get('format_version')!r}; "
            f"this code reads {CHECKPOINT_FORMAT_VERSION}."
        )
    try:
        saved_name = payload["optimizer"]["name"]
        if saved_name != optimizer.config.name:
            raise ValueError(
                f"checkpoint {path} holds state of optimizer {saved_name!r}, "
                f"but the optimizer given is {optimizer.config.name!r}."
            )
        store_state = payload["store"]
        built = None
        if sparsity is not None:
            built = sparsity.build(
                {
                    f"{index}.{name}": tuple(tensor.shape)
                    for index, entry in enumerate(store_state["layers"])
                    for name, tensor in entry["params"].items()
                }
            )
        store = ParameterStore.from_state_dict(store_state, optimizer, sparsity=built)
        return store, payload["extra"]
    except KeyError as exc:
        raise ValueError(f"checkpoint {path} is corrupt: entry {exc} is missing.") from exc


# -- directory checkpoints: a tiered store or several servers --------------------------------
#
# One safetensors file per layer (weights, masks, optimizer state, as the disk tier keeps
# them), a part file per server naming its layers, and ``manifest.json``, written last and
# atomically by whoever collects the parts: a reader trusts the manifest only, so the files
# of an earlier save stay valid until the new manifest replaces the old one.

CHECKPOINT_DIR_KIND = "memoryx-checkpoint-dir"
MANIFEST_NAME = "manifest.json"


def save_checkpoint_part(store: ParameterStore, directory: str | Path) -> tuple[Path, int]:
    """Write ``store``'s committed layers into ``directory``; returns its part file and bytes.

    A tiered store hard-links its committed files (no tensor passes through RAM);
    a store in RAM writes them.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if isinstance(store, TieredStore):
        entries = store.export_committed(directory)
    else:
        entries = []
        state = store.state_dict()
        for layer, entry in zip(store.layer_ids, state["layers"], strict=True):
            name = checkpoint_file_name(layer, entry["version"], entry["params"])
            flat = {f"p/{n}": t for n, t in entry["params"].items()}
            flat.update({f"m/{n}": t for n, t in entry["masks"].items()})
            for n, tensors in entry["optimizer_state"].items():
                flat.update({f"s/{n}/{k}": t for k, t in tensors.items()})
            temp = directory / f".{name}.tmp"
            metadata = file_metadata(entry["num_updates"], list(entry["params"]))
            save_file(flat, str(temp), metadata=metadata)
            _fsync(temp)
            os.replace(temp, directory / name)
            entries.append(
                {
                    "layer": layer,
                    "file": name,
                    "version": entry["version"],
                    "num_updates": entry["num_updates"],
                }
            )
    _fsync(directory)
    first, stop = store.layer_ids.start, store.layer_ids.stop
    part = directory / f"part-{first:05d}-{stop:05d}.json"
    write_json_atomic(part, {"layers": entries})
    num_bytes = sum((directory / e["file"]).stat().st_size for e in entries)
    return part, num_bytes


def write_manifest(
    directory: str | Path, parts: list[str | Path], *, optimizer: Optimizer.Config
) -> Path:
    """Join the servers' parts into ``manifest.json`` (last, atomically); drop stale files."""
    directory = Path(directory)
    entries = []
    for part in parts:
        entries += json.loads(Path(part).read_text())["layers"]
    # By layer; the files of a split layer's pieces in element order (their names say).
    entries.sort(key=lambda e: (e["layer"], e["file"]))
    layers = [e["layer"] for e in entries]
    whole_twice = [n for n in set(layers) if layers.count(n) > 1 and not _all_pieces(entries, n)]
    if sorted(set(layers)) != list(range(len(set(layers)))) or whole_twice:
        raise ValueError(
            f"checkpoint parts in {directory} cover layers {layers}; they must cover "
            f"0..{max(layers, default=0)} once each (or in pieces of a split layer)."
        )
    manifest = directory / MANIFEST_NAME
    write_json_atomic(
        manifest,
        {
            "kind": CHECKPOINT_DIR_KIND,
            "format_version": CHECKPOINT_FORMAT_VERSION,
            "optimizer": to_dict(optimizer),
            "layers": entries,
        },
    )
    _fsync(directory)
    keep = {e["file"] for e in entries}
    for path in directory.glob("layer-*.safetensors"):
        if path.name not in keep:
            path.unlink(missing_ok=True)
    for part in parts:
        Path(part).unlink(missing_ok=True)
    return manifest


def copy_checkpoint_dir(source: str | Path, destination: str | Path) -> None:
    """Put the checkpoint directory ``source`` at ``destination``: hard links (else copies)
    of the files its manifest lists, then the manifest, last and atomically."""
    source, destination = Path(source), Path(destination)
    payload = read_manifest(source)
    destination.mkdir(parents=True, exist_ok=True)
    for entry in payload["layers"]:
        link_or_copy(
            confined_path(source, entry["file"]), confined_path(destination, entry["file"])
        )
    _fsync(destination)
    write_json_atomic(destination / MANIFEST_NAME, payload)
    _fsync(destination)


def read_manifest(directory: str | Path) -> dict:
    directory = Path(directory)
    manifest = directory / MANIFEST_NAME
    if not manifest.is_file():
        raise ValueError(
            f"checkpoint {directory} has no {MANIFEST_NAME}: it is not a MemoryX checkpoint "
            "directory, or its save did not finish."
        )
    try:
        payload = json.loads(manifest.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"checkpoint {manifest} is corrupt: {exc}") from None
    if payload.get("kind") != CHECKPOINT_DIR_KIND:
        raise ValueError(f"checkpoint {manifest} is not a MemoryX checkpoint (kind is missing).")
    if payload.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise ValueError(
            f"checkpoint {manifest} has format_version {payload.get('format_version')!r}; "
            f"this code reads {CHECKPOINT_FORMAT_VERSION}."
        )
    return payload


def load_checkpoint_dir(
    directory: str | Path,
    optimizer: Optimizer,
    sparsity: Sparsity.Config | None = None,
    *,
    layers: range | None = None,
    spill_dir: Path | None = None,
    ram_budget_bytes: int | None = None,
    pieces: Mapping[int, Sequence[str]] | None = None,
) -> ParameterStore:
    """The store of ``layers`` (default: all) of a checkpoint directory.

    ``pieces`` names, for layers this store holds only part of, the pieces it holds
    (``memoryx.shard_plan``); every other layer is whole. A layer saved as exactly
    these pieces (or whole) is taken as its file; otherwise it is joined from its
    saved pieces and cut as asked, in RAM. With ``spill_dir`` and ``ram_budget_bytes``
    it is a tiered store that links the files (nothing is read whole); otherwise the
    layers are read into RAM.
    """
    directory = Path(directory)
    payload = read_manifest(directory)
    saved_name = payload["optimizer"]["name"]
    if saved_name != optimizer.config.name:
        raise ValueError(
            f"checkpoint {directory} holds state of optimizer {saved_name!r}, "
            f"but the optimizer given is {optimizer.config.name!r}."
        )
    by_layer: dict[int, list[dict]] = {}
    for entry in payload["layers"]:
        by_layer.setdefault(entry["layer"], []).append(entry)
    num_layers = len(by_layer)
    layers = range(num_layers) if layers is None else layers
    if layers.stop > num_layers or not layers:
        raise ValueError(
            f"checkpoint {directory} holds layers 0..{num_layers - 1}, "
            f"not the layers {layers.start}..{layers.stop - 1} asked for."
        )
    pieces = pieces or {}
    chosen = [_layer_source(directory, by_layer[i], pieces.get(i)) for i in layers]
    named_shapes = {
        f"{layer}.{name}": shape
        for layer, (_, _, layout) in zip(layers, chosen, strict=True)
        for name, shape in layout
    }
    built = None if sparsity is None else sparsity.build(named_shapes)
    first = by_layer[layers.start][0]
    if spill_dir is not None and ram_budget_bytes is not None:
        store = TieredStore(
            optimizer,
            spill_dir=spill_dir,
            ram_budget_bytes=ram_budget_bytes,
            step=first["version"],
            layer_offset=layers.start,
        )
        for entry, flat, layout in chosen:
            if flat is None:
                store.adopt_file(directory / entry["file"], entry["version"], entry["num_updates"])
            else:
                store.add_version(_version(flat, layout, entry), entry["version"])
        return store.finish(built, init_masks=False)
    state_layers = []
    for entry, flat, layout in chosen:
        if flat is None:
            flat = _read_flat(directory / entry["file"])
        version = _version(flat, layout, entry)
        state_layers.append(
            {
                "version": entry["version"],
                "num_updates": entry["num_updates"],
                "params": version.params,
                "masks": version.masks,
                "optimizer_state": version.optimizer_state,
            }
        )
    return ParameterStore.from_state_dict(
        {"format_version": STATE_FORMAT_VERSION, "layers": state_layers},
        optimizer,
        sparsity=built,
        layer_offset=layers.start,
    )


def _all_pieces(entries: list[dict], layer: int) -> bool:
    return all("-at" in e["file"] for e in entries if e["layer"] == layer)


def _layer_source(directory: Path, group: list[dict], wanted: Sequence[str] | None):
    """(entry, None, layout) to take a saved file as it is, or (entry, flat tensors,
    layout) joined from the saved pieces and cut into ``wanted`` (None: whole)."""
    layouts = []
    for entry in group:
        with safe_open(str(confined_path(directory, entry["file"])), framework="pt") as file:
            names = param_names(file.metadata())
            layouts.append([(n, tuple(file.get_slice(f"p/{n}").get_shape())) for n in names])
    for entry, layout in zip(group, layouts, strict=True):
        names = [n for n, _ in layout]
        as_saved = (
            names == list(wanted)
            if wanted is not None
            else not any(parse_piece_key(n) for n in names)
        )
        if as_saved:
            return entry, None, layout
    if len({(e["version"], e["num_updates"]) for e in group}) != 1:
        raise ValueError(
            f"checkpoint {directory} holds pieces of layer {group[0]['layer']} at different "
            f"versions {[e['version'] for e in group]}: it is corrupt."
        )
    saved: dict[str, dict[str, Tensor]] = {}  # by tensor kind: p, m, or s/KEY
    for entry in group:
        for key, tensor in _read_flat(directory / entry["file"]).items():
            kind, _, rest = key.partition("/")
            if kind == "s":
                name, _, part = rest.rpartition("/")
                saved.setdefault(f"s/{part}", {})[name] = tensor
            else:
                saved.setdefault(kind, {})[rest] = tensor
    joined = {kind: join_pieces(tensors) for kind, tensors in saved.items()}
    layout = list((n, tuple(t.shape)) for n, t in joined["p"].items())
    cut = [parse_piece_key(k) for k in wanted] if wanted is not None else [None] * len(layout)
    wanted_names = list(wanted) if wanted is not None else [n for n, _ in layout]
    flat: dict[str, Tensor] = {}
    for key, piece in zip(wanted_names, cut, strict=True):
        name = key if piece is None else piece.name
        for kind, tensors in joined.items():
            if name in tensors:
                value = tensors[name] if piece is None else piece.take(tensors[name])
                flat[f"{kind}/{key}" if kind[0] != "s" else f"s/{key}/{kind[2:]}"] = value
    shapes = {n: tuple(flat[f"p/{n}"].shape) for n in wanted_names}
    return group[0], flat, [(n, shapes[n]) for n in wanted_names]


def _read_flat(path: Path) -> dict[str, Tensor]:
    with safe_open(str(path), framework="pt") as file:
        return {key: file.get_tensor(key).clone() for key in file.keys()}  # noqa: SIM118


def _version(flat: Mapping[str, Tensor], layout, entry: dict) -> _Version:
    return unflatten(
        layout,
        {k: t for k, t in flat.items() if not k.startswith("s/")},
        {k: t for k, t in flat.items() if k.startswith("s/")},
        entry["num_updates"],
    )


def _fsync(path: Path) -> None:
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_plain(value: Any, where: str) -> None:
    """Reject what ``torch.load(weights_only=True)`` could not read back."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str | int):
                raise ValueError(f"{where} keys must be str or int, got {key!r}.")
            _check_plain(item, f"{where}[{key!r}]")
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _check_plain(item, f"{where}[{index}]")
    elif not isinstance(value, _PLAIN_SCALARS):
        raise ValueError(
            f"{where} must hold only dicts, lists, tuples, str, int, float, bool, None or "
            f"tensors, got {type(value).__name__}."
        )


__all__ = [
    "CHECKPOINT_DIR_KIND",
    "CHECKPOINT_FORMAT_VERSION",
    "MANIFEST_NAME",
    "checkpoint_dir_name",
    "checkpoint_name",
    "confined_path",
    "copy_checkpoint_dir",
    "load_checkpoint",
    "load_checkpoint_dir",
    "load_confined_checkpoint",
    "read_manifest",
    "save_checkpoint",
    "save_checkpoint_part",
    "write_manifest",
]

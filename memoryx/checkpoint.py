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

import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from core.config import to_dict
from memoryx.optim import Optimizer
from memoryx.sparsity import Sparsity
from memoryx.store import ParameterStore

CHECKPOINT_KIND = "memoryx-checkpoint"
# Bumped when the checkpoint layout changes.
CHECKPOINT_FORMAT_VERSION = 1

_PLAIN_SCALARS = (str, int, float, bool, type(None), torch.Tensor)
# A plain file name: no separator, no "..", no leading dot or dash.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def checkpoint_name(step: int) -> str:
    """The file name MemoryX gives the checkpoint whose next step to run is ``step``."""
    return f"step-{step:08d}.pt"


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
    if file is None and not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist or is not a file.")
    try:
        payload = torch.load(path if file is None else file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"checkpoint {path} is corrupt or not a torch file: {exc}") from exc
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
    "CHECKPOINT_FORMAT_VERSION",
    "checkpoint_name",
    "confined_path",
    "load_checkpoint",
    "load_confined_checkpoint",
    "save_checkpoint",
]

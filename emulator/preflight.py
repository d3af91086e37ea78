"""Checks that need the file system, the network or the data set, run before any actor starts.

``ClusterConfig`` validates values on their own; these checks look at the
world the run will meet (a Ray address, a checkpoint file, a directory to
write into, the size of the training set), so that bad input costs seconds
and a one-paragraph error rather than a started cluster, or a finished run
whose last write fails.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from emulator.address import check_address
from emulator.config import ClusterConfig
from emulator.runtime import check_bind_host
from memoryx.checkpoint import load_checkpoint


def check_before_launch(config: ClusterConfig) -> None:
    """ValueError naming the field if the run could not start or could not save its result."""
    check_address(config.runtime.address)
    check_bind_host(config.runtime)
    if config.resume is not None:
        check_resume(config)
    if config.save_checkpoint is not None:
        check_writable("save_checkpoint", config.save_checkpoint)


def check_resume(config: ClusterConfig) -> None:
    """The checkpoint loads as MemoryX will load it: same optimizer rule, same sparsity."""
    try:
        load_checkpoint(config.resume, config.optimizer.build(), config.sparsity)
    except ValueError as exc:
        raise ValueError(f"resume = {config.resume!r}: {' '.join(str(exc).split())}") from None


def check_writable(field: str, path: str) -> None:
    """``path`` names a file that can be created: its directory exists and takes new files."""
    target = Path(path).absolute()
    if target.is_dir():
        raise ValueError(
            f"{field} = {path!r} is a directory; give a file path such as "
            f"{str(target / 'checkpoint.pt')!r}."
        )
    directory = target.parent
    if not directory.is_dir():
        raise ValueError(
            f"{field} = {path!r}: directory {str(directory)!r} does not exist; create it first "
            "(the file is written when the run ends, so this is checked before it starts)."
        )
    try:
        # The checkpoint is written as a temporary file in this directory and renamed.
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        raise ValueError(
            f"{field} = {path!r}: cannot write in directory {str(directory)!r} "
            f"({exc.strerror or exc}); choose a writable directory."
        ) from None


def check_room(field: str, path: str, need_bytes: int, what: str) -> None:
    """ValueError if the file system of ``path`` (a directory, or a file's) has less than
    ``need_bytes`` free: a full disk is found now, not when the first checkpoint fails."""
    target = Path(path).absolute()
    directory = target if target.is_dir() else target.parent
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return  # not a directory we can measure: the write checks report it
    if free < need_bytes:
        raise ValueError(
            f"{field} = {path!r}: the disk has {free} bytes free, but {what} needs at least "
            f"{need_bytes} bytes (the weights and optimizer state); free space there or "
            "choose another directory."
        )


def check_checkpoint_room(config: ClusterConfig, state_bytes: int) -> None:
    """Room for MemoryX's state (``state_bytes``) where the run writes checkpoints."""
    if config.checkpoint.dir is not None:
        check_room("checkpoint.dir", config.checkpoint.dir, state_bytes, "one checkpoint")
    if config.save_checkpoint is not None:
        check_room("save_checkpoint", config.save_checkpoint, state_bytes, "the checkpoint")


def check_batch(config: ClusterConfig, num_train: int) -> None:
    """A global batch fits in the training set (every step draws it without repeats)."""
    if config.batch_size <= num_train:
        return
    largest = num_train - num_train % config.num_nodes
    advice = (
        f"use batch_size <= {num_train}, a multiple of num_nodes = {config.num_nodes} "
        f"(e.g. {largest})"
        if largest
        else f"use fewer nodes than the {num_train} samples"
    )
    data = config.data_config
    source = f"data.path {data.path!r}" if data.path is not None else f"data set {data.name!r}"
    raise ValueError(
        f"batch_size = {config.batch_size} is larger than the training set: {source} has "
        f"{num_train} training samples; {advice}."
    )


__all__ = [
    "check_batch",
    "check_before_launch",
    "check_checkpoint_room",
    "check_resume",
    "check_room",
    "check_writable",
]

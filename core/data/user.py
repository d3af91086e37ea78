"""A user's own data: a ``.npz`` of arrays, a flat ``.bin`` token file, or ``module:factory``.

Only the driver reads these (the file may exist on the driver's host alone, and
a factory may not be importable elsewhere); the compute nodes receive the
loaded tensors as a Ray actor argument, never a path. Every problem with the
data is a ``ValueError`` of one paragraph that names the file and the fix, so
it surfaces before any actor starts.

Formats:

- ``.npz`` with arrays ``x`` and ``y`` and optionally ``x_test`` / ``y_test``.
  ``y`` of shape ``[N]`` (integer labels) makes a classification set, ``x``
  converted to float32. ``x`` and ``y`` both integer ``[N, T]`` make a
  language-model set (``y`` = next tokens). Without ``x_test`` / ``y_test``
  a seeded share (``test_fraction``, ``data_seed``) is held out.
- ``.bin``: a flat array of uint16 token ids (the nanoGPT convention, e.g.
  ``np.array(ids, dtype=np.uint16).tofile("train.bin")``), cut into windows of
  ``seq_len`` tokens; the last ``test_fraction`` of the tokens is the test set.
- ``module:factory``: ``factory()`` returns ``(train, test)`` torch Datasets
  whose items are ``(x, y)`` pairs, stacked into tensors here.
"""

from __future__ import annotations

import importlib
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from core.data.sources import Split, windows

FILE_SUFFIXES = (".npz", ".bin")
_NPZ_KEYS = ("x", "y", "x_test", "y_test")
_SAVEZ_HINT = "np.savez(PATH, x=inputs, y=labels) (optionally x_test=..., y_test=...)"


def is_factory_path(path: str) -> bool:
    """``package.module:factory``, not a file name (Windows drive letters aside)."""
    module, sep, factory = path.partition(":")
    return bool(
        sep
        and module
        and factory.isidentifier()
        and all(part.isidentifier() for part in module.split("."))
    )


def check_path(path: str) -> None:
    """The cheap checks a config can make: a known form, and a file that exists."""
    if is_factory_path(path):
        return
    suffix = Path(path).suffix
    if suffix not in FILE_SUFFIXES:
        raise ValueError(
            f"path = {path!r} is neither a .npz nor a .bin file nor 'module:factory'. "
            f"Save arrays with {_SAVEZ_HINT}, token ids with "
            "np.array(ids, dtype=np.uint16).tofile('tokens.bin'), or name a function "
            "returning (train, test) torch Datasets as 'package.module:factory'."
        )
    if not Path(path).is_file():
        raise ValueError(
            f"path = {path!r}: no such file (relative paths start at {str(Path.cwd())!r}). "
            "Check the name, or give an absolute path."
        )


Loaded = tuple[str, Split]  # task, (x_train, y_train, x_test, y_test)


def load(path: str, *, seq_len: int, test_fraction: float, data_seed: int) -> Loaded:
    """The task and the train/test tensors of the user's data at ``path``."""
    check_path(path)
    if is_factory_path(path):
        return _load_factory(path)
    if path.endswith(".bin"):
        return "language-model", _load_tokens(path, seq_len=seq_len, test_fraction=test_fraction)
    return _load_npz(path, test_fraction=test_fraction, data_seed=data_seed)


def _load_npz(path: str, *, test_fraction: float, data_seed: int) -> Loaded:
    where = f"data file {path!r}"
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ValueError(
            f"{where} is not a readable .npz archive ({exc}); write it with {_SAVEZ_HINT}."
        ) from None
    missing = [key for key in ("x", "y") if key not in arrays]
    if missing:
        raise ValueError(
            f"{where} has arrays {sorted(arrays)} but no {' or '.join(map(repr, missing))}; "
            f"write it with {_SAVEZ_HINT}."
        )
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise ValueError(
            f"{where} has only one of x_test and y_test; give both, or neither (then a seeded "
            f"test_fraction of x, y is held out)."
        )
    unknown = sorted(set(arrays) - set(_NPZ_KEYS))
    if unknown:
        raise ValueError(
            f"{where} has arrays {unknown} the emulator does not read; it reads only "
            f"{', '.join(_NPZ_KEYS)}. Remove them or rename them."
        )
    task = _task_of(where, arrays["x"], arrays["y"], "x", "y")
    x, y = _tensors(where, task, arrays["x"], arrays["y"], "x", "y")
    if "x_test" in arrays:
        if _task_of(where, arrays["x_test"], arrays["y_test"], "x_test", "y_test") != task:
            raise ValueError(
                f"{where}: x_test, y_test describe a different task than x, y ({task}); "
                "give them the same dtypes and number of dimensions."
            )
        x_test, y_test = _tensors(
            where, task, arrays["x_test"], arrays["y_test"], "x_test", "y_test"
        )
        if x_test.shape[1:] != x.shape[1:]:
            raise ValueError(
                f"{where}: a sample of x_test has shape {tuple(x_test.shape[1:])} but one of x "
                f"has {tuple(x.shape[1:])}; give both the same sample shape."
            )
        return task, (x, y, x_test, y_test)
    return task, _seeded_split(where, x, y, test_fraction=test_fraction, data_seed=data_seed)


def _task_of(where: str, x: np.ndarray, y: np.ndarray, x_name: str, y_name: str) -> str:
    for name, array in ((x_name, x), (y_name, y)):
        if array.dtype.kind not in "biuf":
            raise ValueError(
                f"{where}: {name} has dtype {array.dtype}, which is not a number; store "
                f"{name} as {'integer labels or token ids' if name.startswith('y') else 'numbers'} "
                f"(e.g. {name}.astype(np.{'int64' if name.startswith('y') else 'float32'}))."
            )
    if y.dtype.kind == "f":
        raise ValueError(
            f"{where}: {y_name} has dtype {y.dtype}, but labels must be integer class indices "
            f"0..C-1 (or token ids); store {y_name}.astype(np.int64)."
        )
    if len(x) != len(y):
        raise ValueError(
            f"{where}: {x_name} has {len(x)} samples but {y_name} has {len(y)}; give one label "
            f"(or target sequence) per sample, so both have the same first dimension."
        )
    if len(x) == 0:
        raise ValueError(f"{where}: {x_name} holds no samples; give at least one.")
    if y.ndim == 1:
        return "classification"
    if y.ndim == 2 and x.shape == y.shape and x.dtype.kind in "iu":
        return "language-model"
    raise ValueError(
        f"{where}: {x_name} has shape {x.shape} ({x.dtype}) and {y_name} {y.shape}; give "
        f"{y_name} of shape [N] (one class label per sample) for classification, or integer "
        f"token ids {x_name} and {y_name} both of shape [N, seq_len] ({y_name} = the next "
        "tokens) for a language model."
    )


def _tensors(
    where: str, task: str, x: np.ndarray, y: np.ndarray, x_name: str, y_name: str
) -> tuple[Tensor, Tensor]:
    for name, array in ((x_name, x), (y_name, y)):
        if array.dtype.kind in "iu" and len(array) and array.min() < 0:
            kind = "labels" if name == y_name and task == "classification" else "token ids"
            raise ValueError(
                f"{where}: {name} holds {kind} below 0 (smallest {int(array.min())}); "
                f"{kind} must be 0 or more; shift them to start at 0."
            )
    if task == "classification":
        inputs = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    else:
        inputs = torch.from_numpy(np.ascontiguousarray(x, dtype=np.int64))
    return inputs, torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))


def _seeded_split(
    where: str, x: Tensor, y: Tensor, *, test_fraction: float, data_seed: int
) -> Split:
    num_test = round(test_fraction * len(x))
    if not 1 <= num_test < len(x):
        raise ValueError(
            f"{where} has {len(x)} samples; test_fraction = {test_fraction} holds out {num_test}, "
            "but train and test each need at least one. Add samples, change test_fraction, or "
            "give x_test and y_test in the file."
        )
    order = torch.from_numpy(np.random.default_rng([data_seed]).permutation(len(x)))
    test, train = order[:num_test], order[num_test:]
    return x[train], y[train], x[test], y[test]


def _load_tokens(path: str, *, seq_len: int, test_fraction: float) -> Split:
    where = f"token file {path!r}"
    size_bytes = Path(path).stat().st_size
    if size_bytes % 2:
        raise ValueError(
            f"{where} has {size_bytes} bytes, an odd number, so it is not uint16 token ids; "
            "write it with np.array(ids, dtype=np.uint16).tofile(PATH) (ids below 65536)."
        )
    tokens = np.fromfile(path, dtype=np.uint16)
    num_test = round(test_fraction * len(tokens))
    train, test = tokens[: len(tokens) - num_test], tokens[len(tokens) - num_test :]
    if len(test) <= seq_len or len(train) <= seq_len:
        raise ValueError(
            f"{where} holds {len(tokens)} tokens; with test_fraction = {test_fraction} its train "
            f"part has {len(train)} and its test part {len(test)}, but each needs more than "
            f"seq_len = {seq_len} tokens. Use a smaller data.seq_len (at most "
            f"{max(min(len(train), len(test)) - 1, 0)}) or more tokens."
        )
    return (*windows(train, seq_len), *windows(test, seq_len))


def _load_factory(path: str) -> Loaded:
    module_name, _, factory_name = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(
            f"data path = {path!r}: cannot import module {module_name!r} ({exc}); make it "
            "importable (PYTHONPATH) or give a .npz / .bin file."
        ) from None
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise ValueError(f"data path = {path!r}: {module_name!r} has no function {factory_name!r}.")
    result = factory()
    if not (isinstance(result, tuple) and len(result) == 2):
        raise ValueError(
            f"data path = {path!r}: the factory returned a {type(result).__name__}; it must "
            "return a pair (train, test) of torch Datasets whose items are (x, y)."
        )
    where = f"data factory {path!r}"
    stacked = [
        _stack(where, part, name) for part, name in zip(result, ("train", "test"), strict=True)
    ]
    (x, y), (x_test, y_test) = stacked
    task = _task_of(where, x.numpy(), y.numpy(), "train x", "train y")
    x, y = _tensors(where, task, x.numpy(), y.numpy(), "train x", "train y")
    if _task_of(where, x_test.numpy(), y_test.numpy(), "test x", "test y") != task:
        raise ValueError(f"{where}: the test set describes a different task than the train set.")
    x_test, y_test = _tensors(where, task, x_test.numpy(), y_test.numpy(), "test x", "test y")
    return task, (x, y, x_test, y_test)


def _stack(where: str, part, name: str) -> tuple[Tensor, Tensor]:
    try:
        size = len(part)
    except TypeError:
        raise ValueError(
            f"{where}: the {name} set is a {type(part).__name__} without a length; return a "
            "map-style torch Dataset (with __len__ and __getitem__), e.g. TensorDataset(x, y)."
        ) from None
    if size == 0:
        raise ValueError(f"{where}: the {name} set is empty; give it at least one sample.")
    xs, ys = [], []
    for index in range(size):
        item = part[index]
        if not (isinstance(item, tuple | list) and len(item) == 2):
            raise ValueError(
                f"{where}: item {index} of the {name} set is a {type(item).__name__}; every item "
                "must be a pair (x, y), as TensorDataset(x, y) gives."
            )
        xs.append(torch.as_tensor(item[0]))
        ys.append(torch.as_tensor(item[1]))
    try:
        return torch.stack(xs), torch.stack(ys)
    except RuntimeError as exc:
        raise ValueError(
            f"{where}: the {name} set's samples differ in shape ({exc}); give every x one shape "
            "(pad or crop) and every y one shape."
        ) from None

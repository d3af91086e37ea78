"""Strict conversion from YAML/CLI dictionaries to config dataclasses.

Raw dictionaries stop here: everything past this module is a typed config.
Every error is a ``ValueError`` that names the offending field by its dotted
path and says what would be valid, so the CLI can print it as one paragraph.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, TypeVar, get_args, get_origin

T = TypeVar("T")


def field_docs(cls: type) -> dict[str, str]:
    """One-line docs of a config's fields, taken from ``field(metadata={"doc": ...})``."""
    return {f.name: f.metadata.get("doc", "") for f in dataclasses.fields(cls)}


def doc(text: str, **kwargs: Any) -> Any:
    """A dataclass field carrying its one-line doc (with unit) in metadata."""
    return dataclasses.field(metadata={"doc": text}, **kwargs)


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, path: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ValueError(
                f"{path} = {value!r} is not valid; choose one of {', '.join(repr(a) for a in allowed)}."
            )
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, path)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(
            errors[0] if len(errors) == 1 else f"{path} = {value!r}: {'; '.join(errors)}"
        )
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{path} must be a mapping of {tp.__name__} fields, got {value!r}.")
        if hasattr(tp, "variants"):
            # A polymorphic config (e.g. a backend): its `kind` key names the class.
            variants = tp.variants()
            kind = value.get("kind", tp.default_kind)
            if kind not in variants:
                raise ValueError(
                    f"{path}.kind = {kind!r} is not valid; choose one of {', '.join(map(repr, variants))}."
                )
            return from_dict(variants[kind], value, path)
        return from_dict(tp, value, path)
    if origin in (list, tuple):
        (item_tp, *_rest) = get_args(tp) or (Any,)
        if isinstance(value, str | bytes) or not isinstance(value, list | tuple):
            raise ValueError(f"{path} must be a list, got {value!r}.")
        items = [_convert(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{path} must be a mapping, got {value!r}.")
        _key_tp, val_tp = get_args(tp) or (Any, Any)
        return {k: _convert(v, val_tp, f"{path}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{path} must be a number, got {value!r}.")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{path} must be an integer, got {value!r}.")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{path} must be true or false, got {value!r}.")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{path} must be a string, got {value!r}.")
        return value
    return value


def from_dict(cls: type[T], data: dict[str, Any], path: str = "") -> T:
    """Build ``cls`` from ``data``, rejecting unknown keys and ill-typed values.

    ``__post_init__`` validation errors are re-raised with the dotted path of
    the nested config prepended, so a user sees ``nodes.backend.precision``
    rather than just ``precision``.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    prefix = f"{path}." if path else ""
    if unknown:
        raise ValueError(
            f"Unknown config key {prefix}{unknown[0]!s}"
            f"{' (and ' + ', '.join(unknown[1:]) + ')' if len(unknown) > 1 else ''}"
            f" in {cls.__name__}; valid keys are: {', '.join(sorted(fields))}."
        )
    kwargs = {name: _convert(value, hints[name], f"{prefix}{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as exc:
        message = str(exc)
        if path and not message.startswith(path):
            message = (
                f"{path}.{message}" if message.split(" ", 1)[0] in fields else f"{path}: {message}"
            )
        raise ValueError(message) from None


def replace_path(config: T, dotted: str, value: Any) -> T:
    """Return ``config`` with the field at ``dotted`` (e.g. ``optimizer.lr``) set to ``value``."""
    head, _, rest = dotted.partition(".")
    names = {f.name for f in dataclasses.fields(config)}
    if head not in names:
        raise ValueError(
            f"Unknown config key {dotted!r}; valid keys are: {', '.join(sorted(names))}."
        )
    if rest:
        value = replace_path(getattr(config, head), rest, value)
    as_dict = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init}
    as_dict[head] = value
    return type(config)(**as_dict)


def to_dict(config: Any) -> Any:
    """Plain, JSON-friendly dictionary of a (nested) config."""
    if dataclasses.is_dataclass(config):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, list | tuple):
        return [to_dict(v) for v in config]
    if isinstance(config, dict):
        return {k: to_dict(v) for k, v in config.items()}
    return config


__all__ = ["doc", "field_docs", "from_dict", "replace_path", "to_dict", "_type_name"]

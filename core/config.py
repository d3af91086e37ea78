"""Strict conversion from YAML/CLI dictionaries to config dataclasses.

Raw dictionaries stop here: everything past this module is a typed config.
Every error is a ``ValueError`` that names the offending field by its dotted
path and says what would be valid, so the CLI can print it as one paragraph.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

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
        if value != value:  # NaN: no setting means "not a number"
            raise ValueError(f"{path} = nan is not valid; give a number.")
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


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader that reads floats as YAML 1.2 does.

    PyYAML follows YAML 1.1, where ``1e6`` and ``1.0e6`` (no dot, or no sign in the
    exponent) are strings; a user who writes ``lr: 1.0e6`` means a number.
    """


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def yaml_text(text: str) -> Any:
    """``text`` read as YAML with ``YamlLoader`` (floats as YAML 1.2 reads them)."""
    return yaml.load(text, Loader=YamlLoader)  # noqa: S506 - YamlLoader is a SafeLoader


def load_yaml(path: str | Path, what: str = "config file") -> Any:
    """The YAML document at ``path``, or a one-paragraph ``ValueError`` naming the file.

    Refuses a directory, a missing or unreadable file, text that is not UTF-8,
    malformed YAML (with its line and column) and a key given twice in one
    mapping (YAML keeps the last silently; here it names the dotted key).
    """
    name = repr(str(path))
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {name} is a directory; give the path of a YAML file.")
    if not path.exists():
        raise ValueError(f"{what} {name} does not exist.")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{what} {name} cannot be read: {exc.strerror}.") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        before = data[: exc.start]
        line, column = before.count(b"\n") + 1, exc.start - before.rfind(b"\n")
        raise ValueError(
            f"{what} {name} is not UTF-8 text (byte {data[exc.start]:#04x} at line {line}, "
            f"column {column}); save it as UTF-8."
        ) from None
    loader = YamlLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_unique_keys(node, "", what, name)
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        reason = " ".join(p for p in (exc.context, exc.problem) if p)
        raise ValueError(f"{what} {name} is not valid YAML{where}: {reason}.") from None
    except yaml.YAMLError as exc:
        raise ValueError(
            f"{what} {name} is not valid YAML: {' '.join(str(exc).split())}."
        ) from None
    finally:
        loader.dispose()


def _check_unique_keys(node: yaml.Node, path: str, what: str, name: str) -> None:
    if isinstance(node, yaml.MappingNode):
        first_line: dict[tuple[str, str], int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            dotted = f"{path}.{key}" if path else str(key)
            if key is not None and key != "<<":
                line = key_node.start_mark.line + 1
                seen = first_line.get((key_node.tag, key))
                if seen is not None:
                    raise ValueError(
                        f"{what} {name} sets {dotted} twice (lines {seen} and {line}); "
                        "YAML would keep only the last one, so remove one of them."
                    )
                first_line[(key_node.tag, key)] = line
            _check_unique_keys(value_node, dotted, what, name)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _check_unique_keys(item, f"{path}[{index}]", what, name)


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


__all__ = ["doc", "field_docs", "from_dict", "load_yaml", "replace_path", "to_dict", "_type_name"]

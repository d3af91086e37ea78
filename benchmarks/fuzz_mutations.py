"""How ``fuzz_services.py`` mutates a valid request: a field set to an edge value, a message
of a stream dropped, repeated, moved or added, or the serialized bytes flipped, cut or padded."""

from __future__ import annotations

import copy
import random

_INTS = [-1, 0, 1, 2, 3, 7, 77, 1023, 1024, 2**31 - 1, -(2**31), 2**40, -(2**62)]
_STRINGS = ["", "float64", "bfloat16", "../../etc/passwd", "/tmp/x", "x" * 5000, "\x00", "0.bias"]


def _edge_value(rng: random.Random, descriptor, current):
    from google.protobuf.descriptor import FieldDescriptor as F

    kind = descriptor.type
    if kind in (F.TYPE_INT32, F.TYPE_INT64, F.TYPE_ENUM):
        value = rng.choice(_INTS + [rng.randint(-5, 5), current + 1, current - 1])
        if kind in (F.TYPE_INT32, F.TYPE_ENUM):
            value = max(-(2**31), min(2**31 - 1, value))
        return value
    if kind == F.TYPE_STRING:
        return rng.choice(_STRINGS)
    if kind == F.TYPE_BYTES:
        data = bytearray(current)
        op = rng.randrange(4)
        if op == 0:
            return b""
        if op == 1:
            return bytes(data[: rng.randrange(len(data) + 1)])
        if op == 2:
            return bytes(data) + bytes(rng.randrange(1, 64))
        if data:
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        return bytes(data)
    if kind == F.TYPE_BOOL:
        return not current
    if kind == F.TYPE_DOUBLE:
        return rng.choice([float("nan"), float("inf"), -1.0, 1e300])
    return current


def _mutate_fields(rng: random.Random, message) -> str:
    """Set one scalar or repeated field of ``message`` (or its oneof payload) to an edge value."""
    target = message
    if message.DESCRIPTOR.name == "LayerMessage":
        kind = message.WhichOneof("kind") or "chunk"
        target = getattr(message, kind)
    descriptor = rng.choice(target.DESCRIPTOR.fields)
    if descriptor.message_type is not None and not descriptor.is_repeated:
        # A nested message (TensorChunk.shared): one of its fields, which also sets it.
        return f"{descriptor.name}.{_mutate_fields(rng, getattr(target, descriptor.name))}"
    if descriptor.is_repeated and descriptor.message_type is not None:
        # Requests sent together (``LayerRequest.following``): drop them, add a copy of the
        # message (with its own following: a nesting the receiver refuses), or edit one.
        values = getattr(target, descriptor.name)
        op = rng.randrange(3)
        if op == 0:
            del values[:]
        elif op == 1:
            snapshot = type(target)()
            snapshot.CopyFrom(target)
            values.add().CopyFrom(snapshot)
        elif len(values):
            edited = _mutate_fields(rng, values[rng.randrange(len(values))])
            return f"{descriptor.name}[].{edited}"
        return f"{descriptor.name}[]"
    if descriptor.is_repeated:
        values = getattr(target, descriptor.name)
        op = rng.randrange(3)
        if op == 0:
            del values[:]
        elif op == 1:
            values.append(rng.choice(_INTS))
        elif len(values):
            values[rng.randrange(len(values))] = rng.choice(_INTS)
        return f"{descriptor.name}[]"
    current = getattr(target, descriptor.name)
    setattr(target, descriptor.name, _edge_value(rng, descriptor, current))
    return descriptor.name


def _mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    op = rng.randrange(4)
    if op == 0 and data:
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif op == 1:
        data = data[: rng.randrange(len(data) + 1)]
    elif op == 2:
        at = rng.randrange(len(data) + 1)
        data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 32)))
    else:
        data += bytes(rng.randrange(256) for _ in range(rng.randint(1, 32)))
    return bytes(data)


def mutate(rng: random.Random, messages: list, streaming: bool) -> tuple[list[bytes], str]:
    """``messages`` with one mutation, serialized; and what the mutation was."""
    messages = [copy.deepcopy(m) for m in messages]
    choices = ["field", "bytes"] + (
        ["drop", "repeat", "move", "header", "cut"] if streaming else []
    )
    how = rng.choice(choices)
    index = rng.randrange(len(messages))
    raw: dict[int, bytes] = {}
    if how == "field" and not messages[index].DESCRIPTOR.fields:
        how = "bytes"  # Empty: only its bytes can change
    if how == "field":
        how = "field " + _mutate_fields(rng, messages[index])
    elif how == "bytes":
        raw[index] = _mutate_bytes(rng, messages[index].SerializeToString())
    elif how == "drop":
        del messages[index]
    elif how == "repeat":
        messages.insert(index, copy.deepcopy(messages[index]))
    elif how == "move":
        messages.insert(rng.randrange(len(messages) + 1), messages.pop(index))
    elif how == "header":
        messages.insert(index, copy.deepcopy(messages[0]))
    else:
        messages = messages[: rng.randrange(len(messages))]
    return [raw.get(i, m.SerializeToString()) for i, m in enumerate(messages)], how

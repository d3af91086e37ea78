"""Layer streams on gRPC without a protobuf object per chunk: one copy to send, none to receive.

The bytes on the wire are exactly ``LayerMessage`` protobuf (any protobuf
client reads and writes them); only the Python side differs from the
generated stubs' ``SerializeToString`` / ``FromString``:

- ``encode`` turns a ``Chunk`` into its message with one copy of its values
  (the small fields through protobuf, then the raw bytes appended), where the
  generated path copies them three times (into ``bytes``, into the message,
  into the serialized string). A chunk that arrived from the wire is
  forwarded as the very bytes it came in (``Chunk.wire``): a SwarmX relay
  copies nothing.
- Co-located (``proto.shm`` active in this process), ``encode`` copies the values
  into this process's shared-memory ring instead and sends a ``SharedSlot``
  reference; ``decode`` gives a ``Chunk`` viewing that slot.
- ``decode`` finds the ``data`` field of a chunk message and returns a
  ``Chunk`` whose ``data`` is a ``memoryview`` into the received bytes; only
  the small fields go through protobuf. A small chunk message (a shared-memory
  reference, a few values) goes through protobuf whole, which copies at most
  ``SMALL_CHUNK_BYTES`` and is some 8x faster than finding its fields in Python.
  Anything else (a header, an empty or unusual message) goes through protobuf whole.

``register`` serves a generated servicer with these codecs on its layer-stream
methods, behind the same interceptors (the auth guard parses requests with the
handler's deserializer). ``fast_channel`` makes generated stubs use them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from proto import shm
from proto import tensor_pb2 as pb
from proto.domain import Chunk, Header
from proto.frames import Bundle, WireError, chunk_fields, chunk_from_pb, from_wire, to_wire

_CHUNK_KEY = 0x12  # LayerMessage field 2 (chunk), length-delimited
_BUNDLE_KEY = b"\x1a"  # LayerMessage field 3 (bundle), length-delimited
_ITEM_KEY = 0x0A  # LayerBundle field 1 (items), length-delimited
_DATA_FIELD = 8  # TensorChunk.data
_DATA_KEY = b"\x42"  # field 8, length-delimited
#: A chunk message up to this size is parsed by protobuf whole (its values copied):
#: 1.6 us against 14 us for the field scan that spares a large one's copy.
SMALL_CHUNK_BYTES = 1024


class _Unusual(Exception):
    """A message the fast path does not read (protobuf reads it instead)."""


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(raw: bytes, pos: int, end: int) -> tuple[int, int]:
    if pos < end and raw[pos] < 0x80:  # one byte (every key, most values): no loop
        return raw[pos], pos + 1
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Unusual
        byte = raw[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def encode(item: Any) -> bytes:
    """The serialized ``LayerMessage`` of a ``Chunk``, ``Header``, ``Bundle``, protobuf
    message or bytes."""
    if isinstance(item, Bundle):
        # Each item is the very message it would be alone (a relayed chunk's own bytes).
        inner = b"".join(
            b"%c%s%s" % (_ITEM_KEY, _varint(len(m)), m) for m in map(encode, item.items)
        )
        return b"".join((_BUNDLE_KEY, _varint(len(inner)), inner))
    if isinstance(item, Chunk):
        if item.wire is not None:
            return item.wire
        data = item.data
        if shm.active():
            # Co-located: the one copy goes into this process's ring, the message names it.
            ref = shm.write(data)
            if ref is not None:
                fields = chunk_fields(item)
                fields.shared.segment = ref.segment
                fields.shared.slot = ref.slot
                fields.shared.length = ref.length
                fields.shared.generation = ref.generation
                fields.shared.offset = ref.offset
                return b"\x12" + _varint(fields.ByteSize()) + fields.SerializeToString()
        fields = chunk_fields(item).SerializeToString()
        size = data.nbytes if isinstance(data, memoryview) else len(data)
        size_varint = _varint(size)
        inner = len(fields) + 1 + len(size_varint) + size
        # The one copy of the values: into the message gRPC sends.
        return b"".join((b"\x12", _varint(inner), fields, _DATA_KEY, size_varint, data))
    if isinstance(item, Header):
        return to_wire(item).SerializeToString()
    if isinstance(item, bytes):
        return item
    return item.SerializeToString()


def decode(raw: bytes) -> Chunk | Header | Bundle | pb.LayerMessage:
    """A received ``LayerMessage``: a ``Chunk`` viewing ``raw``, a ``Header``, or the message
    itself when it is not a valid item (``from_wire`` then raises its ``WireError`` where
    the servicer or caller reads it, and names the problem).

    Never raises a ``WireError`` itself: gRPC would report one raised here only as
    "Exception deserializing request/response", without its text.
    """
    if raw[:1] == b"\x12":
        try:
            size, start = _read_varint(raw, 1, len(raw))
            if start + size == len(raw):
                return _chunk(raw, start)
        except (_Unusual, WireError):  # a bad shared-memory reference: said by from_wire
            pass
    elif raw[:1] == _BUNDLE_KEY:
        try:
            return _bundle(raw)
        except _Unusual:
            pass
    message = pb.LayerMessage.FromString(raw)
    try:
        return from_wire(message)
    except WireError:
        return message


def _bundle(raw: bytes) -> Bundle:
    """A bundle message: each of its items decoded as the message it is (a chunk's data
    viewed in place); ``frames.expand`` checks what they are."""
    end = len(raw)
    size, pos = _read_varint(raw, 1, end)
    if pos + size != end:
        raise _Unusual
    items = []
    while pos < end:
        if raw[pos] != _ITEM_KEY:
            raise _Unusual
        size, pos = _read_varint(raw, pos + 1, end)
        if pos + size > end:
            raise _Unusual
        item_raw = raw[pos : pos + size]
        if item_raw[:1] == _BUNDLE_KEY:
            raise _Unusual  # protobuf reads it, and expand refuses it
        items.append(decode(item_raw))
        pos += size
    return Bundle(tuple(items))


def _chunk(raw: bytes, start: int) -> Chunk:
    """The chunk message ``raw[start:]``: its data viewed in place, the rest parsed by protobuf
    (a small one parsed whole)."""
    end = len(raw)
    if end - start <= SMALL_CHUNK_BYTES:
        try:
            c = pb.TensorChunk.FromString(raw[start:])
        except DecodeError:
            raise _Unusual from None
        chunk = chunk_from_pb(c, c.data)
        object.__setattr__(chunk, "wire", raw)
        return chunk
    pos = start
    kept: list[bytes] = []  # the message without its data field(s)
    kept_from = start
    data = (0, 0)
    while pos < end:
        field_start = pos
        key, pos = _read_varint(raw, pos, end)
        kind = key & 7
        if kind == 0:
            _, pos = _read_varint(raw, pos, end)
        elif kind == 2:
            size, pos = _read_varint(raw, pos, end)
            if key >> 3 == _DATA_FIELD:
                # A repeated scalar field: the last one counts, as in protobuf.
                data = (pos, pos + size)
                kept.append(raw[kept_from:field_start])
                kept_from = pos + size
            pos += size
        elif kind == 1:
            pos += 8
        elif kind == 5:
            pos += 4
        else:
            raise _Unusual
        if pos > end:
            raise _Unusual
    kept.append(raw[kept_from:end])
    c = pb.TensorChunk.FromString(b"".join(kept))
    chunk = chunk_from_pb(c, memoryview(raw)[data[0] : data[1]])
    object.__setattr__(chunk, "wire", raw)
    return chunk


_PROTOBUF_SERIALIZE = pb.LayerMessage.SerializeToString
_PROTOBUF_PARSE = pb.LayerMessage.FromString


def _codecs(serializer: Callable | None, deserializer: Callable | None) -> tuple:
    return (
        encode if serializer == _PROTOBUF_SERIALIZE else serializer,
        decode if deserializer == _PROTOBUF_PARSE else deserializer,
    )


class _Capture:
    """Stands in for a server while a generated ``add_*_to_server`` registers its handlers."""

    def __init__(self) -> None:
        self.service = ""
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self.service, self.handlers = service, handlers


def register(add_to_server: Callable[[Any, Any], None], servicer: Any, server: grpc.Server) -> None:
    """``add_to_server(servicer, server)`` (a generated function) with these codecs on
    every method that sends or takes ``LayerMessage`` s."""
    capture = _Capture()
    add_to_server(servicer, capture)
    handlers = {}
    for name, handler in capture.handlers.items():
        serializer, deserializer = _codecs(
            handler.response_serializer, handler.request_deserializer
        )
        handlers[name] = handler._replace(
            response_serializer=serializer, request_deserializer=deserializer
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(capture.service, handlers),)
    )
    server.add_registered_method_handlers(capture.service, handlers)


class _FastChannel:
    """A channel whose layer-stream methods use ``encode`` / ``decode``; the rest as given."""

    def __init__(self, inner: Any):
        self._inner = inner

    def _method(
        self, kind: str, method: str, request_serializer=None, response_deserializer=None, **kw
    ):
        # The generated stubs name a request's serializer and a response's deserializer.
        serializer = encode if request_serializer == _PROTOBUF_SERIALIZE else request_serializer
        deserializer = decode if response_deserializer == _PROTOBUF_PARSE else response_deserializer
        return getattr(self._inner, kind)(
            method, request_serializer=serializer, response_deserializer=deserializer, **kw
        )

    def unary_unary(self, method, **kw):
        return self._method("unary_unary", method, **kw)

    def unary_stream(self, method, **kw):
        return self._method("unary_stream", method, **kw)

    def stream_unary(self, method, **kw):
        return self._method("stream_unary", method, **kw)

    def stream_stream(self, method, **kw):
        return self._method("stream_stream", method, **kw)


def fast_channel(channel: Any) -> _FastChannel:
    """``channel`` for a generated stub whose layer streams go through ``encode`` / ``decode``."""
    return _FastChannel(channel)

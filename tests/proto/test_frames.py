"""A process that hosts only SwarmX nodes never imports torch (``proto.frames``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_swarmx_host_imports_no_torch():
    # What Ray imports in a SwarmX host process: the host, the SwarmX actor and its servicer.
    code = (
        "import sys, emulator.host, swarmx.actor, swarmx.service, swarmx.tree\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_recast_chunk_rounds_as_torch_does():
    import torch

    from proto.domain import Chunk
    from proto.frames import recast_chunk

    values = torch.tensor([1.0, 1 / 3, -2.5e-3, 65504.0, 3.0e38], dtype=torch.float32)
    data = bytes(values.numpy().tobytes())
    chunk = Chunk(
        layer=0,
        step=1,
        name="w",
        dtype="float32",
        shape=(5,),
        offset=0,
        tensor_bytes=len(data),
        data=data,
    )
    for target in ("bfloat16", "float16"):
        recast = recast_chunk(chunk, target)
        expected = values.to(getattr(torch, target))
        got = torch.frombuffer(bytearray(recast.data), dtype=getattr(torch, target))
        assert torch.equal(got.view(torch.int16), expected.view(torch.int16))
        assert (recast.dtype, recast.tensor_bytes) == (target, 10)


def _recorded(streams: list[list], read: list):
    """The items of ``streams`` one after another, each put on ``read`` as it is taken."""
    for stream in streams:
        for item in stream:
            read.append(item)
            yield item


def test_next_layer_reads_one_layer_of_a_pass_stream_and_no_further():
    import pytest
    import torch

    from proto.frames import WireError, next_layer
    from proto.serde import layer_items

    layers = [
        {"w": torch.randn(10, 30), "empty": torch.zeros(0), "b": torch.randn(3)},
        {"w": torch.randn(2, 2)},
    ]
    streams = [list(layer_items(i, 0, 1, t, chunk_bytes=64)) for i, t in enumerate(layers)]
    read = []
    items = _recorded(streams, read)
    assert list(next_layer(items)) == streams[0]
    assert read == streams[0]  # the second layer's header is not read yet
    assert list(next_layer(items)) == streams[1]
    with pytest.raises(WireError, match="starts with a header"):
        list(next_layer(items))  # the stream is over
    with pytest.raises(WireError, match="1 of 3 tensors still to come"):
        list(next_layer(iter(streams[0][:-1])))
    with pytest.raises(WireError, match="tensors still to come"):
        list(next_layer(iter(streams[0][:3] + streams[1])))  # a header inside a layer


def _layer_streams(chunk_bytes: int = 64) -> list[list]:
    import torch

    from proto.serde import layer_items

    torch.manual_seed(0)
    layers = [
        {"w": torch.randn(10, 30), "empty": torch.zeros(0), "b": torch.randn(3)},  # 1212 bytes
        {"w": torch.randn(2, 2)},  # 16 bytes
        {},  # a header-only layer (DFA backward needs no weights)
    ]
    return [list(layer_items(i, 0, 1, t, chunk_bytes=chunk_bytes)) for i, t in enumerate(layers)]


def test_bundled_gathers_each_small_layer_and_reads_no_further_than_its_last_chunk():
    from proto.frames import Bundle, bundled, from_wire_stream

    streams = _layer_streams()
    read = []
    out = bundled(_recorded(streams, read), max_bytes=2048)
    first = next(out)
    assert first == Bundle(tuple(streams[0]))  # header and every chunk, in order
    assert read == streams[0]  # the next layer's header is not read yet
    assert list(out) == [Bundle(tuple(streams[1])), streams[2][0]]  # header-only: alone
    everything = [i for s in streams for i in s]
    assert list(from_wire_stream(bundled(everything, max_bytes=2048))) == everything


def test_bundled_sends_a_large_layer_item_by_item():
    from proto.frames import Bundle, bundled

    streams = _layer_streams()
    out = list(bundled(streams[0] + streams[1], max_bytes=1000))  # layer 0: 1212 bytes
    assert out == streams[0] + [Bundle(tuple(streams[1]))]


def test_bundled_sends_a_layer_cut_short_as_it_came():
    import dataclasses

    from proto.frames import Bundle, bundled

    streams = _layer_streams()
    cut = streams[0][:-1]
    # The stream ends inside the layer: what came goes on, nothing more.
    assert list(bundled(cut, max_bytes=4096)) == cut
    # Another layer's header comes inside it: both go on as they came.
    assert list(bundled(cut + streams[1], max_bytes=4096)) == cut + [Bundle(tuple(streams[1]))]
    # Its chunks hold more than its header says: they go on one by one.
    header, *chunks = streams[0]
    small = dataclasses.replace(header, total_bytes=100)
    assert list(bundled([small, *chunks], max_bytes=200)) == [small, *chunks]

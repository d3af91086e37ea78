"""Chunk-wise, cut-through fp32 gradient summation inside one SwarmX node."""

from __future__ import annotations

import dataclasses
import itertools
import random
import threading

import numpy as np
import pytest
import torch

from proto.domain import Chunk, Header, Phase, StreamItem
from proto.serde import Expected, WireError, decode_layer, layer_items
from swarmx.reduce import ChunkReduction

CHILDREN = ("node-0", "node-1", "node-2")
LAYER, STEP = 2, 5
CHUNK_BYTES = 64  # 16 float32 values per chunk
LAYOUT = [("w", (7, 9)), ("b", (7,)), ("s", ())]


def _grads(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    # Mixed magnitudes so that the order of the fp32 additions shows in the last bits.
    return {
        name: torch.randn(shape, generator=gen) * 10.0 ** torch.randint(-4, 5, shape, generator=gen)
        for name, shape in LAYOUT
    }


def _stream(child: str, seed: int, **kw) -> tuple[Header, list[Chunk]]:
    items = list(
        layer_items(
            kw.get("layer", LAYER),
            kw.get("step", STEP),
            Phase.BACKWARD,
            _grads(seed),
            dtype=kw.get("dtype", "float32"),
            chunk_bytes=kw.get("chunk_bytes", CHUNK_BYTES),
            sender=child,
        )
    )
    return items[0], items[1:]


class Recorder:
    """The ``emit`` callback: records what goes up, and when."""

    def __init__(self):
        self.messages: list[StreamItem] = []
        self.lock = threading.Lock()

    def __call__(self, message: StreamItem) -> None:
        with self.lock:
            self.messages.append(message)

    @property
    def chunks(self) -> list[Chunk]:
        return [m for m in self.messages if isinstance(m, Chunk)]

    def decoded(self) -> dict[str, torch.Tensor]:
        return decode_layer(self.messages, Expected(LAYER, STEP, Phase.BACKWARD, LAYOUT, "float32"))


def _streams(children=CHILDREN):
    return {child: _stream(child, seed=10 + i) for i, child in enumerate(children)}


def _run(order: list[tuple[str, int]], streams, children=CHILDREN) -> Recorder:
    """Feed (child, chunk index) events in ``order``; headers go first, per child."""
    recorder = Recorder()
    reduction = ChunkReduction(children, recorder)
    for child in children:
        reduction.add_header(child, streams[child][0], "swarmx-0-0")
    for child, index in order:
        reduction.add_chunk(child, index, streams[child][1][index])
    assert reduction.complete
    return recorder


def _in_order(streams, children=CHILDREN) -> list[tuple[str, int]]:
    n = len(streams[children[0]][1])
    return [(child, j) for j in range(n) for child in children]


def _reference(children=CHILDREN) -> dict[str, np.ndarray]:
    """numpy fp32 sum, in child order."""
    out = {}
    for name, _ in LAYOUT:
        total = _grads(10)[name].numpy().astype(np.float32).copy()
        for i in range(1, len(children)):
            total = total + _grads(10 + i)[name].numpy()
        out[name] = total
    return out


def test_sum_equals_numpy_fp32_sum_in_child_order():
    streams = _streams()
    recorder = _run(_in_order(streams), streams)
    out = recorder.decoded()
    reference = _reference()
    for name, _ in LAYOUT:
        assert out[name].dtype == torch.float32
        np.testing.assert_array_equal(out[name].numpy(), reference[name])
    # The inputs are such that summing in another order gives other bits.
    name = "w"
    other = _grads(12)[name].numpy() + _grads(11)[name].numpy() + _grads(10)[name].numpy()
    assert not np.array_equal(other, reference[name])


def test_header_goes_up_once_with_this_node_as_sender():
    streams = _streams()
    recorder = _run(_in_order(streams), streams)
    headers = [m for m in recorder.messages if isinstance(m, Header)]
    assert len(headers) == 1 and isinstance(recorder.messages[0], Header)
    child_header = streams["node-0"][0]
    assert headers[0].sender == "swarmx-0-0"
    assert (headers[0].layer, headers[0].step, headers[0].phase) == (LAYER, STEP, Phase.BACKWARD)
    assert headers[0].num_tensors == child_header.num_tensors
    assert headers[0].total_bytes == child_header.total_bytes


def test_chunks_go_up_in_order_with_their_metadata():
    streams = _streams()
    recorder = _run(_in_order(streams), streams)
    sent = streams["node-1"][1]
    assert len(recorder.chunks) == len(sent)
    for up, down in zip(recorder.chunks, sent, strict=True):
        assert (up.layer, up.step, up.name, up.dtype, up.offset, up.tensor_bytes) == (
            down.layer,
            down.step,
            down.name,
            down.dtype,
            down.offset,
            down.tensor_bytes,
        )
        assert list(up.shape) == list(down.shape) and len(up.data) == len(down.data)


def test_byte_counters():
    streams = _streams()
    recorder = ChunkReduction(CHILDREN, Recorder())
    for child in CHILDREN:
        recorder.add_header(child, streams[child][0], "x")
    for child, index in _in_order(streams):
        recorder.add_chunk(child, index, streams[child][1][index])
    payload = streams["node-0"][0].total_bytes
    assert recorder.received_bytes == len(CHILDREN) * payload
    assert recorder.emitted_bytes == payload


def test_cut_through_emits_chunk_as_soon_as_all_children_sent_it():
    streams = _streams()
    recorder = Recorder()
    reduction = ChunkReduction(CHILDREN, recorder)
    for child in CHILDREN:
        reduction.add_header(child, streams[child][0], "x")
    n = len(streams["node-0"][1])
    assert n > 3
    # Child 0 sends everything first: nothing can be summed yet.
    for j in range(n):
        reduction.add_chunk("node-0", j, streams["node-0"][1][j])
    assert recorder.chunks == []
    for j in range(n):
        reduction.add_chunk("node-1", j, streams["node-1"][1][j])
        assert len(recorder.chunks) == j  # node-2 has not sent chunk j yet
        reduction.add_chunk("node-2", j, streams["node-2"][1][j])
        # Chunk j goes up now, before any child's chunk j + 1 was seen from node-2.
        assert len(recorder.chunks) == j + 1
        assert recorder.chunks[j].offset == streams["node-0"][1][j].offset
        assert not reduction.complete or j == n - 1
    assert reduction.complete


def test_cut_through_with_concurrent_children():
    """Children in threads: chunk 0 goes up while every child is still holding chunk 1."""
    streams = _streams()
    recorder = Recorder()
    first_up = threading.Event()

    def emit(message):
        recorder(message)
        if isinstance(message, Chunk):
            first_up.set()

    reduction = ChunkReduction(CHILDREN, emit)
    for child in CHILDREN:
        reduction.add_header(child, streams[child][0], "x")
    errors: list[BaseException] = []

    def child_thread(child):
        try:
            reduction.add_chunk(child, 0, streams[child][1][0])
            assert first_up.wait(10), "chunk 0 did not go up before chunk 1 was sent"
            for j in range(1, len(streams[child][1])):
                reduction.add_chunk(child, j, streams[child][1][j])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=child_thread, args=(c,)) for c in CHILDREN]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert reduction.complete
    for name, _ in LAYOUT:
        np.testing.assert_array_equal(recorder.decoded()[name].numpy(), _reference()[name])


def test_result_is_bitwise_identical_for_any_arrival_interleaving():
    streams = _streams()
    reference = b"".join(c.data for c in _run(_in_order(streams), streams).chunks)
    n = len(streams["node-0"][1])
    rng = random.Random(0)
    orders = [
        [(c, j) for c in CHILDREN for j in range(n)],  # child by child
        [(c, j) for c in reversed(CHILDREN) for j in range(n)],
        [(c, j) for j in range(n) for c in reversed(CHILDREN)],
    ]
    for _ in range(20):
        # A random merge of the children's in-order streams.
        cursors = dict.fromkeys(CHILDREN, 0)
        order = []
        while len(order) < n * len(CHILDREN):
            child = rng.choice([c for c in CHILDREN if cursors[c] < n])
            order.append((child, cursors[child]))
            cursors[child] += 1
        orders.append(order)
    for order in orders:
        got = b"".join(c.data for c in _run(order, streams).chunks)
        assert got == reference


def test_header_arrival_order_does_not_matter():
    streams = _streams()
    expected = b"".join(c.data for c in _run(_in_order(streams), streams).chunks)
    for perm in itertools.permutations(CHILDREN):
        recorder = Recorder()
        reduction = ChunkReduction(CHILDREN, recorder)
        for child in perm:
            reduction.add_header(child, streams[child][0], "x")
        for child, index in _in_order(streams, perm):
            reduction.add_chunk(child, index, streams[child][1][index])
        assert b"".join(c.data for c in recorder.chunks) == expected


def test_single_child_passes_its_gradient_through():
    streams = _streams(("node-0",))
    recorder = _run(_in_order(streams, ("node-0",)), streams, ("node-0",))
    assert [c.data for c in recorder.chunks] == [c.data for c in streams["node-0"][1]]


# -- rejection ----------------------------------------------------------------


def _opened(children=CHILDREN):
    streams = _streams(children)
    recorder = Recorder()
    reduction = ChunkReduction(children, recorder)
    reduction.add_header(children[0], streams[children[0]][0], "x")
    return streams, recorder, reduction


def test_rejects_header_from_unknown_child():
    streams, recorder, reduction = _opened()
    with pytest.raises(WireError, match="node-7"):
        reduction.add_header("node-7", streams["node-1"][0], "x")
    fresh = ChunkReduction(CHILDREN, Recorder())
    with pytest.raises(WireError, match="not a child"):
        fresh.add_header("stranger", streams["node-1"][0], "x")


def test_rejects_chunk_from_unknown_child():
    streams, recorder, reduction = _opened()
    with pytest.raises(WireError, match="node-7"):
        reduction.add_chunk("node-7", 0, streams["node-1"][1][0])
    assert recorder.chunks == []


def test_rejects_chunk_before_the_childs_header():
    streams, recorder, reduction = _opened()
    with pytest.raises(WireError, match="node-1"):
        reduction.add_chunk("node-1", 0, streams["node-1"][1][0])
    fresh = ChunkReduction(CHILDREN, Recorder())
    with pytest.raises(WireError, match="header"):
        fresh.add_chunk("node-0", 0, streams["node-0"][1][0])


def test_rejects_second_header_from_same_child():
    streams, recorder, reduction = _opened()
    with pytest.raises(WireError, match="node-0"):
        reduction.add_header("node-0", streams["node-0"][0], "x")


@pytest.mark.parametrize(
    ("field", "value"),
    [("layer", LAYER + 1), ("step", STEP + 1), ("num_tensors", 2), ("total_bytes", 8)],
)
def test_rejects_header_that_differs_from_siblings(field, value):
    streams, recorder, reduction = _opened()
    header = dataclasses.replace(streams["node-1"][0], **{field: value})
    with pytest.raises(WireError, match="siblings"):
        reduction.add_header("node-1", header, "x")


def _chunk(streams, child, index, **changes) -> Chunk:
    if "shape" in changes:
        changes["shape"] = tuple(changes["shape"])
    return dataclasses.replace(streams[child][1][index], **changes)


@pytest.mark.parametrize(
    "changes",
    [
        {"name": "b"},
        {"offset": 64},
        {"data": b"\x00" * 32},
        {"shape": [9, 7]},
        {"layer": LAYER + 1},
        {"step": STEP + 1},
        {"tensor_bytes": 4},
    ],
    ids=lambda c: next(iter(c)),
)
def test_rejects_chunk_that_differs_from_siblings(changes):
    streams = _streams()
    recorder = Recorder()
    reduction = ChunkReduction(CHILDREN, recorder)
    for child in CHILDREN:
        reduction.add_header(child, streams[child][0], "x")
    reduction.add_chunk("node-0", 0, streams["node-0"][1][0])
    with pytest.raises(WireError):
        reduction.add_chunk("node-1", 0, _chunk(streams, "node-1", 0, **changes))
    assert recorder.chunks == []


@pytest.mark.parametrize("field", ["layer", "step"])
def test_rejects_chunk_of_another_layer_or_step_than_the_header(field):
    streams = _streams()
    reduction = ChunkReduction(CHILDREN, Recorder())
    for child in CHILDREN:
        reduction.add_header(child, streams[child][0], "x")
    # Even as the first chunk, when there is no sibling to compare with.
    bad = _chunk(streams, "node-0", 0, **{field: getattr(streams["node-0"][1][0], field) + 1})
    with pytest.raises(WireError, match=field):
        reduction.add_chunk("node-0", 0, bad)


def test_rejects_duplicate_chunk():
    streams = _streams()
    recorder = Recorder()
    reduction = ChunkReduction(CHILDREN, recorder)
    for child in CHILDREN:
        reduction.add_header(child, streams[child][0], "x")
    reduction.add_chunk("node-0", 0, streams["node-0"][1][0])
    with pytest.raises(WireError, match="twice"):
        reduction.add_chunk("node-0", 0, streams["node-0"][1][0])
    assert reduction.received_bytes == CHUNK_BYTES


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_rejects_non_float32_chunk(dtype):
    streams = _streams()
    reduction = ChunkReduction(CHILDREN, Recorder())
    for child in CHILDREN:
        reduction.add_header(child, streams[child][0], "x")
    _, chunks = _stream("node-0", seed=10, dtype=dtype)
    with pytest.raises(WireError, match="float32"):
        reduction.add_chunk("node-0", 0, chunks[0])
    assert reduction.received_bytes == 0


def test_rejects_chunk_that_is_not_whole_float32_values():
    streams = _streams()
    reduction = ChunkReduction(CHILDREN, Recorder())
    for child in CHILDREN:
        reduction.add_header(child, streams[child][0], "x")
    with pytest.raises(WireError, match="float32"):
        reduction.add_chunk("node-0", 0, _chunk(streams, "node-0", 0, data=b"\x00" * 6))

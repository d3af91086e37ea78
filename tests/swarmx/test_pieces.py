"""The SwarmX root's side of a layer split over MemoryX servers: join down, cut up."""

from __future__ import annotations

import queue
import threading

import pytest
import torch

from proto.domain import LayerAck, Phase
from proto.messages import ack_from_wire, ack_to_wire
from proto.serde import WIRE_DTYPES, Expected, LayerAssembler, decode_layer, encode_layer
from swarmx.pieces import END, HeldPiece, SplitLayer, SplitPush, joined_weights

LAYER, STEP = 3, 2
LAYOUT = [("w", (7, 9)), ("b", (7,))]
# Owner 0: w's first 30 elements; owner 1: the rest of w, and b whole.
SPLIT = SplitLayer(
    (
        (0, (HeldPiece("w[0:30]of7x9", "w", (7, 9), 0, 30),)),
        (
            1,
            (
                HeldPiece("w[30:63]of7x9", "w", (7, 9), 30, 63),
                HeldPiece("b", "b", (7,), 0, 7),
            ),
        ),
    )
)


def _full(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=gen) for name, shape in LAYOUT}


def _owned(full: dict[str, torch.Tensor], owner: int) -> dict[str, torch.Tensor]:
    pieces = SPLIT.owners[owner][1]
    return {
        p.key: full[p.name] if p.whole else full[p.name].reshape(-1)[p.start : p.stop].clone()
        for p in pieces
    }


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_owner_streams_join_into_the_whole_layer(dtype):
    full = _full(0)
    sources = [
        iter(
            list(
                encode_layer(
                    LAYER, STEP, Phase.FORWARD, _owned(full, k), dtype=dtype, chunk_bytes=24
                )
            )
        )
        for k in range(2)
    ]
    got = decode_layer(
        joined_weights(SPLIT, sources), Expected(LAYER, STEP, Phase.FORWARD, LAYOUT, dtype)
    )
    for name, tensor in full.items():
        assert torch.equal(got[name], tensor.to(WIRE_DTYPES[dtype]))


class _FakePush:
    """An owner's PushGradients: assembles what arrives as that owner's own layer stream."""

    def __init__(self, layout):
        self.layout = layout
        self.received: dict[str, torch.Tensor] = {}

    def future(self, messages, timeout=None):
        return _FakeFuture(self, messages)


class _FakeFuture:
    def __init__(self, owner: _FakePush, messages):
        self._done = threading.Event()
        self._error: BaseException | None = None

        def run():
            try:
                assembler = LayerAssembler(
                    Expected(LAYER, STEP, Phase.BACKWARD, owner.layout, "float32")
                )
                for message in messages:
                    assembler.add(message)
                owner.received = assembler.finish()
            except BaseException as exc:  # noqa: BLE001 (re-raised by result)
                self._error = exc
            self._done.set()

        threading.Thread(target=run, daemon=True).start()

    def done(self):
        return self._done.is_set()

    def cancel(self):
        return False

    def result(self):
        self._done.wait(10)
        if self._error is not None:
            raise self._error
        return ack_to_wire(LayerAck(LAYER, STEP, Phase.BACKWARD, update_applied=True))


def test_summed_gradient_chunks_are_cut_at_the_pieces_and_sent_to_their_owners():
    grads = _full(1)
    owners = [
        _FakePush([(p.key, (p.stop - p.start,) if not p.whole else p.shape) for p in pieces])
        for _, pieces in SPLIT.owners
    ]
    outbox: queue.Queue = queue.Queue()
    push = SplitPush(SPLIT, lambda owner: owners[owner], outbox, timeout_s=10)
    # 5 values a chunk: chunks straddle the cut at element 30 of w.
    for message in encode_layer(LAYER, STEP, Phase.BACKWARD, grads, chunk_bytes=20):
        outbox.put(message)
    outbox.put(END)
    ack = ack_from_wire(push.result())
    assert ack.update_applied and (ack.layer, ack.step) == (LAYER, STEP)
    for (_, pieces), owner in zip(SPLIT.owners, owners, strict=True):
        assert owner.received.keys() == {p.key for p in pieces}
        for p in pieces:
            want = grads[p.name] if p.whole else grads[p.name].reshape(-1)[p.start : p.stop]
            assert torch.equal(owner.received[p.key], want)

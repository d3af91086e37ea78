"""A compute node's gradient in its answer: encoded once, and read back by the parent as
the header and chunks it was made of."""

from __future__ import annotations

import torch

from nodes.gradient_out import GradientOut
from proto.domain import Chunk, Header, LayerAck, Phase
from proto.frames import expand, payload_bytes
from proto.messages import ack_from_wire, ack_to_wire, acks_in_messages
from proto.serde import layer_items
from proto.wire import decode

HEADER = Header(
    layer=1,
    step=3,
    phase=Phase.BACKWARD,
    num_tensors=2,
    pass_id=7,
    pass_position=5,
    pass_length=6,
    gradient_in_answer=True,
)


def _grads() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "0.weight": torch.randn(64, 32, generator=generator),
        "0.bias": torch.randn(64, generator=generator),
    }


def test_a_gradient_for_the_answer_is_its_encoded_message():
    grads = _grads()
    sent = GradientOut("node-0", chunk_bytes=2048).send(
        HEADER, grads, None, None, on_pass_stream=True
    )
    assert isinstance(sent.in_answer, bytes) and sent.call is None
    items = expand(decode(sent.in_answer))
    made = list(
        layer_items(1, 3, Phase.BACKWARD, grads, dtype="float32", chunk_bytes=2048, sender="node-0")
    )
    assert isinstance(items[0], Header) and items[0].pass_id == HEADER.pass_id
    chunks = [item for item in items if isinstance(item, Chunk)]
    assert [(c.name, c.offset, bytes(c.data)) for c in chunks] == [
        (c.name, c.offset, bytes(c.data)) for c in made if isinstance(c, Chunk)
    ]
    assert sent.payload_bytes == payload_bytes(made) == 4 * (64 * 32 + 64)


def test_an_answer_goes_up_with_the_gradient_s_message_as_it_was_encoded():
    """The answer holding the encoded message and one holding the items read back from it
    are the same bytes on the wire, and the parent reads the same gradient."""
    sent = GradientOut("node-0", chunk_bytes=2048).send(
        HEADER, _grads(), None, None, on_pass_stream=True
    )
    as_sent = LayerAck(layer=1, step=3, phase=Phase.BACKWARD, gradient=sent.in_answer)
    read_back = LayerAck(
        layer=1, step=3, phase=Phase.BACKWARD, gradient=expand(decode(sent.in_answer))
    )
    wire = ack_to_wire(as_sent).SerializeToString()
    assert wire == ack_to_wire(read_back).SerializeToString()
    parent = ack_from_wire(ack_to_wire(as_sent))
    assert [bytes(c.data) for c in parent.gradient[1:]] == [
        bytes(c.data) for c in read_back.gradient[1:]
    ]
    # Answers carrying more than the limit's worth of gradient messages go in two messages.
    size = len(sent.in_answer)
    assert [1 + len(m.following) for m in acks_in_messages([as_sent] * 3, 2 * size)] == [2, 1]

"""A SwarmX node that relays a pass asks its compute-node children for their gradients in
their answers (``LayerHeader.gradient_in_answer``), sums them as it sums ``ReducePass``
streams and sends the sum up; a layer's answer waits for the sum's, and a bad gradient in
an answer fails the pass with a message that names it. Real gRPC on loopback; the
children and the parent are fakes that record what they get.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc
import pytest
import torch

from proto import swarmx_pb2_grpc as sgrpc
from proto import tensor_pb2 as pb
from proto.rpc import channel, start_server
from proto.serde import encode_layer
from swarmx.service import SwarmXServicer
from swarmx.service import serve as serve_swarmx
from tests.swarmx.test_swarmx_service import SECURITY, TIMEOUT_S

PASS_ID = 11
STEP = 4
SHAPES = {"w": (3, 5), "b": (3,)}


def _weights() -> list[pb.LayerMessage]:
    """Layer 0's backward weight stream, the one layer of a pass."""
    tensors = {name: torch.ones(shape) for name, shape in SHAPES.items()}
    messages = list(encode_layer(0, STEP, pb.BACKWARD, tensors))
    header = messages[0].header
    header.pass_id, header.pass_position, header.pass_length = PASS_ID, 1, 1
    return messages


def _gradient(sender: str, value: float, *, layer: int = 0) -> pb.LayerMessage:
    """A compute node's gradient of ``layer``, every entry ``value``, as one bundle."""
    tensors = {name: torch.full(shape, value) for name, shape in SHAPES.items()}
    items = list(encode_layer(layer, STEP, pb.BACKWARD, tensors, sender=sender))
    items[0].header.pass_id = PASS_ID
    return pb.LayerMessage(bundle=pb.LayerBundle(items=items))


class GradientChild(sgrpc.LayerSinkServicer):
    """A compute node's stand-in: answers each backward layer with its gradient in the
    answer when the header asks for it (``gradient`` makes that answer)."""

    def __init__(self, name: str, value: float):
        self.name = name
        self.headers: list[pb.LayerHeader] = []
        self.gradient = lambda: _gradient(name, value)

    def DeliverPass(self, request_iterator, context):
        for message in request_iterator:
            items = message.bundle.items if message.HasField("bundle") else [message]
            for item in items:
                if item.HasField("header"):
                    self.headers.append(item.header)
            header = self.headers[-1]
            ack = pb.LayerAck(layer=header.layer, step=header.step, phase=header.phase, num_nodes=1)
            if header.gradient_in_answer:
                ack.gradient.CopyFrom(self.gradient())
                ack.gradient_bytes = 4 * 18
            yield ack


class Parent(sgrpc.SwarmXServicer):
    """The relay's parent: takes its gradient pass streams and answers each layer."""

    def __init__(self):
        self.received: list[pb.LayerMessage] = []
        self.answered = threading.Event()

    def ReducePass(self, request_iterator, context):
        for message in request_iterator:
            items = message.bundle.items if message.HasField("bundle") else [message]
            self.received += items
            header = items[0].header
            self.answered.set()
            yield pb.LayerAck(
                layer=header.layer, step=header.step, phase=pb.BACKWARD, update_applied=True
            )


class Tree:
    """A SwarmX node with two fake compute-node children and a fake parent."""

    def __init__(self):
        self.children = [GradientChild("node-0", 1.0), GradientChild("node-1", 2.0)]
        self.parent = Parent()
        self.servers, addresses = [], {}
        for child in self.children:
            server, addresses[child.name] = start_server(
                lambda s, c=child: sgrpc.add_LayerSinkServicer_to_server(c, s),
                "127.0.0.1",
                security=SECURITY,
            )
            self.servers.append(server)
        server, parent_address = start_server(
            lambda s: sgrpc.add_SwarmXServicer_to_server(self.parent, s),
            "127.0.0.1",
            security=SECURITY,
        )
        self.servers.append(server)
        self.servicer = SwarmXServicer("swarmx-0-0", security=SECURITY)
        server, address = serve_swarmx(self.servicer, "127.0.0.1", security=SECURITY)
        self.servers.append(server)
        self.servicer.connect(children=addresses, parent=parent_address, memoryx=None)
        self.stub = sgrpc.LayerSinkStub(channel(address, SECURITY))

    def run(self) -> list[pb.LayerAck]:
        return list(self.stub.DeliverPass(iter(_weights()), timeout=TIMEOUT_S))

    def stop(self) -> None:
        for server in self.servers:
            server.stop(grace=None)


@pytest.fixture
def tree() -> Iterator[Tree]:
    t = Tree()
    yield t
    t.stop()


def _values(items: list[pb.LayerMessage]) -> dict[str, torch.Tensor]:
    return {
        i.chunk.name: torch.frombuffer(bytearray(i.chunk.data), dtype=torch.float32)
        for i in items
        if i.HasField("chunk")
    }


def test_the_children_answer_with_their_gradients_and_the_sum_goes_up(tree):
    (ack,) = tree.run()
    assert all(h.gradient_in_answer for c in tree.children for h in c.headers)
    # One stream up carries the sum: 1 + 2 in every entry.
    assert tree.parent.received[0].header.layer == 0
    sums = _values(tree.parent.received)
    assert set(sums) == set(SHAPES)
    assert all(torch.equal(v, torch.full_like(v, 3.0)) for v in sums.values())
    # The layer is answered once the parent has accepted the sum, and says so.
    assert ack.num_nodes == 2 and ack.update_applied
    assert ack.gradient_bytes == 2 * 4 * 18
    assert not ack.HasField("gradient")
    assert tree.servicer.stats().reduced_in_bytes == 2 * 4 * 18


@pytest.mark.parametrize(
    "bad, says",
    [
        (lambda: _gradient("node-1", 2.0, layer=1), "with a gradient of layer 1"),
        (lambda: _gradient("node-9", 2.0), "from 'node-9', which is not a child"),
        (lambda: _gradient("node-0", 2.0), "of 'node-1' carries a layer of 'node-0'"),
        (lambda: pb.LayerMessage(bundle=pb.LayerBundle()), "must start with its layer's header"),
    ],
)
def test_a_bad_gradient_in_an_answer_fails_the_pass_and_names_it(tree, bad, says):
    tree.children[1].gradient = bad
    with pytest.raises(grpc.RpcError) as failed:
        tree.run()
    assert says in failed.value.details()
    # Nothing half-summed went up as if it were whole.
    assert not any(i.HasField("chunk") for i in tree.parent.received)

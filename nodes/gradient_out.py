"""How a compute node's gradient of a backward layer leaves it.

Three ways, by how the layer came: in the layer's answer, when the pass stream's sender
asked for it (``LayerHeader.gradient_in_answer``: a SwarmX node relaying the pass on its
loop) and the gradient fits one message; else, in a pipelined pass (``pass_id``), on the
pass's one ``SwarmX.ReducePass`` stream to the parent; else on its own ``SwarmX.Reduce``
call. The last two are answered once the sum is accepted upstream.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from proto.clients import time_left_s
from proto.domain import Header, Phase
from proto.frames import Bundle, bundled
from proto.serde import layer_items, payload_bytes
from proto.wire import encode
from swarmx.gradient_link import GradientLink


@dataclasses.dataclass
class Sent:
    """A layer's gradient on its way: ``in_answer`` (its message, for the layer's answer),
    or ``call`` (the future of the parent's answer); ``payload_bytes`` either way."""

    payload_bytes: int
    in_answer: bytes | None = None
    call: Any = None


class GradientOut:
    """A node's way up for its gradients: the parent's stub and the pass's gradient stream.
    Used under the node's compute lock (one layer at a time)."""

    def __init__(self, name: str, chunk_bytes: int):
        self.name = name
        self.chunk_bytes = chunk_bytes
        self.parent: Any = None  # the parent's SwarmXStub (made by the servicer)
        self._link: GradientLink | None = None  # the pipelined pass's ReducePass stream

    def send(
        self,
        header: Header,
        grads: Mapping[str, Any],
        masks: Mapping[str, Any] | None,
        context,
        *,
        on_pass_stream: bool,
    ) -> Sent:
        """Send (or pack for the answer) the gradient ``grads`` of ``header``'s layer;
        ``masks``: the pruned entries, whose gradients are not sent. ``on_pass_stream``: the
        layer came on a ``DeliverPass`` stream, whose deadline covers the pass."""
        items = list(
            layer_items(
                header.layer,
                header.step,
                Phase.BACKWARD,
                grads,
                dtype="float32",
                chunk_bytes=self.chunk_bytes,
                sender=self.name,
                masked_values=masks,
            )
        )
        sent = payload_bytes(items)
        if header.pass_id:  # SwarmX sends the sum up on the pass's streams
            items[0] = dataclasses.replace(items[0], pass_id=header.pass_id)
        # A pass's gradient stream takes a small layer as one message (``bundled``).
        packed = list(bundled(items)) if header.pass_id else items
        if header.gradient_in_answer and on_pass_stream and _one_bundle(packed):
            self._end_link(header)
            # Encoded now, the one copy of the values (into this process's shared-memory
            # ring when co-located): the chunks view the worker's gradients. The answer
            # carries that message as it is (not read back into items to be encoded again).
            return Sent(sent, in_answer=encode(packed[0]))
        # Encoded (copied once) now, for the same reason.
        messages = [encode(i) for i in packed]
        return Sent(sent, call=self._send(header, messages, context, on_pass_stream))

    def _end_link(self, header: Header) -> None:
        """A pass's stream whose earlier layers were too big for an answer ends with the
        pass's last layer (backward layer 0), as ``_send`` ends it."""
        link = self._link
        if header.layer == 0 and link is not None and link.pass_id == header.pass_id:
            link.close()
            self._link = None

    def _send(self, header: Header, messages: list[bytes], context, on_pass_stream: bool):
        """Start sending a layer's gradient to the parent: on its own ``Reduce`` call, or
        (a pipelined pass) on the pass's one ``ReducePass`` stream; its answer's future.

        On the pass's stream the messages go on from this thread if the stream has room for
        them now, else a pooled thread feeds them: the caller never waits (it holds the
        node's compute lock, and may be the event loop, which alone makes room)."""
        if not header.pass_id:
            return self.parent.Reduce.future(iter(messages), timeout=time_left_s(context))
        link = self._link
        if link is None or link.pass_id != header.pass_id or link.ended:
            if link is not None:
                link.cancel()  # of an earlier pass that did not finish: it is run again
            # The stream lives as long as the pass's gradients: on a pass stream, under its
            # deadline (its layers' summed); else a layer's deadline per backward layer left.
            timeout_s = time_left_s(context)
            if not on_pass_stream:
                timeout_s *= header.layer + 1
            link = GradientLink(self.parent.ReducePass, header.pass_id, timeout_s)
            self._link = link
        direct = link.takes_now(len(messages))
        call = link.send(header.layer, header.step, messages if direct else iter(messages))
        if header.layer == 0:  # a pass's last backward layer: its answers still come
            link.close()
            self._link = None
        return call


def _one_bundle(packed: list) -> bool:
    return len(packed) == 1 and isinstance(packed[0], Bundle)

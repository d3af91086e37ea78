"""MemoryX gRPC service: a thin shell over ParameterStore.

Every incoming gradient stream is validated in full before the store sees
it, so a bad message (wrong layer, step, phase, shape, dtype or size) is
rejected with INVALID_ARGUMENT and changes no state. Checkpoints are written
only into the run's checkpoint directory, under names MemoryX chooses.
"""

from __future__ import annotations

import resource
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from memoryx.checkpoint import (
    checkpoint_dir_name,
    checkpoint_name,
    confined_path,
    load_checkpoint_dir,
    load_confined_checkpoint,
    save_checkpoint,
    save_checkpoint_part,
)
from memoryx.config import MemoryXConfig, StoreBuilder, new_spill_dir
from memoryx.optim import Optimizer
from memoryx.sparsity import Sparsity
from memoryx.store import NonFiniteUpdate, ParameterStore, StepError
from proto import memoryx_pb2_grpc as mgrpc
from proto.domain import (
    CheckpointInfo,
    Header,
    LayerAck,
    LayerLayout,
    LayerRequest,
    ModelLayout,
    Phase,
    StreamItem,
    TensorSpec,
    TrafficStats,
)
from proto.frames import (
    BUNDLE_MAX_BYTES,
    Bundle,
    HeldLayers,
    StreamItems,
    bundled,
    payload_bytes,
)
from proto.loading import iter_decode_layers
from proto.messages import (
    EMPTY,
    ack_to_wire,
    acks_to_wire,
    checkpoint_to_wire,
    layout_to_wire,
    traffic_to_wire,
    unfolded,
    weights_request_from_wire,
)
from proto.rpc import (
    CANCEL_CHECK_S,
    NonFiniteValues,
    StepConflict,
    notifier,
    rpc_errors,
    rpc_stream_errors,
)
from proto.serde import (
    DEFAULT_CHUNK_BYTES,
    WIRE_DTYPES,
    Expected,
    LayerAssembler,
    WireError,
    from_wire_stream,
    layer_items,
    sends_sparse,
)
from proto.wire import register as register_fast

_PHASES = tuple(Phase)


@dataclass
class _Traffic:
    egress_bytes: int = 0
    ingress_bytes: int = 0
    num_weight_streams: int = 0
    num_gradient_streams: int = 0
    num_updates: int = 0
    num_duplicate_gradients: int = 0
    update_seconds: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)


class MemoryXServicer(mgrpc.MemoryXServicer):
    def __init__(
        self,
        optimizer: Optimizer,
        *,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        checkpoint_dir: str | None = None,
        resume: str | None = None,
        sparsity: Sparsity.Config | None = None,
        memoryx: MemoryXConfig | None = None,
        server: int = 0,
        layers: range | None = None,
        pieces: dict[int, list[str]] | None = None,
    ):
        """``checkpoint_dir``: where SaveCheckpoint writes and ``resume`` (a file name in it) is read."""
        self.optimizer = optimizer
        self.memoryx = memoryx if memoryx is not None else MemoryXConfig()
        self.server = server  # this server's index among memoryx.num_servers
        self.chunk_bytes = chunk_bytes
        self.sparsity = sparsity
        # Masks of the tensors whose gradient of (layer, step) comes as masked values:
        # those the backward weight stream sent sparse, unless it asked for dense gradients.
        self._gradient_masks: dict[tuple[int, int], dict] = {}
        self._masks_lock = threading.Lock()
        self.store: ParameterStore | None = None
        # Gradients of steps before this one were never applied here, so they are not re-runs.
        self.first_step = 0
        self.checkpoint_extra: dict = {}
        self.checkpoint_dir = checkpoint_dir
        if resume is not None:
            if checkpoint_dir is None:
                raise ValueError("resume names a checkpoint, but MemoryX has no checkpoint_dir.")
            staged = confined_path(checkpoint_dir, resume)
            if staged.is_dir():
                # A directory checkpoint: this server takes its ``layers``, on disk if tiered.
                self.store = load_checkpoint_dir(
                    staged,
                    optimizer,
                    sparsity,
                    layers=layers,
                    spill_dir=self._new_spill_dir(),
                    ram_budget_bytes=self.memoryx.ram_budget_bytes,
                    pieces=pieces,  # of the layers this server holds only part of
                )
            else:
                self.store, self.checkpoint_extra = load_confined_checkpoint(
                    checkpoint_dir, resume, optimizer, sparsity
                )
        self.traffic = _Traffic()
        self._peak_rss_bytes = 0
        # Steps up to this one are committed here (a commit of one of them is a no-op).
        self._committed_through = -1
        # A pass of several steps asks for a layer's next version before the update that
        # makes it has come (``_await_update``): per layer, the newest version whose
        # update was answered (``_answered``), and the condition its waiters wait on.
        self._answered_version: dict[int, int] = {}
        self._updates = threading.Condition()
        if self.store is not None:
            self._sample_rss()

    def _require_store(self) -> ParameterStore:
        if self.store is None:
            raise StepConflict("MemoryX holds no weights yet: call LoadWeights first")
        return self.store

    def _check_layer(self, layer: int) -> None:
        store = self._require_store()
        if layer not in store.layer_ids:
            raise WireError(
                f"layer {layer} does not exist; MemoryX holds layers "
                f"{store.layer_ids.start}..{store.layer_ids.stop - 1}"
            )

    def _check_step(self, layer: int, step: int) -> None:
        """A step is never negative and never beyond the version ``layer`` is at."""
        version = self._require_store().version(layer)
        if not 0 <= step <= version:
            raise WireError(
                f"step {step} is out of range for layer {layer}: it is at version {version}, "
                f"so steps 0..{version} can be asked for"
            )

    @rpc_errors
    def LoadWeights(self, request_iterator, context):
        if self.store is not None:
            raise StepConflict("MemoryX already holds weights; start a new MemoryX to load others")
        builder = None
        try:
            # One layer at a time: a tiered store writes each to disk before the next arrives.
            for index, (header, tensors) in enumerate(iter_decode_layers(request_iterator)):
                if builder is None:  # a server's layers start anywhere, then run on in order
                    builder = StoreBuilder(
                        self.optimizer,
                        sparsity=self.sparsity,
                        memoryx=self.memoryx,
                        layer_offset=header.layer,
                        spill_dir=self._new_spill_dir(),
                    )
                if header.layer != builder.layer_offset + index:
                    raise WireError(
                        f"layer streams must arrive in order: got layer {header.layer} at "
                        f"position {index}"
                    )
                builder.add(header.step, {name: t.float() for name, t in tensors.items()})
            if builder is None:
                raise ValueError("layers must hold at least one layer, got none.")
            store = builder.finish()
        except ValueError as exc:  # no layers, an empty layer, a negative step, a bad filter
            if isinstance(exc, WireError):
                raise
            raise WireError(f"cannot load these weights: {exc}") from None
        self.first_step = builder.step or 0
        self.store = store
        self._sample_rss()
        return EMPTY

    def _sample_rss(self) -> None:
        """The process's peak RSS so far, sampled when a load or a step ends, so that
        Stats stays the same between steps (a refused call must change nothing)."""
        self._peak_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _new_spill_dir(self) -> Path | None:
        if self.memoryx.spill_dir is None:
            return None
        return new_spill_dir(self.memoryx.spill_dir, self.server)

    @rpc_stream_errors
    def StreamWeights(self, request, context):
        yield from self._weights(weights_request_from_wire(request))

    @rpc_stream_errors
    def StreamPass(self, request_iterator, context):
        """The layers of one pass on one stream: each request answered as StreamWeights
        answers it, in order; the next request is read once a layer is sent (a backward
        layer is served when the root asks for it, as a StreamWeights call would be). A
        pass of several training steps asks for a layer's next version before its update
        has come: that layer waits for it (``_await_update``)."""
        # The call's end wakes such a wait (once per call: the root keeps the stream for
        # pass after pass, and a callback per wait would pile up on it).
        context.add_callback(notifier(self._updates))
        for message in request_iterator:
            requests = [weights_request_from_wire(part) for part in unfolded(message)]
            if len(requests) == 1:
                yield from self._weights(requests[0], bundle=True, context=context)
            else:
                yield from self._weights_of_run(requests, context)

    def _await_update(self, layer: int, step: int, context) -> None:
        """Wait until the update that makes ``layer``'s version ``step`` is applied and
        answered (``_answered``), the pass stream's call (``context``) still on: a pass that
        carries several training steps asks for the next step's first layers while this
        step's last gradients are on their way. Answered, not only applied: the counters on
        that answer (the step's MemoryX figures) must not count the next step's weights,
        and the root must have the answer, which frees the layer's place in its window, for
        the next step's layers to go down together as they do at a pass's start."""
        with self._updates:  # (StreamPass has the call's end wake it)
            while self._answered_version.get(layer, -1) < step:
                if not context.is_active():
                    raise StepConflict(
                        f"layer {layer} of step {step} was cancelled while it waited for "
                        f"its update of step {step - 1}"
                    )
                self._updates.wait(timeout=CANCEL_CHECK_S)

    def _weights_of_run(
        self, requests: list[LayerRequest], context=None
    ) -> Iterator[StreamItem | Bundle]:
        """Consecutive layers asked for in one message, in order: the small ones that come
        one after another in one ``Bundle`` while they fit ``BUNDLE_MAX_BYTES`` together
        (one message instead of one per layer), the others as ``_weights`` sends them."""
        held = HeldLayers(BUNDLE_MAX_BYTES)
        for request in requests:
            items = self._weights(request, bundle=True, context=context)
            first = next(items)  # (a small layer's only item; counted as it is made)
            if isinstance(first, Bundle):
                size = payload_bytes((first,))
                if not held.fits(size):
                    yield held.take()
                held.add(first, size)
                yield from items  # (nothing)
                continue
            if held:
                yield held.take()
            yield first
            yield from items
        if held:
            yield held.take()

    def _weights(
        self, request: LayerRequest, *, bundle: bool = False, context=None
    ) -> Iterator[StreamItem]:
        """One layer's weight stream (header, chunks) of version ``request.step``;
        ``bundle``: a small layer as one ``Bundle`` (a pass stream's readers expand it).
        ``context``: a pass stream's call, on which a pass of several steps asks for a
        later step's layer (``after_update``), up to one update ahead of it: it is sent
        once that update is answered."""
        self._check_layer(request.layer)
        if request.phase not in _PHASES:
            raise WireError(f"phase {request.phase} is not FORWARD, BACKWARD or EVAL")
        store = self._require_store()
        # Also when the update is applied but not answered yet: its answer's counters, and
        # the root's window, come first. (The update is in the same pass, before this
        # layer: its answer comes.) Further ahead is refused at once (``_check_step``).
        if (
            context is not None
            and request.after_update
            and request.step <= store.version(request.layer) + 1
        ):
            self._await_update(request.layer, request.step, context)
        self._check_step(request.layer, request.step)
        if request.commit_before:
            self._commit(request.commit_before - 1)
        if request.dtype not in WIRE_DTYPES:
            raise WireError(f"dtype {request.dtype!r} is not one of {', '.join(WIRE_DTYPES)}")
        try:
            weights = self.store.weights(request.layer, request.step)
            masks = self.store.masks(request.layer, request.step)
        except StepError as exc:
            raise StepConflict(str(exc)) from None
        store_sparsity = self.store.sparsity
        dense_gradients = bool(
            masks and store_sparsity and store_sparsity.needs_dense_gradients(request.step)
        )
        if request.phase == Phase.BACKWARD:
            sparse = {n: m for n, m in masks.items() if sends_sparse(m, request.dtype)}
            with self._masks_lock:
                self._gradient_masks[(request.layer, request.step)] = (
                    {} if dense_gradients else sparse
                )
        items = layer_items(
            request.layer,
            request.step,
            request.phase,
            weights,
            dtype=request.dtype,
            chunk_bytes=self.chunk_bytes,
            sender="memoryx",
            masks=masks,
            dense_gradients=dense_gradients and request.phase == Phase.BACKWARD,
        )
        if bundle:  # one message instead of one per item (proto.frames.bundled)
            items = bundled(items)
        # Counted before the last item goes: a pass's reader (StreamPass) stops at a layer's
        # last chunk, and the driver may read Stats as soon as the step is answered.
        last = next(items)
        sent = 0
        for item in items:
            # Chunks view the store's tensors; gRPC encodes each (proto.wire) before the next.
            yield last
            sent += payload_bytes((last,))
            last = item
        sent += payload_bytes((last,))
        with self.traffic.lock:
            self.traffic.egress_bytes += sent
            self.traffic.num_weight_streams += 1
        yield last

    @rpc_errors
    def PushGradients(self, request_iterator, context):
        items = from_wire_stream(request_iterator)
        ack = self._push_layer(next(items, None), items, until_complete=False)
        self._answered([ack])
        return ack_to_wire(ack)

    @rpc_stream_errors
    def PushPass(self, request_iterator, context):
        """The reduced gradient layers of pipelined passes on one stream (``PushPass``):
        each applied as ``PushGradients`` applies it, and answered as soon as it is; the
        layers that came in one message are answered in one (``LayerAck.following``). The
        root keeps the stream from one pass to the next (``proto.kept_streams``), its passes
        one after another (their ids are random per driver, so they are not ordered)."""
        items = StreamItems(request_iterator)
        answers: list[LayerAck] = []
        while (header := next(items, None)) is not None:
            if not isinstance(header, Header) or header.pass_id <= 0:
                raise WireError(
                    "each layer of a gradient pass stream starts with a header of its pass"
                )
            answers.append(self._push_layer(header, items, until_complete=True))
            if not items.buffered():  # (else the message brought the next layer too)
                yield acks_to_wire(answers)
                # Sent: the next step's requests for these layers may go now (after the
                # answer, so that the root has these layers' answers, and their places in
                # its window, before their next versions come).
                self._answered(answers)
                answers = []

    def _push_layer(self, header, items, *, until_complete: bool) -> LayerAck:
        """Check and apply one layer's gradient stream (``header``, then ``items``).

        ``until_complete``: the stream goes on after the layer (a pass stream), so reading
        stops once the layer is whole; else it reads to the end of the stream.
        """
        store = self._require_store()
        if not isinstance(header, Header):
            raise WireError("a gradient stream must start with a header")
        self._check_layer(header.layer)
        version = store.version(header.layer)
        # A re-run's gradient of a step not committed yet is taken (and ignored), also
        # behind a later step of the same pass (a pass of several steps run again).
        stale = header.step < version - 1 and not store.holds_snapshot(header.layer, header.step)
        if header.step > version or stale or header.step < self.first_step:
            raise WireError(
                f"gradient for layer {header.layer} is for step {header.step}, but that layer "
                f"expects the gradient of step {version}"
            )
        with self._masks_lock:
            masks = self._gradient_masks.get((header.layer, header.step))
        assembler = LayerAssembler(
            Expected(
                header.layer,
                header.step,
                Phase.BACKWARD,
                store.layout(header.layer),
                "float32",
                masks=masks or None,
            )
        )
        assembler.add(header)
        while not (until_complete and assembler.complete):
            item = next(items, None)
            if item is None:
                break
            assembler.add(item)
        grads = assembler.finish()
        started = time.perf_counter()
        try:
            applied = store.apply_gradients(header.layer, header.step, grads)
        except StepError as exc:
            raise WireError(str(exc)) from None
        except NonFiniteUpdate as exc:
            raise NonFiniteValues(str(exc)) from None
        elapsed = time.perf_counter() - started
        with self._masks_lock:
            self._gradient_masks.pop((header.layer, header.step), None)
        with self.traffic.lock:
            self.traffic.ingress_bytes += assembler.payload_bytes
            self.traffic.num_gradient_streams += 1
            self.traffic.num_updates += int(applied)
            self.traffic.num_duplicate_gradients += int(not applied)
            self.traffic.update_seconds += elapsed
        return LayerAck(
            layer=header.layer,
            step=header.step,
            phase=Phase.BACKWARD,
            update_applied=applied,
            memoryx=self._traffic_stats(gauges=False),
        )

    def _answered(self, acks: list[LayerAck]) -> None:
        """``acks`` (gradients taken) are answered: requests of a pass of several steps
        waiting for these layers' next versions (``_await_update``) may be served."""
        with self._updates:
            for ack in acks:
                answered = self._answered_version.get(ack.layer, -1)
                self._answered_version[ack.layer] = max(answered, ack.step + 1)
            self._updates.notify_all()

    @rpc_errors
    def CommitStep(self, request, context):
        self._commit(request.step)
        return self._traffic()

    def _commit(self, step: int) -> None:
        """Commit ``step`` (``CommitStep``, or a pass's ``commit_before``); once is enough."""
        store = self._require_store()
        if 0 <= step <= self._committed_through:
            return
        latest = max(store.version(layer) for layer in store.layer_ids)
        if not 0 <= step < latest:
            raise WireError(
                f"cannot commit step {step}: the layers are at versions up to {latest}, "
                f"so only steps 0..{latest - 1} have run"
            )
        try:
            store.commit(step)
            self._sample_rss()
        except StepError as exc:
            raise StepConflict(str(exc)) from None
        self._committed_through = max(self._committed_through, step)

    @rpc_errors
    def SaveCheckpoint(self, request, context):
        store = self._require_store()
        if self.checkpoint_dir is None:
            raise StepConflict("this MemoryX was started without a checkpoint directory")
        try:
            if self.memoryx.directory_checkpoints:
                # This server's layers and part file, in a directory MemoryX names; the
                # driver writes the manifest last, once every server has written its part.
                step = store.version(store.layer_ids.start)
                name = checkpoint_dir_name(step)
                directory = confined_path(self.checkpoint_dir, name)
                _, num_bytes = save_checkpoint_part(store, directory)
            else:
                step = store.committed_step()
                name = checkpoint_name(step)
                path = confined_path(self.checkpoint_dir, name)
                # A run that failed mid-step still keeps its last committed state.
                save_checkpoint(store, path, extra=self.checkpoint_extra, committed_only=True)
                num_bytes = path.stat().st_size
        except ValueError as exc:
            raise StepConflict(str(exc)) from None
        return checkpoint_to_wire(CheckpointInfo(name=name, step=step, num_bytes=num_bytes))

    @rpc_errors
    def Layout(self, request, context):
        store = self._require_store()
        return layout_to_wire(
            ModelLayout(
                layers=tuple(
                    LayerLayout(
                        tensors=tuple(TensorSpec(n, tuple(s)) for n, s in store.layout(i)),
                        num_kept=store.num_kept(i),
                    )
                    for i in store.layer_ids
                ),
                step=store.version(store.layer_ids.start),
            )
        )

    def Stats(self, request, context):
        return self._traffic()

    def _traffic(self):
        return traffic_to_wire(self._traffic_stats())

    def _traffic_stats(self, *, gauges: bool = True) -> TrafficStats:
        """The counters; ``gauges``: the store's sizes too (a sum over its layers' tensors,
        left out of the counters each backward answer carries)."""
        t = self.traffic
        store = self.store
        disk_read, disk_written = store.io_bytes() if store is not None else (0, 0)
        sizes = {}
        if gauges and store is not None:
            sizes = dict(
                state_bytes=store.state_bytes,
                resident_bytes=store.resident_bytes,
                peak_resident_bytes=store.peak_resident_bytes,
                process_peak_rss_bytes=self._peak_rss_bytes,
            )
        with t.lock:
            stats = TrafficStats(
                **sizes,
                disk_read_bytes=disk_read,
                disk_written_bytes=disk_written,
                egress_bytes=t.egress_bytes,
                ingress_bytes=t.ingress_bytes,
                num_weight_streams=t.num_weight_streams,
                num_gradient_streams=t.num_gradient_streams,
                num_updates=t.num_updates,
                num_duplicate_gradients=t.num_duplicate_gradients,
                update_seconds=t.update_seconds,
                num_skipped_steps=store.num_skipped_steps if store is not None else 0,
            )
        return stats

    def ResetStats(self, request, context):
        self.traffic = _Traffic()
        return EMPTY


def register(server: grpc.Server, servicer: MemoryXServicer) -> None:
    register_fast(mgrpc.add_MemoryXServicer_to_server, servicer, server)

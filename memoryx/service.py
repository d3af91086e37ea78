"""MemoryX gRPC service: a thin shell over ParameterStore.

Every incoming gradient stream is validated in full before the store sees
it, so a bad message (wrong layer, step, phase, shape, dtype or size) is
rejected with INVALID_ARGUMENT and changes no state. Checkpoints are written
only into the run's checkpoint directory, under names MemoryX chooses.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import grpc

from memoryx.checkpoint import (
    checkpoint_name,
    confined_path,
    load_confined_checkpoint,
    save_checkpoint,
)
from memoryx.optim import Optimizer
from memoryx.sparsity import Sparsity
from memoryx.store import ParameterStore, StepError
from proto import memoryx_pb2_grpc as mgrpc
from proto.domain import (
    CheckpointInfo,
    Chunk,
    Header,
    LayerAck,
    LayerLayout,
    ModelLayout,
    Phase,
    TensorSpec,
    TrafficStats,
)
from proto.messages import (
    EMPTY,
    ack_to_wire,
    checkpoint_to_wire,
    layout_to_wire,
    traffic_to_wire,
    weights_request_from_wire,
)
from proto.rpc import StepConflict, rpc_errors, rpc_stream_errors
from proto.serde import (
    DEFAULT_CHUNK_BYTES,
    WIRE_DTYPES,
    Expected,
    LayerAssembler,
    WireError,
    decode_layers,
    from_wire_stream,
    layer_items,
    sends_sparse,
    to_wire,
)

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
    ):
        """``checkpoint_dir``: where SaveCheckpoint writes and ``resume`` (a file name in it) is read."""
        self.optimizer = optimizer
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
            self.store, self.checkpoint_extra = load_confined_checkpoint(
                checkpoint_dir, resume, optimizer, sparsity
            )
        self.traffic = _Traffic()

    def _require_store(self) -> ParameterStore:
        if self.store is None:
            raise StepConflict("MemoryX holds no weights yet: call LoadWeights first")
        return self.store

    def _check_layer(self, layer: int) -> None:
        store = self._require_store()
        if not 0 <= layer < store.num_layers:
            raise WireError(
                f"layer {layer} does not exist; MemoryX holds layers 0..{store.num_layers - 1}"
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
        layers = decode_layers(request_iterator)
        for index, (header, _) in enumerate(layers):
            if header.layer != index:
                raise WireError(
                    f"layer streams must arrive in order: got layer {header.layer} at position {index}"
                )
        step = layers[0][0].step if layers else 0
        try:
            sparsity = None
            if self.sparsity is not None:
                sparsity = self.sparsity.build(
                    {
                        f"{index}.{name}": tuple(t.shape)
                        for index, (_, tensors) in enumerate(layers)
                        for name, t in tensors.items()
                    }
                )
            store = ParameterStore(
                [{name: t.float() for name, t in tensors.items()} for _, tensors in layers],
                self.optimizer,
                step=step,
                sparsity=sparsity,
            )
        except ValueError as exc:  # no layers, an empty layer, a negative step, a bad filter
            raise WireError(f"cannot load these weights: {exc}") from None
        self.first_step = step
        self.store = store
        return EMPTY

    @rpc_stream_errors
    def StreamWeights(self, request, context):
        request = weights_request_from_wire(request)
        self._check_layer(request.layer)
        if request.phase not in _PHASES:
            raise WireError(f"phase {request.phase} is not FORWARD, BACKWARD or EVAL")
        self._check_step(request.layer, request.step)
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
        sent = 0
        for item in layer_items(
            request.layer,
            request.step,
            request.phase,
            weights,
            dtype=request.dtype,
            chunk_bytes=self.chunk_bytes,
            sender="memoryx",
            masks=masks,
            dense_gradients=dense_gradients and request.phase == Phase.BACKWARD,
        ):
            if isinstance(item, Chunk):
                sent += len(item.data)
            yield to_wire(item)
        with self.traffic.lock:
            self.traffic.egress_bytes += sent
            self.traffic.num_weight_streams += 1

    @rpc_errors
    def PushGradients(self, request_iterator, context):
        store = self._require_store()
        items = from_wire_stream(request_iterator)
        header = next(items, None)
        if not isinstance(header, Header):
            raise WireError("a gradient stream must start with a header")
        self._check_layer(header.layer)
        version = store.version(header.layer)
        if header.step not in (version, version - 1) or header.step < self.first_step:
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
        for item in items:
            assembler.add(item)
        grads = assembler.finish()
        started = time.perf_counter()
        try:
            applied = store.apply_gradients(header.layer, header.step, grads)
        except StepError as exc:
            raise WireError(str(exc)) from None
        elapsed = time.perf_counter() - started
        with self._masks_lock:
            self._gradient_masks.pop((header.layer, header.step), None)
        with self.traffic.lock:
            self.traffic.ingress_bytes += assembler.payload_bytes
            self.traffic.num_gradient_streams += 1
            self.traffic.num_updates += int(applied)
            self.traffic.num_duplicate_gradients += int(not applied)
            self.traffic.update_seconds += elapsed
        return ack_to_wire(
            LayerAck(
                layer=header.layer,
                step=header.step,
                phase=Phase.BACKWARD,
                update_applied=applied,
            )
        )

    @rpc_errors
    def CommitStep(self, request, context):
        store = self._require_store()
        latest = max(store.version(layer) for layer in range(store.num_layers))
        if not 0 <= request.step < latest:
            raise WireError(
                f"cannot commit step {request.step}: the layers are at versions up to {latest}, "
                f"so only steps 0..{latest - 1} have run"
            )
        try:
            store.commit(request.step)
        except StepError as exc:
            raise StepConflict(str(exc)) from None
        return EMPTY

    @rpc_errors
    def SaveCheckpoint(self, request, context):
        store = self._require_store()
        if self.checkpoint_dir is None:
            raise StepConflict("this MemoryX was started without a checkpoint directory")
        step = store.committed_step()
        name = checkpoint_name(step)
        try:
            path = confined_path(self.checkpoint_dir, name)
            # A run that failed mid-step still keeps its last committed state.
            save_checkpoint(store, path, extra=self.checkpoint_extra, committed_only=True)
        except ValueError as exc:
            raise StepConflict(str(exc)) from None
        return checkpoint_to_wire(
            CheckpointInfo(name=name, step=step, num_bytes=path.stat().st_size)
        )

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
                    for i in range(store.num_layers)
                ),
                step=store.version(0),
            )
        )

    def Stats(self, request, context):
        t = self.traffic
        with t.lock:
            stats = TrafficStats(
                egress_bytes=t.egress_bytes,
                ingress_bytes=t.ingress_bytes,
                num_weight_streams=t.num_weight_streams,
                num_gradient_streams=t.num_gradient_streams,
                num_updates=t.num_updates,
                num_duplicate_gradients=t.num_duplicate_gradients,
                update_seconds=t.update_seconds,
            )
        return traffic_to_wire(stats)

    def ResetStats(self, request, context):
        self.traffic = _Traffic()
        return EMPTY


def register(server: grpc.Server, servicer: MemoryXServicer) -> None:
    mgrpc.add_MemoryXServicer_to_server(servicer, server)

from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Phase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PHASE_UNSPECIFIED: _ClassVar[Phase]
    FORWARD: _ClassVar[Phase]
    BACKWARD: _ClassVar[Phase]
    EVAL: _ClassVar[Phase]
PHASE_UNSPECIFIED: Phase
FORWARD: Phase
BACKWARD: Phase
EVAL: Phase

class LayerHeader(_message.Message):
    __slots__ = ("layer", "step", "phase", "num_tensors", "total_bytes", "sender", "dense_gradients", "pass_id", "pass_position", "pass_length", "gradient_in_answer")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    NUM_TENSORS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SENDER_FIELD_NUMBER: _ClassVar[int]
    DENSE_GRADIENTS_FIELD_NUMBER: _ClassVar[int]
    PASS_ID_FIELD_NUMBER: _ClassVar[int]
    PASS_POSITION_FIELD_NUMBER: _ClassVar[int]
    PASS_LENGTH_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_IN_ANSWER_FIELD_NUMBER: _ClassVar[int]
    layer: int
    step: int
    phase: Phase
    num_tensors: int
    total_bytes: int
    sender: str
    dense_gradients: bool
    pass_id: int
    pass_position: int
    pass_length: int
    gradient_in_answer: bool
    def __init__(self, layer: _Optional[int] = ..., step: _Optional[int] = ..., phase: _Optional[_Union[Phase, str]] = ..., num_tensors: _Optional[int] = ..., total_bytes: _Optional[int] = ..., sender: _Optional[str] = ..., dense_gradients: _Optional[bool] = ..., pass_id: _Optional[int] = ..., pass_position: _Optional[int] = ..., pass_length: _Optional[int] = ..., gradient_in_answer: _Optional[bool] = ...) -> None: ...

class TensorChunk(_message.Message):
    __slots__ = ("layer", "step", "name", "dtype", "shape", "offset", "tensor_bytes", "data", "encoding", "index_bytes", "shared")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TENSOR_BYTES_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    INDEX_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHARED_FIELD_NUMBER: _ClassVar[int]
    layer: int
    step: int
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    offset: int
    tensor_bytes: int
    data: bytes
    encoding: str
    index_bytes: int
    shared: SharedSlot
    def __init__(self, layer: _Optional[int] = ..., step: _Optional[int] = ..., name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., offset: _Optional[int] = ..., tensor_bytes: _Optional[int] = ..., data: _Optional[bytes] = ..., encoding: _Optional[str] = ..., index_bytes: _Optional[int] = ..., shared: _Optional[_Union[SharedSlot, _Mapping]] = ...) -> None: ...

class SharedSlot(_message.Message):
    __slots__ = ("segment", "slot", "length", "generation", "offset")
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    segment: str
    slot: int
    length: int
    generation: int
    offset: int
    def __init__(self, segment: _Optional[str] = ..., slot: _Optional[int] = ..., length: _Optional[int] = ..., generation: _Optional[int] = ..., offset: _Optional[int] = ...) -> None: ...

class LayerMessage(_message.Message):
    __slots__ = ("header", "chunk", "bundle")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_FIELD_NUMBER: _ClassVar[int]
    header: LayerHeader
    chunk: TensorChunk
    bundle: LayerBundle
    def __init__(self, header: _Optional[_Union[LayerHeader, _Mapping]] = ..., chunk: _Optional[_Union[TensorChunk, _Mapping]] = ..., bundle: _Optional[_Union[LayerBundle, _Mapping]] = ...) -> None: ...

class LayerBundle(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[LayerMessage]
    def __init__(self, items: _Optional[_Iterable[_Union[LayerMessage, _Mapping]]] = ...) -> None: ...

class LayerAck(_message.Message):
    __slots__ = ("layer", "step", "phase", "num_nodes", "loss_sum", "num_targets", "num_correct", "bytes_to_nodes", "gradient_bytes", "flops", "compute_seconds", "update_applied", "gradient", "following", "memoryx")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    NUM_NODES_FIELD_NUMBER: _ClassVar[int]
    LOSS_SUM_FIELD_NUMBER: _ClassVar[int]
    NUM_TARGETS_FIELD_NUMBER: _ClassVar[int]
    NUM_CORRECT_FIELD_NUMBER: _ClassVar[int]
    BYTES_TO_NODES_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    FLOPS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    UPDATE_APPLIED_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_FIELD_NUMBER: _ClassVar[int]
    FOLLOWING_FIELD_NUMBER: _ClassVar[int]
    MEMORYX_FIELD_NUMBER: _ClassVar[int]
    layer: int
    step: int
    phase: Phase
    num_nodes: int
    loss_sum: float
    num_targets: int
    num_correct: int
    bytes_to_nodes: int
    gradient_bytes: int
    flops: float
    compute_seconds: float
    update_applied: bool
    gradient: LayerMessage
    following: _containers.RepeatedCompositeFieldContainer[LayerAck]
    memoryx: TrafficStats
    def __init__(self, layer: _Optional[int] = ..., step: _Optional[int] = ..., phase: _Optional[_Union[Phase, str]] = ..., num_nodes: _Optional[int] = ..., loss_sum: _Optional[float] = ..., num_targets: _Optional[int] = ..., num_correct: _Optional[int] = ..., bytes_to_nodes: _Optional[int] = ..., gradient_bytes: _Optional[int] = ..., flops: _Optional[float] = ..., compute_seconds: _Optional[float] = ..., update_applied: _Optional[bool] = ..., gradient: _Optional[_Union[LayerMessage, _Mapping]] = ..., following: _Optional[_Iterable[_Union[LayerAck, _Mapping]]] = ..., memoryx: _Optional[_Union[TrafficStats, _Mapping]] = ...) -> None: ...

class TrafficStats(_message.Message):
    __slots__ = ("egress_bytes", "ingress_bytes", "num_weight_streams", "num_gradient_streams", "num_updates", "num_duplicate_gradients", "update_seconds", "state_bytes", "resident_bytes", "peak_resident_bytes", "disk_read_bytes", "disk_written_bytes", "process_peak_rss_bytes", "num_skipped_steps")
    EGRESS_BYTES_FIELD_NUMBER: _ClassVar[int]
    INGRESS_BYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_WEIGHT_STREAMS_FIELD_NUMBER: _ClassVar[int]
    NUM_GRADIENT_STREAMS_FIELD_NUMBER: _ClassVar[int]
    NUM_UPDATES_FIELD_NUMBER: _ClassVar[int]
    NUM_DUPLICATE_GRADIENTS_FIELD_NUMBER: _ClassVar[int]
    UPDATE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STATE_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    PEAK_RESIDENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    DISK_READ_BYTES_FIELD_NUMBER: _ClassVar[int]
    DISK_WRITTEN_BYTES_FIELD_NUMBER: _ClassVar[int]
    PROCESS_PEAK_RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_SKIPPED_STEPS_FIELD_NUMBER: _ClassVar[int]
    egress_bytes: int
    ingress_bytes: int
    num_weight_streams: int
    num_gradient_streams: int
    num_updates: int
    num_duplicate_gradients: int
    update_seconds: float
    state_bytes: int
    resident_bytes: int
    peak_resident_bytes: int
    disk_read_bytes: int
    disk_written_bytes: int
    process_peak_rss_bytes: int
    num_skipped_steps: int
    def __init__(self, egress_bytes: _Optional[int] = ..., ingress_bytes: _Optional[int] = ..., num_weight_streams: _Optional[int] = ..., num_gradient_streams: _Optional[int] = ..., num_updates: _Optional[int] = ..., num_duplicate_gradients: _Optional[int] = ..., update_seconds: _Optional[float] = ..., state_bytes: _Optional[int] = ..., resident_bytes: _Optional[int] = ..., peak_resident_bytes: _Optional[int] = ..., disk_read_bytes: _Optional[int] = ..., disk_written_bytes: _Optional[int] = ..., process_peak_rss_bytes: _Optional[int] = ..., num_skipped_steps: _Optional[int] = ...) -> None: ...

class Empty(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

from proto import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WeightsRequest(_message.Message):
    __slots__ = ("layer", "step", "phase", "dtype", "following")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    FOLLOWING_FIELD_NUMBER: _ClassVar[int]
    layer: int
    step: int
    phase: _tensor_pb2.Phase
    dtype: str
    following: _containers.RepeatedCompositeFieldContainer[WeightsRequest]
    def __init__(self, layer: _Optional[int] = ..., step: _Optional[int] = ..., phase: _Optional[_Union[_tensor_pb2.Phase, str]] = ..., dtype: _Optional[str] = ..., following: _Optional[_Iterable[_Union[WeightsRequest, _Mapping]]] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("step",)
    STEP_FIELD_NUMBER: _ClassVar[int]
    step: int
    def __init__(self, step: _Optional[int] = ...) -> None: ...

class CheckpointRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CheckpointReply(_message.Message):
    __slots__ = ("step", "num_bytes", "name")
    STEP_FIELD_NUMBER: _ClassVar[int]
    NUM_BYTES_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    step: int
    num_bytes: int
    name: str
    def __init__(self, step: _Optional[int] = ..., num_bytes: _Optional[int] = ..., name: _Optional[str] = ...) -> None: ...

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

class LayoutReply(_message.Message):
    __slots__ = ("layers", "step")
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    layers: _containers.RepeatedCompositeFieldContainer[LayerLayout]
    step: int
    def __init__(self, layers: _Optional[_Iterable[_Union[LayerLayout, _Mapping]]] = ..., step: _Optional[int] = ...) -> None: ...

class LayerLayout(_message.Message):
    __slots__ = ("tensors", "num_kept")
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    NUM_KEPT_FIELD_NUMBER: _ClassVar[int]
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    num_kept: int
    def __init__(self, tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., num_kept: _Optional[int] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

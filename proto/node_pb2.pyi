from proto import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class NodeStats(_message.Message):
    __slots__ = ("rank", "weight_bytes_received", "gradient_bytes_sent", "activation_bytes_held", "peak_activation_bytes", "weight_bytes_held", "flops", "compute_seconds", "backend_stats", "layer_input_bytes_held", "peak_layer_input_bytes")
    class BackendStatsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    RANK_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_BYTES_HELD_FIELD_NUMBER: _ClassVar[int]
    PEAK_ACTIVATION_BYTES_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_HELD_FIELD_NUMBER: _ClassVar[int]
    FLOPS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_STATS_FIELD_NUMBER: _ClassVar[int]
    LAYER_INPUT_BYTES_HELD_FIELD_NUMBER: _ClassVar[int]
    PEAK_LAYER_INPUT_BYTES_FIELD_NUMBER: _ClassVar[int]
    rank: int
    weight_bytes_received: int
    gradient_bytes_sent: int
    activation_bytes_held: int
    peak_activation_bytes: int
    weight_bytes_held: int
    flops: float
    compute_seconds: float
    backend_stats: _containers.ScalarMap[str, float]
    layer_input_bytes_held: int
    peak_layer_input_bytes: int
    def __init__(self, rank: _Optional[int] = ..., weight_bytes_received: _Optional[int] = ..., gradient_bytes_sent: _Optional[int] = ..., activation_bytes_held: _Optional[int] = ..., peak_activation_bytes: _Optional[int] = ..., weight_bytes_held: _Optional[int] = ..., flops: _Optional[float] = ..., compute_seconds: _Optional[float] = ..., backend_stats: _Optional[_Mapping[str, float]] = ..., layer_input_bytes_held: _Optional[int] = ..., peak_layer_input_bytes: _Optional[int] = ...) -> None: ...

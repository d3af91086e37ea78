from proto import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LayerRequest(_message.Message):
    __slots__ = ("layer", "step", "phase", "dtype", "without_weights", "pass_id", "pass_position", "pass_length", "following", "commit_before", "after_update")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    WITHOUT_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    PASS_ID_FIELD_NUMBER: _ClassVar[int]
    PASS_POSITION_FIELD_NUMBER: _ClassVar[int]
    PASS_LENGTH_FIELD_NUMBER: _ClassVar[int]
    FOLLOWING_FIELD_NUMBER: _ClassVar[int]
    COMMIT_BEFORE_FIELD_NUMBER: _ClassVar[int]
    AFTER_UPDATE_FIELD_NUMBER: _ClassVar[int]
    layer: int
    step: int
    phase: _tensor_pb2.Phase
    dtype: str
    without_weights: bool
    pass_id: int
    pass_position: int
    pass_length: int
    following: _containers.RepeatedCompositeFieldContainer[LayerRequest]
    commit_before: int
    after_update: bool
    def __init__(self, layer: _Optional[int] = ..., step: _Optional[int] = ..., phase: _Optional[_Union[_tensor_pb2.Phase, str]] = ..., dtype: _Optional[str] = ..., without_weights: _Optional[bool] = ..., pass_id: _Optional[int] = ..., pass_position: _Optional[int] = ..., pass_length: _Optional[int] = ..., following: _Optional[_Iterable[_Union[LayerRequest, _Mapping]]] = ..., commit_before: _Optional[int] = ..., after_update: _Optional[bool] = ...) -> None: ...

class LinkStats(_message.Message):
    __slots__ = ("link", "payload_bytes", "num_chunks")
    LINK_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    link: str
    payload_bytes: int
    num_chunks: int
    def __init__(self, link: _Optional[str] = ..., payload_bytes: _Optional[int] = ..., num_chunks: _Optional[int] = ...) -> None: ...

class SwarmXStats(_message.Message):
    __slots__ = ("name", "down", "up", "reduced_in_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DOWN_FIELD_NUMBER: _ClassVar[int]
    UP_FIELD_NUMBER: _ClassVar[int]
    REDUCED_IN_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    down: _containers.RepeatedCompositeFieldContainer[LinkStats]
    up: LinkStats
    reduced_in_bytes: int
    def __init__(self, name: _Optional[str] = ..., down: _Optional[_Iterable[_Union[LinkStats, _Mapping]]] = ..., up: _Optional[_Union[LinkStats, _Mapping]] = ..., reduced_in_bytes: _Optional[int] = ...) -> None: ...

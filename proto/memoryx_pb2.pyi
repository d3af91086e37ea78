from proto import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WeightsRequest(_message.Message):
    __slots__ = ("layer", "step", "phase", "dtype", "following", "commit_before", "after_update")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    FOLLOWING_FIELD_NUMBER: _ClassVar[int]
    COMMIT_BEFORE_FIELD_NUMBER: _ClassVar[int]
    AFTER_UPDATE_FIELD_NUMBER: _ClassVar[int]
    layer: int
    step: int
    phase: _tensor_pb2.Phase
    dtype: str
    following: _containers.RepeatedCompositeFieldContainer[WeightsRequest]
    commit_before: int
    after_update: bool
    def __init__(self, layer: _Optional[int] = ..., step: _Optional[int] = ..., phase: _Optional[_Union[_tensor_pb2.Phase, str]] = ..., dtype: _Optional[str] = ..., following: _Optional[_Iterable[_Union[WeightsRequest, _Mapping]]] = ..., commit_before: _Optional[int] = ..., after_update: _Optional[bool] = ...) -> None: ...

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

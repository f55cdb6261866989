from google.protobuf import any_pb2 as _any_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PENDING: _ClassVar[Status]
    RUNNING: _ClassVar[Status]
    SUCCESS: _ClassVar[Status]
    FAILED: _ClassVar[Status]
PENDING: Status
RUNNING: Status
SUCCESS: Status
FAILED: Status

class TaskRequest(_message.Message):
    __slots__ = ("task_id", "method", "args", "deps", "is_async")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    DEPS_FIELD_NUMBER: _ClassVar[int]
    IS_ASYNC_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    method: str
    args: _containers.RepeatedCompositeFieldContainer[_any_pb2.Any]
    deps: _containers.RepeatedScalarFieldContainer[str]
    is_async: bool
    def __init__(self, task_id: _Optional[str] = ..., method: _Optional[str] = ..., args: _Optional[_Iterable[_Union[_any_pb2.Any, _Mapping]]] = ..., deps: _Optional[_Iterable[str]] = ..., is_async: _Optional[bool] = ...) -> None: ...

class TaskResponse(_message.Message):
    __slots__ = ("task_id", "status", "result", "detail")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    status: Status
    result: str
    detail: str
    def __init__(self, task_id: _Optional[str] = ..., status: _Optional[_Union[Status, str]] = ..., result: _Optional[str] = ..., detail: _Optional[str] = ...) -> None: ...

class ResultRequest(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class ResultResponse(_message.Message):
    __slots__ = ("task_id", "status", "result", "detail")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    status: Status
    result: str
    detail: str
    def __init__(self, task_id: _Optional[str] = ..., status: _Optional[_Union[Status, str]] = ..., result: _Optional[str] = ..., detail: _Optional[str] = ...) -> None: ...

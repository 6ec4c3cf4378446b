from bmcell.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class UploadHeader(_message.Message):
    __slots__ = ("lab", "specimen", "diagnosis", "filename", "sha256", "role", "um_per_px")
    LAB_FIELD_NUMBER: _ClassVar[int]
    SPECIMEN_FIELD_NUMBER: _ClassVar[int]
    DIAGNOSIS_FIELD_NUMBER: _ClassVar[int]
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    UM_PER_PX_FIELD_NUMBER: _ClassVar[int]
    lab: str
    specimen: str
    diagnosis: str
    filename: str
    sha256: str
    role: str
    um_per_px: float
    def __init__(self, lab: _Optional[str] = ..., specimen: _Optional[str] = ..., diagnosis: _Optional[str] = ..., filename: _Optional[str] = ..., sha256: _Optional[str] = ..., role: _Optional[str] = ..., um_per_px: _Optional[float] = ...) -> None: ...

class UploadRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: UploadHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[UploadHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class UploadResponse(_message.Message):
    __slots__ = ("field_id", "sha256", "duplicate", "cells", "border_cells", "width", "height", "segmentation_seconds")
    FIELD_ID_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    CELLS_FIELD_NUMBER: _ClassVar[int]
    BORDER_CELLS_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    SEGMENTATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    field_id: int
    sha256: str
    duplicate: bool
    cells: int
    border_cells: int
    width: int
    height: int
    segmentation_seconds: float
    def __init__(self, field_id: _Optional[int] = ..., sha256: _Optional[str] = ..., duplicate: _Optional[bool] = ..., cells: _Optional[int] = ..., border_cells: _Optional[int] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., segmentation_seconds: _Optional[float] = ...) -> None: ...

class ListCellsRequest(_message.Message):
    __slots__ = ("lab", "specimen", "field_id", "limit", "page_size", "page_token")
    LAB_FIELD_NUMBER: _ClassVar[int]
    SPECIMEN_FIELD_NUMBER: _ClassVar[int]
    FIELD_ID_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    lab: str
    specimen: str
    field_id: int
    limit: int
    page_size: int
    page_token: str
    def __init__(self, lab: _Optional[str] = ..., specimen: _Optional[str] = ..., field_id: _Optional[int] = ..., limit: _Optional[int] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListCellsResponse(_message.Message):
    __slots__ = ("cells", "next_page_token")
    CELLS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    cells: _containers.RepeatedCompositeFieldContainer[_common_pb2.Cell]
    next_page_token: str
    def __init__(self, cells: _Optional[_Iterable[_Union[_common_pb2.Cell, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

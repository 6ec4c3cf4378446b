from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ClassProbabilities(_message.Message):
    __slots__ = ("probabilities", "classes", "top1")
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    TOP1_FIELD_NUMBER: _ClassVar[int]
    probabilities: _containers.RepeatedScalarFieldContainer[float]
    classes: _containers.RepeatedScalarFieldContainer[str]
    top1: int
    def __init__(self, probabilities: _Optional[_Iterable[float]] = ..., classes: _Optional[_Iterable[str]] = ..., top1: _Optional[int] = ...) -> None: ...

class ModelVersion(_message.Message):
    __slots__ = ("model_name", "version", "state", "input_size", "classes", "validation_accuracy", "test_accuracy", "created_at", "round_id", "note")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    INPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    TEST_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    version: int
    state: str
    input_size: int
    classes: _containers.RepeatedScalarFieldContainer[str]
    validation_accuracy: float
    test_accuracy: float
    created_at: str
    round_id: int
    note: str
    def __init__(self, model_name: _Optional[str] = ..., version: _Optional[int] = ..., state: _Optional[str] = ..., input_size: _Optional[int] = ..., classes: _Optional[_Iterable[str]] = ..., validation_accuracy: _Optional[float] = ..., test_accuracy: _Optional[float] = ..., created_at: _Optional[str] = ..., round_id: _Optional[int] = ..., note: _Optional[str] = ...) -> None: ...

class Morphometrics(_message.Message):
    __slots__ = ("cell_area_px", "nucleus_area_px", "nucleus_cell_ratio", "nucleus_axis_ratio", "nucleus_narrowest_widest_ratio")
    CELL_AREA_PX_FIELD_NUMBER: _ClassVar[int]
    NUCLEUS_AREA_PX_FIELD_NUMBER: _ClassVar[int]
    NUCLEUS_CELL_RATIO_FIELD_NUMBER: _ClassVar[int]
    NUCLEUS_AXIS_RATIO_FIELD_NUMBER: _ClassVar[int]
    NUCLEUS_NARROWEST_WIDEST_RATIO_FIELD_NUMBER: _ClassVar[int]
    cell_area_px: float
    nucleus_area_px: float
    nucleus_cell_ratio: float
    nucleus_axis_ratio: float
    nucleus_narrowest_widest_ratio: float
    def __init__(self, cell_area_px: _Optional[float] = ..., nucleus_area_px: _Optional[float] = ..., nucleus_cell_ratio: _Optional[float] = ..., nucleus_axis_ratio: _Optional[float] = ..., nucleus_narrowest_widest_ratio: _Optional[float] = ...) -> None: ...

class BoundingBox(_message.Message):
    __slots__ = ("x0", "y0", "x1", "y1")
    X0_FIELD_NUMBER: _ClassVar[int]
    Y0_FIELD_NUMBER: _ClassVar[int]
    X1_FIELD_NUMBER: _ClassVar[int]
    Y1_FIELD_NUMBER: _ClassVar[int]
    x0: int
    y0: int
    x1: int
    y1: int
    def __init__(self, x0: _Optional[int] = ..., y0: _Optional[int] = ..., x1: _Optional[int] = ..., y1: _Optional[int] = ...) -> None: ...

class Cell(_message.Message):
    __slots__ = ("cell_id", "field_id", "lab", "specimen", "bbox", "morphometrics", "touches_border", "status", "crop_key", "field_sha256")
    CELL_ID_FIELD_NUMBER: _ClassVar[int]
    FIELD_ID_FIELD_NUMBER: _ClassVar[int]
    LAB_FIELD_NUMBER: _ClassVar[int]
    SPECIMEN_FIELD_NUMBER: _ClassVar[int]
    BBOX_FIELD_NUMBER: _ClassVar[int]
    MORPHOMETRICS_FIELD_NUMBER: _ClassVar[int]
    TOUCHES_BORDER_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CROP_KEY_FIELD_NUMBER: _ClassVar[int]
    FIELD_SHA256_FIELD_NUMBER: _ClassVar[int]
    cell_id: int
    field_id: int
    lab: str
    specimen: str
    bbox: BoundingBox
    morphometrics: Morphometrics
    touches_border: bool
    status: str
    crop_key: str
    field_sha256: str
    def __init__(self, cell_id: _Optional[int] = ..., field_id: _Optional[int] = ..., lab: _Optional[str] = ..., specimen: _Optional[str] = ..., bbox: _Optional[_Union[BoundingBox, _Mapping]] = ..., morphometrics: _Optional[_Union[Morphometrics, _Mapping]] = ..., touches_border: _Optional[bool] = ..., status: _Optional[str] = ..., crop_key: _Optional[str] = ..., field_sha256: _Optional[str] = ...) -> None: ...

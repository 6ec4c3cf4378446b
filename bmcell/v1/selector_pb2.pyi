from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SelectionParameters(_message.Message):
    __slots__ = ("sample_size", "cst_threshold", "al_margin", "per_class_cap", "seed", "labs")
    SAMPLE_SIZE_FIELD_NUMBER: _ClassVar[int]
    CST_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    AL_MARGIN_FIELD_NUMBER: _ClassVar[int]
    PER_CLASS_CAP_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    LABS_FIELD_NUMBER: _ClassVar[int]
    sample_size: int
    cst_threshold: float
    al_margin: float
    per_class_cap: int
    seed: int
    labs: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, sample_size: _Optional[int] = ..., cst_threshold: _Optional[float] = ..., al_margin: _Optional[float] = ..., per_class_cap: _Optional[int] = ..., seed: _Optional[int] = ..., labs: _Optional[_Iterable[str]] = ...) -> None: ...

class SelectCandidatesRequest(_message.Message):
    __slots__ = ("round_id", "strategy", "parameters")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    strategy: str
    parameters: SelectionParameters
    def __init__(self, round_id: _Optional[int] = ..., strategy: _Optional[str] = ..., parameters: _Optional[_Union[SelectionParameters, _Mapping]] = ...) -> None: ...

class GetSelectionRequest(_message.Message):
    __slots__ = ("round_id",)
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    def __init__(self, round_id: _Optional[int] = ...) -> None: ...

class Selection(_message.Message):
    __slots__ = ("round_id", "strategy", "seed", "pool_size", "sample_size", "model_version", "counts_by_kind", "counts_by_class", "tasks_created", "existing")
    class CountsByKindEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class CountsByClassEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    POOL_SIZE_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_SIZE_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    COUNTS_BY_KIND_FIELD_NUMBER: _ClassVar[int]
    COUNTS_BY_CLASS_FIELD_NUMBER: _ClassVar[int]
    TASKS_CREATED_FIELD_NUMBER: _ClassVar[int]
    EXISTING_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    strategy: str
    seed: int
    pool_size: int
    sample_size: int
    model_version: int
    counts_by_kind: _containers.ScalarMap[str, int]
    counts_by_class: _containers.ScalarMap[str, int]
    tasks_created: int
    existing: bool
    def __init__(self, round_id: _Optional[int] = ..., strategy: _Optional[str] = ..., seed: _Optional[int] = ..., pool_size: _Optional[int] = ..., sample_size: _Optional[int] = ..., model_version: _Optional[int] = ..., counts_by_kind: _Optional[_Mapping[str, int]] = ..., counts_by_class: _Optional[_Mapping[str, int]] = ..., tasks_created: _Optional[int] = ..., existing: _Optional[bool] = ...) -> None: ...

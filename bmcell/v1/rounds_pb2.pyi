from bmcell.v1 import selector_pb2 as _selector_pb2
from bmcell.v1 import trainer_pb2 as _trainer_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RetryRoundRequest(_message.Message):
    __slots__ = ("round_id",)
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    def __init__(self, round_id: _Optional[int] = ...) -> None: ...

class StartRoundRequest(_message.Message):
    __slots__ = ("experiment", "strategy", "selection", "epochs", "review_quorum", "review_deadline_s", "initial_per_class", "validation_per_class", "test_per_class", "initial_reviews", "test_reviews", "wave_size", "max_waves", "gate")
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    SELECTION_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    REVIEW_QUORUM_FIELD_NUMBER: _ClassVar[int]
    REVIEW_DEADLINE_S_FIELD_NUMBER: _ClassVar[int]
    INITIAL_PER_CLASS_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_PER_CLASS_FIELD_NUMBER: _ClassVar[int]
    TEST_PER_CLASS_FIELD_NUMBER: _ClassVar[int]
    INITIAL_REVIEWS_FIELD_NUMBER: _ClassVar[int]
    TEST_REVIEWS_FIELD_NUMBER: _ClassVar[int]
    WAVE_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_WAVES_FIELD_NUMBER: _ClassVar[int]
    GATE_FIELD_NUMBER: _ClassVar[int]
    experiment: str
    strategy: str
    selection: _selector_pb2.SelectionParameters
    epochs: int
    review_quorum: float
    review_deadline_s: int
    initial_per_class: int
    validation_per_class: int
    test_per_class: int
    initial_reviews: int
    test_reviews: int
    wave_size: int
    max_waves: int
    gate: float
    def __init__(self, experiment: _Optional[str] = ..., strategy: _Optional[str] = ..., selection: _Optional[_Union[_selector_pb2.SelectionParameters, _Mapping]] = ..., epochs: _Optional[int] = ..., review_quorum: _Optional[float] = ..., review_deadline_s: _Optional[int] = ..., initial_per_class: _Optional[int] = ..., validation_per_class: _Optional[int] = ..., test_per_class: _Optional[int] = ..., initial_reviews: _Optional[int] = ..., test_reviews: _Optional[int] = ..., wave_size: _Optional[int] = ..., max_waves: _Optional[int] = ..., gate: _Optional[float] = ...) -> None: ...

class GetRoundRequest(_message.Message):
    __slots__ = ("round_id", "experiment")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    experiment: str
    def __init__(self, round_id: _Optional[int] = ..., experiment: _Optional[str] = ...) -> None: ...

class ListRoundsRequest(_message.Message):
    __slots__ = ("experiment", "page_size", "page_token")
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    experiment: str
    page_size: int
    page_token: str
    def __init__(self, experiment: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class Round(_message.Message):
    __slots__ = ("round_id", "experiment", "number", "strategy", "state", "model_in", "model_out", "message", "tasks_by_state", "labels_added_by_class", "labels_added", "validation_accuracy", "test_accuracy", "training_job", "created_at", "updated_at", "promoted", "short_classes", "test_balanced_accuracy", "test_macro_f1", "test_set", "failed_step", "training")
    class TasksByStateEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class LabelsAddedByClassEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MODEL_IN_FIELD_NUMBER: _ClassVar[int]
    MODEL_OUT_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TASKS_BY_STATE_FIELD_NUMBER: _ClassVar[int]
    LABELS_ADDED_BY_CLASS_FIELD_NUMBER: _ClassVar[int]
    LABELS_ADDED_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    TEST_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    TRAINING_JOB_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    PROMOTED_FIELD_NUMBER: _ClassVar[int]
    SHORT_CLASSES_FIELD_NUMBER: _ClassVar[int]
    TEST_BALANCED_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    TEST_MACRO_F1_FIELD_NUMBER: _ClassVar[int]
    TEST_SET_FIELD_NUMBER: _ClassVar[int]
    FAILED_STEP_FIELD_NUMBER: _ClassVar[int]
    TRAINING_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    experiment: str
    number: int
    strategy: str
    state: str
    model_in: int
    model_out: int
    message: str
    tasks_by_state: _containers.ScalarMap[str, int]
    labels_added_by_class: _containers.ScalarMap[str, int]
    labels_added: int
    validation_accuracy: float
    test_accuracy: float
    training_job: str
    created_at: str
    updated_at: str
    promoted: bool
    short_classes: _containers.RepeatedScalarFieldContainer[str]
    test_balanced_accuracy: float
    test_macro_f1: float
    test_set: str
    failed_step: str
    training: _trainer_pb2.TrainingProgress
    def __init__(self, round_id: _Optional[int] = ..., experiment: _Optional[str] = ..., number: _Optional[int] = ..., strategy: _Optional[str] = ..., state: _Optional[str] = ..., model_in: _Optional[int] = ..., model_out: _Optional[int] = ..., message: _Optional[str] = ..., tasks_by_state: _Optional[_Mapping[str, int]] = ..., labels_added_by_class: _Optional[_Mapping[str, int]] = ..., labels_added: _Optional[int] = ..., validation_accuracy: _Optional[float] = ..., test_accuracy: _Optional[float] = ..., training_job: _Optional[str] = ..., created_at: _Optional[str] = ..., updated_at: _Optional[str] = ..., promoted: _Optional[bool] = ..., short_classes: _Optional[_Iterable[str]] = ..., test_balanced_accuracy: _Optional[float] = ..., test_macro_f1: _Optional[float] = ..., test_set: _Optional[str] = ..., failed_step: _Optional[str] = ..., training: _Optional[_Union[_trainer_pb2.TrainingProgress, _Mapping]] = ...) -> None: ...

class ListRoundsResponse(_message.Message):
    __slots__ = ("rounds", "next_page_token")
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    rounds: _containers.RepeatedCompositeFieldContainer[Round]
    next_page_token: str
    def __init__(self, rounds: _Optional[_Iterable[_Union[Round, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

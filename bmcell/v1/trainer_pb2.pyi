from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class StartTrainingRequest(_message.Message):
    __slots__ = ("round_id", "epochs", "num_workers", "cpus_per_worker", "learning_rate", "batch_size", "per_class_cap", "max_accuracy_drop", "input_size")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    NUM_WORKERS_FIELD_NUMBER: _ClassVar[int]
    CPUS_PER_WORKER_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    PER_CLASS_CAP_FIELD_NUMBER: _ClassVar[int]
    MAX_ACCURACY_DROP_FIELD_NUMBER: _ClassVar[int]
    INPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    epochs: int
    num_workers: int
    cpus_per_worker: float
    learning_rate: float
    batch_size: int
    per_class_cap: int
    max_accuracy_drop: float
    input_size: int
    def __init__(self, round_id: _Optional[int] = ..., epochs: _Optional[int] = ..., num_workers: _Optional[int] = ..., cpus_per_worker: _Optional[float] = ..., learning_rate: _Optional[float] = ..., batch_size: _Optional[int] = ..., per_class_cap: _Optional[int] = ..., max_accuracy_drop: _Optional[float] = ..., input_size: _Optional[int] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class TrainingProgress(_message.Message):
    __slots__ = ("job_id", "epoch", "epochs", "loss", "train_accuracy", "validation_accuracy", "samples_per_second", "state", "message", "epoch_seconds", "training_seconds")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TRAINING_SECONDS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    epoch: int
    epochs: int
    loss: float
    train_accuracy: float
    validation_accuracy: float
    samples_per_second: float
    state: str
    message: str
    epoch_seconds: float
    training_seconds: float
    def __init__(self, job_id: _Optional[str] = ..., epoch: _Optional[int] = ..., epochs: _Optional[int] = ..., loss: _Optional[float] = ..., train_accuracy: _Optional[float] = ..., validation_accuracy: _Optional[float] = ..., samples_per_second: _Optional[float] = ..., state: _Optional[str] = ..., message: _Optional[str] = ..., epoch_seconds: _Optional[float] = ..., training_seconds: _Optional[float] = ...) -> None: ...

class TrainingJob(_message.Message):
    __slots__ = ("job_id", "round_id", "state", "epoch", "epochs", "validation_accuracy", "test_accuracy", "model_version", "published", "message", "loss", "samples_per_second", "epoch_seconds", "training_seconds")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    TEST_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    PUBLISHED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    EPOCH_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TRAINING_SECONDS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    round_id: int
    state: str
    epoch: int
    epochs: int
    validation_accuracy: float
    test_accuracy: float
    model_version: int
    published: bool
    message: str
    loss: float
    samples_per_second: float
    epoch_seconds: float
    training_seconds: float
    def __init__(self, job_id: _Optional[str] = ..., round_id: _Optional[int] = ..., state: _Optional[str] = ..., epoch: _Optional[int] = ..., epochs: _Optional[int] = ..., validation_accuracy: _Optional[float] = ..., test_accuracy: _Optional[float] = ..., model_version: _Optional[int] = ..., published: _Optional[bool] = ..., message: _Optional[str] = ..., loss: _Optional[float] = ..., samples_per_second: _Optional[float] = ..., epoch_seconds: _Optional[float] = ..., training_seconds: _Optional[float] = ...) -> None: ...

class GetModelReportRequest(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class ModelReport(_message.Message):
    __slots__ = ("model_name", "version", "state", "validation_accuracy", "test_accuracy", "metrics_json", "confusion_key", "note", "round_id", "validation_balanced_accuracy", "validation_macro_f1", "test_balanced_accuracy", "test_macro_f1", "test_set")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    TEST_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    METRICS_JSON_FIELD_NUMBER: _ClassVar[int]
    CONFUSION_KEY_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_BALANCED_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_MACRO_F1_FIELD_NUMBER: _ClassVar[int]
    TEST_BALANCED_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    TEST_MACRO_F1_FIELD_NUMBER: _ClassVar[int]
    TEST_SET_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    version: int
    state: str
    validation_accuracy: float
    test_accuracy: float
    metrics_json: str
    confusion_key: str
    note: str
    round_id: int
    validation_balanced_accuracy: float
    validation_macro_f1: float
    test_balanced_accuracy: float
    test_macro_f1: float
    test_set: str
    def __init__(self, model_name: _Optional[str] = ..., version: _Optional[int] = ..., state: _Optional[str] = ..., validation_accuracy: _Optional[float] = ..., test_accuracy: _Optional[float] = ..., metrics_json: _Optional[str] = ..., confusion_key: _Optional[str] = ..., note: _Optional[str] = ..., round_id: _Optional[int] = ..., validation_balanced_accuracy: _Optional[float] = ..., validation_macro_f1: _Optional[float] = ..., test_balanced_accuracy: _Optional[float] = ..., test_macro_f1: _Optional[float] = ..., test_set: _Optional[str] = ...) -> None: ...

"""The domain metrics every service exposes, defined once so names never drift.

Services import the object they update (``from bmcell.metrics import LABELS_RECORDED``)
and never declare their own series for these facts. Conventions (Prometheus naming
guide): base units in the name (``_seconds``, ``_bytes``, ``_ratio``), counters end in
``_total``, latencies are histograms, and a labelled metric emits no series until a
value is set, so importing this module adds nothing misleading to a service that does
not update a metric. ``docs/operations.md`` documents each one (a unit test checks),
and ``deploy/prometheus/rules/`` and the Grafana dashboard query them by these names:
renaming one is a breaking change.

The transport metrics (``bmcell_grpc_requests_total``,
``bmcell_grpc_request_duration_seconds``) live with the interceptor that records them
in ``bmcell.grpc_server``; the labeling API's HTTP equivalents are here because its
middleware has no shared home.

Label values are bounded sets: lab codes (tens), class codes (17), review kinds,
label sources, model names. Never put a cell, specimen, job or round id in a label.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

# --- the labelled library -----------------------------------------------------------

UNLABELLED_POOL_CELLS = Gauge(
    "bmcell_unlabelled_pool_cells",
    "Cells of a lab still unlabelled and eligible for sampling (excludes 'too difficult')",
    ["lab"],
)
REVIEW_BACKLOG_TASKS = Gauge(
    "bmcell_review_backlog_tasks",
    "Review tasks waiting for a reviewer (open or leased), by kind: cst or al",
    ["kind"],
)
LABELS_RECORDED = Counter(
    "bmcell_labels_recorded_total",
    "Labels recorded, by class code and source "
    "(initial, cst_confirmed, cst_corrected, al, too_difficult)",
    ["cell_class", "source"],
)

# --- models and rounds --------------------------------------------------------------

MODEL_ACTIVE_VERSION = Gauge(
    "bmcell_model_active_version",
    "Version number of the model version currently published (active) for classification",
    ["model"],
)
MODEL_ACCURACY = Gauge(
    "bmcell_model_accuracy_ratio",
    "Accuracy (0-1) of the latest evaluation of the active model version, by split: "
    "validation or test",
    ["model", "split"],
)
MODEL_ECE = Gauge(
    "bmcell_model_calibration_error_ratio",
    "Expected calibration error (15 equal-width bins) of the latest published version on "
    "the validation split, by probabilities: uncalibrated or calibrated (temperature scaled)",
    ["model", "probabilities"],
)
MODEL_TEMPERATURE = Gauge(
    "bmcell_model_temperature",
    "Temperature fitted on the validation split at the latest publish (1 = unchanged)",
    ["model"],
)

# --- training -----------------------------------------------------------------------

TRAINING_EPOCH = Gauge(
    "bmcell_training_epoch", "Epoch the running training job has completed", ["model"]
)
TRAINING_EPOCHS_PLANNED = Gauge(
    "bmcell_training_epochs_planned", "Epochs the running training job will run", ["model"]
)
TRAINING_LOSS = Gauge(
    "bmcell_training_loss", "Mean training loss of the last completed epoch", ["model"]
)
TRAINING_ACCURACY = Gauge(
    "bmcell_training_accuracy_ratio",
    "Validation accuracy (0-1) after the last completed epoch",
    ["model"],
)
TRAINING_SAMPLES_PER_SECOND = Gauge(
    "bmcell_training_samples_per_second",
    "Training throughput over the last completed epoch, all Ray workers together",
    ["model"],
)
TRAINING_EPOCH_SECONDS = Histogram(
    "bmcell_trainer_epoch_seconds",
    "Wall time of one training epoch, its validation and its checkpoint included",
    ["model"],
    buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 3600),
)
TRAINING_JOBS = Gauge(
    "bmcell_training_jobs",
    "Training jobs by state (queued, running, succeeded, failed, cancelled)",
    ["state"],
)
TRAINING_JOBS_FINISHED = Counter(
    "bmcell_training_jobs_finished_total",
    "Training jobs that reached a final state, by state: succeeded, failed or cancelled",
    ["state"],
)

# --- upload and segmentation ---------------------------------------------------------

UPLOAD_BYTES = Counter(
    "bmcell_upload_bytes_total", "Field-image bytes received from lab clients", ["lab"]
)
CELLS_SEGMENTED = Counter(
    "bmcell_cells_segmented_total",
    "Single-cell crops cut from uploaded field images and stored",
    ["lab"],
)

# --- classification and serving -----------------------------------------------------

PREDICTIONS_WRITTEN = Counter(
    "bmcell_predictions_written_total",
    "Per-cell predictions written to Postgres, by model",
    ["model"],
)
TRITON_REQUEST_SECONDS = Histogram(
    "bmcell_triton_request_duration_seconds",
    "Latency of one inference request to Triton as the classifier sees it",
    ["model"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
TRITON_BATCH_SIZE = Histogram(
    "bmcell_triton_batch_size",
    "Cells per inference request sent to Triton",
    ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
TRITON_REQUEST_ERRORS = Counter(
    "bmcell_triton_request_errors_total",
    "Inference requests to Triton that failed after retries, by gRPC status code",
    ["model", "code"],
)

# --- labeling API (HTTP) ------------------------------------------------------------

HTTP_REQUESTS = Counter(
    "bmcell_http_requests_total",
    "HTTP requests the labeling API answered, by route template, method and status",
    ["route", "method", "status"],
)
HTTP_REQUEST_SECONDS = Histogram(
    "bmcell_http_request_duration_seconds",
    "HTTP request latency of the labeling API, by route template",
    ["route", "method"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)

ALL: tuple[MetricWrapperBase, ...] = (
    UNLABELLED_POOL_CELLS,
    REVIEW_BACKLOG_TASKS,
    LABELS_RECORDED,
    MODEL_ACTIVE_VERSION,
    MODEL_ACCURACY,
    MODEL_ECE,
    MODEL_TEMPERATURE,
    TRAINING_EPOCH,
    TRAINING_EPOCHS_PLANNED,
    TRAINING_LOSS,
    TRAINING_ACCURACY,
    TRAINING_SAMPLES_PER_SECOND,
    TRAINING_EPOCH_SECONDS,
    TRAINING_JOBS,
    TRAINING_JOBS_FINISHED,
    UPLOAD_BYTES,
    CELLS_SEGMENTED,
    PREDICTIONS_WRITTEN,
    TRITON_REQUEST_SECONDS,
    TRITON_BATCH_SIZE,
    TRITON_REQUEST_ERRORS,
    HTTP_REQUESTS,
    HTTP_REQUEST_SECONDS,
)


def exposed_name(metric: MetricWrapperBase) -> str:
    """The name a scrape shows (counters gain ``_total`` back; prometheus_client strips it)."""
    name = metric._name  # the library keeps no public accessor for it
    return f"{name}_total" if metric._type == "counter" else name

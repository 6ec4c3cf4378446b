"""Typed settings, read from the environment in one place.

Every variable is ``BMCELL_<FIELD>`` (upper case). Addresses of what a process talks
to have no default: a missing one stops the process at start with a message naming
the variable. ``bmcell stack up`` sets all of them for the embedded stack; ``deploy/``
sets them for a cluster (a test checks the two agree with this module).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, TypeVar

from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from bmcell.errors import ConfigError

ENV_PREFIX = "BMCELL_"


class TlsSettings(BaseSettings):
    """How a process encrypts its connections (bmcell.tls): what a server presents and
    which CA a client trusts. Its own class so a CLI command reads it without the rest."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    tls: Literal["on", "off"] = Field(
        "on", description="off: plaintext everywhere, for debugging only (warned at start)"
    )
    tls_ca: Path | None = Field(None, description="PEM of the CA clients trust")
    tls_cert: Path | None = Field(None, description="PEM certificate (chain) a server presents")
    tls_key: Path | None = Field(None, description="PEM private key of tls_cert")


class Settings(TlsSettings):
    """What every process needs: where state lives and how to log."""

    database_url: str = Field(description="Postgres conninfo, e.g. postgresql://u@host:5432/bmcell")
    s3_endpoint: str = Field(
        description="host:port of the S3 server (SeaweedFS embedded, or MinIO)"
    )
    s3_access_key: SecretStr = SecretStr("bmcell")
    s3_secret_key: SecretStr = SecretStr("bmcell-secret")
    s3_secure: bool = False
    s3_region: str = "us-east-1"
    data_bucket: str = "bmcell-data"
    models_bucket: str = "bmcell-models"
    db_pool_min: int = Field(1, ge=1)
    db_pool_max: int = Field(8, ge=1)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "console"] = "json"
    outbound_timeout_s: float = Field(
        30.0, gt=0, description="deadline for calls to other services"
    )
    predict_cells_per_s: float = Field(
        50.0,
        gt=0,
        description="the slowest prediction a deadline allows: a call that predicts n cells "
        "gets outbound_timeout_s + n / this (Triton batches: triton_timeout_s + n / this)",
    )

    def prediction_deadline_s(self, n_cells: int) -> float:
        """Deadline of a call that predicts ``n_cells``: it follows the work."""
        return self.outbound_timeout_s + n_cells / self.predict_cells_per_s

    model_name: str = Field("bmcell-cell", description="the cell classifier's name in Triton")
    env: Literal["production", "development"] = Field(
        "production", description="development (the embedded stack) opens gRPC reflection"
    )


class ServiceSettings(Settings):
    """A gRPC service: where it listens and how it stops."""

    host: str = "127.0.0.1"
    grpc_port: int = Field(ge=1, le=65535)
    metrics_port: int = Field(ge=1, le=65535)
    grpc_workers: int = Field(8, ge=1)
    shutdown_grace_s: float = Field(10.0, ge=0)
    grpc_max_concurrent_rpcs: int = Field(
        100, ge=1, description="calls in progress at once; more are refused RESOURCE_EXHAUSTED"
    )
    grpc_max_message_bytes: int = Field(
        64 * 1024 * 1024, ge=1024 * 1024, description="largest request or response message"
    )
    max_page_size: int = Field(1000, ge=1, le=100_000, description="most rows per list page")
    # Every image decoded from a client's bytes (bmcell.images). Pillow's own
    # process-wide guard (89 M pixels) stays as a second line, so the cap is below it.
    max_image_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="bytes per image")
    max_image_pixels: int = Field(
        16_000_000, ge=10_000, le=89_000_000, description="width x height per image"
    )
    max_image_frames: int = Field(1, ge=1, le=64, description="pages of a multi-page TIFF")
    service_token: SecretStr | None = Field(
        None, description="this service's account token, sent on its calls to other services"
    )


class SegmenterSettings(ServiceSettings):
    grpc_port: int = Field(50051, ge=1, le=65535)
    metrics_port: int = Field(9101, ge=1, le=65535)
    max_upload_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="bytes per Upload stream")
    upload_idle_timeout_s: float = Field(
        30.0, gt=0, description="an Upload stream silent this long is cancelled"
    )
    upload_min_bytes_per_s: int = Field(
        8192, ge=0, description="an Upload slower than this on average is cancelled; 0: no floor"
    )
    crop_size: int = Field(282, ge=32)
    segmenter_model: str = Field(
        "unet", pattern=r"^[a-z0-9][a-z0-9_-]*$", description="weights: segmenter/<name>-vN.pt"
    )
    segment_concurrency: int = Field(
        2, ge=1, description="fields segmenting or queued for a worker at the same time"
    )
    # 0 measured faster on this shared 2-core machine (docs/segmenter.md, Speed).
    segmenter_workers: int = Field(
        0, ge=0, le=64, description="segmentation processes; 0: in the service's own threads"
    )
    torch_threads: int = Field(
        2, ge=1, description="intra-op threads of the network (each worker's)"
    )
    segment_timeout_s: float = Field(
        60.0, gt=0, description="a field's segmentation deadline, plus the per-megapixel part"
    )
    segment_seconds_per_megapixel: float = Field(
        30.0, ge=0, description="added to BMCELL_SEGMENT_TIMEOUT_S per million pixels"
    )
    fault_pause_before_commit_s: float = Field(
        0.0,
        ge=0,
        le=600,
        description="fault tests only: wait this long between writing a new field's "
        "objects and committing its rows (the window a crash leaves orphans in)",
    )


class ClassifierSettings(ServiceSettings):
    grpc_port: int = Field(50052, ge=1, le=65535)
    metrics_port: int = Field(9102, ge=1, le=65535)
    triton_url: str = Field(description="host:port of Triton's gRPC endpoint")
    triton_timeout_s: float = Field(10.0, gt=0)
    triton_retries: int = Field(3, ge=0)
    triton_repository: str = Field(
        "", description="local model repository Triton reads; empty: Triton reads the models bucket"
    )
    batch_size: int = Field(64, ge=1)
    triton_in_flight: int = Field(
        2, ge=1, description="pool-prediction requests in Triton at once (its instance_count)"
    )
    # Crops are 282x282 PNGs: far smaller caps than a field image's.
    max_image_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="bytes per crop")
    max_image_pixels: int = Field(
        1_000_000, ge=10_000, le=89_000_000, description="width x height per crop"
    )
    max_classify_cells: int = Field(10_000, ge=1, description="cell ids per Classify call")
    max_classify_images: int = Field(256, ge=1, description="images per Classify call")
    max_pool_cells: int = Field(1_000_000, ge=1, description="cell ids per PredictPool call")
    calibrate: bool = Field(
        True,
        description="apply the temperature a version was published with (softmax(logits/T)); "
        "false serves the network's raw softmax",
    )


class SelectorSettings(ServiceSettings):
    grpc_port: int = Field(50053, ge=1, le=65535)
    metrics_port: int = Field(9103, ge=1, le=65535)
    classifier_addr: str = Field(description="host:port of the classifier service")


class TrainerSettings(ServiceSettings):
    grpc_port: int = Field(50054, ge=1, le=65535)
    metrics_port: int = Field(9104, ge=1, le=65535)
    ray_address: str = Field(description="Ray cluster address (host:port of the GCS)")
    classifier_addr: str = Field(description="host:port of the classifier service")
    num_workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    epochs: int = Field(30, ge=1, description="250 in the study; the CPU default is 30")
    input_size: int = Field(64, ge=32, description="network input (bmcell.network)")
    batch_size: int = Field(16, ge=1, description="per Ray worker")
    learning_rate_first: float = Field(0.01, gt=0, description="SGD lr with no previous model")
    learning_rate_later: float = Field(0.005, gt=0, description="SGD lr when transferring")
    momentum: float = Field(0.9, ge=0, lt=1)
    per_class_cap: int = Field(1000, ge=1, description="training cells kept per class")
    max_accuracy_drop: float = Field(
        0.01, ge=0, description="promotion gate: allowed validation-accuracy drop vs active"
    )
    max_failures: int = Field(3, ge=0, description="Ray worker-group restarts per job")
    checkpoints_to_keep: int = Field(2, ge=1)
    activate_timeout_s: float = Field(300.0, gt=0, description="deadline of ActivateModel")
    progress_poll_s: float = Field(1.0, gt=0, description="how often the driver reads progress")


class RoundsSettings(ServiceSettings):
    grpc_port: int = Field(50055, ge=1, le=65535)
    metrics_port: int = Field(9105, ge=1, le=65535)
    selector_addr: str = Field(description="host:port of the selector service")
    trainer_addr: str = Field(description="host:port of the trainer service")
    poll_interval_s: float = Field(1.0, gt=0, description="how often live rounds are advanced")
    selection_timeout_s: float = Field(
        300.0,
        gt=0,
        description="deadline of one selection call besides its sample's prediction "
        "(which adds sample_size / predict_cells_per_s)",
    )


class LabelApiSettings(Settings):
    host: str = "127.0.0.1"
    http_port: int = Field(8080, ge=1, le=65535)
    lease_seconds: int = Field(300, ge=1, description="how long a reviewer holds a task")
    skip_seconds: int = Field(
        600, ge=0, description="how long a skipped task is not offered again to who skipped it"
    )
    required_reviews: int = Field(
        3, ge=1, le=9, description="answers needed on initial, validation and test tasks"
    )
    export_max_rows: int = Field(500_000, ge=1)
    # Imported crops (`bmcell import`): any size in, fitted into the segmenter's frame.
    crop_size: int = Field(282, ge=32, description="the crop frame imported cells are fitted into")
    import_max_pixels: int = Field(
        16_000_000, ge=10_000, le=89_000_000, description="width x height per imported image"
    )
    max_body_bytes: int = Field(
        1024 * 1024, ge=1024, description="request body limit, enforced before authentication"
    )
    classifier_addr: str = Field(
        "", description="host:port of the classifier; a report predicts unclassified cells there"
    )
    service_token: SecretStr | None = Field(
        None, description="this service's account token, sent on its calls to the classifier"
    )


S = TypeVar("S", bound=Settings)


def load(cls: type[S], **overrides: object) -> S:
    """Build ``cls`` from the environment; a bad or missing value raises ConfigError."""
    try:
        return cls(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            name = ENV_PREFIX + "_".join(str(p) for p in err["loc"]).upper()
            problems.append(
                f"{name} is required" if err["type"] == "missing" else f"{name}: {err['msg']}"
            )
        raise ConfigError(f"{cls.__name__}: " + "; ".join(problems)) from exc

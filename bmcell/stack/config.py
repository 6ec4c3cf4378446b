"""Where the embedded stack keeps its files and which ports it takes.

All ports derive from one base (``BMCELL_STACK_PORT_BASE``) so a second stack, for
example the test suite's, runs beside a developer's by changing one number.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO = Path(__file__).resolve().parents[2]

# Offsets from the port base; one table so nothing collides by accident.
PORT_OFFSETS: dict[str, int] = {
    "postgres": 0,
    "s3": 1,
    "triton_http": 2,
    "triton_grpc": 3,
    "triton_metrics": 4,
    "ray": 5,
    "ray_node_manager": 6,
    "ray_object_manager": 7,
    "ray_client": 8,
    "ray_metrics": 9,
    "segmenter": 10,
    "segmenter_metrics": 11,
    "classifier": 12,
    "classifier_metrics": 13,
    "selector": 14,
    "selector_metrics": 15,
    "trainer": 16,
    "trainer_metrics": 17,
    "labelapi": 18,
    "prometheus": 19,
    "ray_dashboard_agent": 20,
    "ray_runtime_env_agent": 21,
    "ray_dashboard_agent_grpc": 22,
    "rounds": 23,
    "rounds_metrics": 24,
    "ray_workers_min": 30,
    "ray_workers_max": 79,
    # SeaweedFS (the S3 store): master, volume server, filer, each with a gRPC port.
    "s3_master": 80,
    "s3_master_grpc": 81,
    "s3_volume": 82,
    "s3_volume_grpc": 83,
    "s3_filer": 84,
    "s3_filer_grpc": 85,
    "s3_grpc": 86,
    "s3_metrics": 87,
}


class StackConfig(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="BMCELL_STACK_", extra="ignore", populate_by_name=True
    )

    run_dir: Path = Field(REPO / ".run", description="data, logs and state of the stack")
    # Below the kernel's ephemeral range (32768-60999 on Linux): a port there can be
    # taken at any moment by some process's outgoing connection, and then a service
    # cannot bind it.
    port_base: int = Field(25400, ge=1024, le=32600)
    host: str = "127.0.0.1"
    ray_cpus: int = Field(2, ge=1)
    ray_object_store_mb: int = Field(512, ge=78)
    ready_timeout_s: float = Field(120.0, gt=0)
    with_prometheus: bool = False
    # The same variable every process reads: off makes the whole stack plaintext.
    tls: Literal["on", "off"] = Field("on", validation_alias="BMCELL_TLS")

    def port(self, name: str) -> int:
        return self.port_base + PORT_OFFSETS[name]

    def addr(self, name: str) -> str:
        return f"{self.host}:{self.port(name)}"

    @property
    def logs_dir(self) -> Path:
        return self.run_dir / "logs"

    @property
    def state_file(self) -> Path:
        return self.run_dir / "stack.json"

    @property
    def tls_dir(self) -> Path:
        """The local CA (its key never leaves this folder) and the server certificate."""
        return self.run_dir / "tls"

    @property
    def env_file(self) -> Path:
        return self.run_dir / "stack.env"


def train_on_every_ray_cpu(cfg: StackConfig, environ: dict[str, str]) -> None:
    """Give the stack's training jobs one Ray worker per CPU of its Ray head, unless
    ``BMCELL_NUM_WORKERS`` is already set (the trainer's own default is one worker).

    For the runs that train for minutes (the demo, the experiment): on this 2-core
    machine two workers of one thread trained 317 to 359 samples/s at 64 px, one
    worker about 100 (docs/trainer.md). The test suite keeps one worker: its jobs
    train a few hundred cells, where DDP's start costs more than it saves. Two
    workers of batch 16 make a global batch of 32.
    """
    environ.setdefault("BMCELL_NUM_WORKERS", str(cfg.ray_cpus))
    environ.setdefault("BMCELL_CPUS_PER_WORKER", "1")

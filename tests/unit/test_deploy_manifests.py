"""deploy/: every file parses, the Kubernetes manifests build, validate and are hardened."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from bmcell.stack.components import GRPC_SERVICES
from bmcell.stack.config import REPO

DEPLOY = REPO / "deploy"
BASE = DEPLOY / "k8s" / "base"
OVERLAY = DEPLOY / "k8s" / "overlays" / "production"
# Custom resources whose schemas ship with their operators, not with Kubernetes.
CRD_KINDS = {
    "RayCluster",
    "ServiceMonitor",
    "PodMonitor",
    "PrometheusRule",
    "Certificate",
    "Issuer",
}
POD_KINDS = {"Deployment", "StatefulSet", "Job"}


def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def base_objects() -> list[dict]:
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    docs = []
    for name in kustomization["resources"]:
        docs += [d for d in yaml.safe_load_all((BASE / name).read_text()) if d]
    return docs


def pod_specs(objects: list[dict]) -> list[tuple[str, dict]]:
    specs = []
    for obj in objects:
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] in POD_KINDS:
            specs.append((name, obj["spec"]["template"]["spec"]))
        elif obj["kind"] == "RayCluster":
            specs.append((f"{name}/head", obj["spec"]["headGroupSpec"]["template"]["spec"]))
            for group in obj["spec"]["workerGroupSpecs"]:
                specs.append((f"{name}/{group['groupName']}", group["template"]["spec"]))
    return specs


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_file_parses(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} holds no document"


@pytest.mark.parametrize(
    "path", sorted(DEPLOY.rglob("*.json")), ids=lambda p: str(p.relative_to(DEPLOY))
)
def test_every_json_file_parses(path: Path) -> None:
    assert json.loads(path.read_text())


def test_kustomize_builds_base_and_overlay() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with built-in kustomize) not installed; cannot build overlays")
    for root in (BASE, OVERLAY):
        out = subprocess.run(
            [kubectl, "kustomize", str(root)], capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        objects = [d for d in yaml.safe_load_all(out.stdout) if d]
        assert all(
            o["metadata"].get("namespace") == "bmcell" for o in objects if o["kind"] != "Namespace"
        )
    images = {
        c["image"]
        for _, spec in pod_specs(objects)
        for c in spec["containers"]
        if "bmcell/" in c["image"]
    }
    assert all(i.startswith("registry.example.org/bmcell/") for i in images), images


def test_builtin_kinds_validate_against_kubernetes_schemas() -> None:
    kv = pytest.importorskip(
        "kubernetes_validate",
        reason="kubernetes-validate (PyPI, bundles the Kubernetes JSON schemas) is not "
        "installed: schema validation of deploy/k8s skipped",
    )
    version = kv.latest_version()
    checked = 0
    for obj in base_objects():
        if obj["kind"] in CRD_KINDS:
            continue  # no offline schema: checked structurally below
        kv.validate(obj, version, strict=True)
        checked += 1
    assert checked >= 20


def test_custom_resources_have_the_expected_shape() -> None:
    objects = {(o["kind"], o["metadata"]["name"]): o for o in base_objects()}
    ray = objects[("RayCluster", "bmcell-ray")]
    assert ray["apiVersion"] == "ray.io/v1"
    (workers,) = ray["spec"]["workerGroupSpecs"]
    assert workers["minReplicas"] <= workers["replicas"] <= workers["maxReplicas"]
    monitor = objects[("ServiceMonitor", "bmcell")]
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    # Every scraped Service names a port "metrics"; the job label is the Service name.
    scraped = {
        o["metadata"]["name"]
        for o in objects.values()
        if o["kind"] == "Service" and any(p["name"] == "metrics" for p in o["spec"]["ports"])
    }
    assert scraped == {
        "segmenter",
        "classifier",
        "selector",
        "trainer",
        "rounds",
        "labelapi",
        "triton",
        "seaweedfs-master",
        "seaweedfs-volume",
        "seaweedfs-filer",
        "seaweedfs-s3",
    }


def test_every_pod_is_hardened_and_has_resources() -> None:
    specs = pod_specs(base_objects())
    assert len(specs) >= 10
    for name, spec in specs:
        pod_sec = spec["securityContext"]
        assert pod_sec["runAsNonRoot"] is True, name
        assert pod_sec["seccompProfile"]["type"] == "RuntimeDefault", name
        assert spec.get("automountServiceAccountToken") is False, name
        for c in spec["containers"]:
            sec = c["securityContext"]
            assert sec["readOnlyRootFilesystem"] is True, name
            assert sec["allowPrivilegeEscalation"] is False, name
            assert sec["capabilities"]["drop"] == ["ALL"], name
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]), name
            assert {"cpu", "memory"} <= set(c["resources"]["limits"]), name
            mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
            assert "/tmp" in mounts, f"{name}: a read-only root needs a writable /tmp"


def test_grpc_services_probe_their_tls_port() -> None:
    """The kubelet's gRPC probe cannot speak TLS: probes run bmcell.healthcheck, which
    dials BMCELL_GRPC_PORT (set to the container's grpc port) with the mounted CA."""
    probed = set()
    for obj in base_objects():
        if obj["kind"] != "Deployment":
            continue
        c = obj["spec"]["template"]["spec"]["containers"][0]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert probe in c, f"{obj['metadata']['name']} has no {probe}"
            if obj["metadata"]["name"] in GRPC_SERVICES:
                command = c[probe]["exec"]["command"]
                service = GRPC_SERVICES[obj["metadata"]["name"]]
                assert command == ["python", "-m", "bmcell.healthcheck", service], command
                assert env["BMCELL_GRPC_PORT"] == str(ports["grpc"])
                probed.add(obj["metadata"]["name"])
    assert probed == set(GRPC_SERVICES)


def test_every_server_mounts_its_own_certificate() -> None:
    objects = {(o["kind"], o["metadata"]["name"]): o for o in base_objects()}
    config = objects[("ConfigMap", "bmcell-config")]["data"]
    assert config["BMCELL_TLS"] == "on"
    servers = [*GRPC_SERVICES, "labelapi", "triton", "seaweedfs-s3"]
    for name in servers:
        spec = objects[("Deployment", name)]["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in spec["containers"][0]["volumeMounts"]}
        secret = volumes[mounts["/etc/bmcell/tls"]]["secret"]["secretName"]
        assert secret == f"bmcell-tls-{name}"
        cert = objects[("Certificate", secret)]["spec"]
        assert cert["secretName"] == secret
        assert {name, f"{name}.bmcell.svc.cluster.local"} <= set(cert["dnsNames"])
        assert "127.0.0.1" in cert["ipAddresses"]  # in-pod probes
        assert cert["issuerRef"]["name"] == "bmcell-ca-issuer"
    for key in ("BMCELL_TLS_CA", "BMCELL_TLS_CERT", "BMCELL_TLS_KEY"):
        assert config[key].startswith("/etc/bmcell/tls/"), key
    database_url = objects[("Secret", "bmcell-credentials")]["stringData"]["BMCELL_DATABASE_URL"]
    assert "sslmode=verify-full" in database_url and "sslrootcert=" in database_url
    postgres = objects[("StatefulSet", "postgres")]["spec"]["template"]["spec"]["containers"][0]
    assert "ssl=on" in postgres["args"]
    assert config["BMCELL_S3_SECURE"].split()[0] == "true"
    gateway = objects[("Deployment", "seaweedfs-s3")]["spec"]["template"]["spec"]["containers"][0]
    assert "-cert.file=/etc/bmcell/tls/tls.crt" in gateway["args"]
    hba = objects[("ConfigMap", "postgres-hba")]["data"]["pg_hba.conf"]
    assert not [ln for ln in hba.splitlines() if ln.split()[:1] == ["host"]]  # TLS only


def test_secrets_hold_placeholders_only() -> None:
    secrets = [o for o in base_objects() if o["kind"] == "Secret"]
    assert secrets
    for s in secrets:
        for key, value in s["stringData"].items():
            if "PASSWORD" in key or "SECRET" in key or key == "BMCELL_DATABASE_URL":
                assert "CHANGE-ME" in value, f"{key} in Secret {s['metadata']['name']}"
            if s["metadata"]["name"] == "bmcell-service-tokens":
                assert "CHANGE-ME" in value, f"{key} in Secret {s['metadata']['name']}"
    example = (DEPLOY / "env.example").read_text()
    for line in example.splitlines():
        if "PASSWORD=" in line or {"SECRET", "TOKEN"} & set(line.split("=")[0].split("_")):
            assert "CHANGE-ME" in line, line


def test_dockerfiles_run_as_non_root_from_pinned_bases() -> None:
    for path in (DEPLOY / "Dockerfile", DEPLOY / "triton" / "Dockerfile"):
        text = path.read_text()
        bases = [line.split()[1] for line in text.splitlines() if line.startswith("FROM ")]
        args = dict(
            line[4:].split("=", 1)
            for line in text.splitlines()
            if line.startswith("ARG ") and "=" in line
        )
        for base in bases:
            image = args.get(base.strip("${}"), base)
            assert "@sha256:" in image or (":" in image and not image.endswith(":latest")), image
        users = [line.split()[1] for line in text.splitlines() if line.startswith("USER ")]
        assert users and users[-1].split(":")[0] not in ("0", "root"), path

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
CRD_KINDS = {"RayCluster", "ServiceMonitor", "PodMonitor", "PrometheusRule"}
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


def test_grpc_services_use_grpc_probes_on_their_port() -> None:
    probed = set()
    for obj in base_objects():
        if obj["kind"] != "Deployment":
            continue
        c = obj["spec"]["template"]["spec"]["containers"][0]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert probe in c, f"{obj['metadata']['name']} has no {probe}"
            if obj["metadata"]["name"] in GRPC_SERVICES:
                assert c[probe]["grpc"]["port"] == ports["grpc"], obj["metadata"]["name"]
                probed.add(obj["metadata"]["name"])
    assert probed == set(GRPC_SERVICES)


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

"""deploy/ agrees with bmcell/settings.py: variables, required settings, ports, images."""

from __future__ import annotations

import re
import tomllib

import pytest
import yaml

from bmcell import settings as st
from bmcell.stack.config import REPO

DEPLOY = REPO / "deploy"
BASE = DEPLOY / "k8s" / "base"
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
SETTINGS: dict[str, type[st.Settings]] = {
    "segmenter": st.SegmenterSettings,
    "classifier": st.ClassifierSettings,
    "selector": st.SelectorSettings,
    "trainer": st.TrainerSettings,
    "rounds": st.RoundsSettings,
    "labelapi": st.LabelApiSettings,
}
ALL_CLASSES = [st.Settings, st.ServiceSettings, *SETTINGS.values()]


def env_name(field: str) -> str:
    return st.ENV_PREFIX + field.upper()


def known_variables() -> set[str]:
    return {env_name(f) for cls in ALL_CLASSES for f in cls.model_fields}


def required(cls: type[st.Settings]) -> set[str]:
    return {env_name(f) for f, info in cls.model_fields.items() if info.is_required()}


def default_ports(service: str) -> dict[str, int]:
    fields = SETTINGS[service].model_fields
    names = ("http_port",) if service == "labelapi" else ("grpc_port", "metrics_port")
    return {n: fields[n].default for n in names}


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def k8s_objects() -> dict[tuple[str, str], dict]:
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    objects = {}
    for name in kustomization["resources"]:
        for doc in yaml.safe_load_all((BASE / name).read_text()):
            if doc:
                objects[(doc["kind"], doc["metadata"]["name"])] = doc
    return objects


def k8s_env(container: dict, objects: dict) -> dict[str, str]:
    """What a container's environment holds: envFrom ConfigMaps first, then env."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef") or source.get("secretRef")
        kind = "ConfigMap" if "configMapRef" in source else "Secret"
        obj = objects[(kind, ref["name"])]
        env.update(obj.get("data") or obj.get("stringData") or {})
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
            continue
        ref = item["valueFrom"].get("configMapKeyRef") or item["valueFrom"].get("secretKeyRef")
        kind = "ConfigMap" if "configMapKeyRef" in item["valueFrom"] else "Secret"
        obj = objects[(kind, ref["name"])]
        env[item["name"]] = (obj.get("data") or obj.get("stringData"))[ref["key"]]
    return env


def test_every_bmcell_variable_in_deploy_is_a_setting() -> None:
    known = known_variables()
    for path in sorted(p for p in DEPLOY.rglob("*") if p.is_file()):
        used = set(re.findall(r"\bBMCELL_[A-Z0-9_]+\b", path.read_text()))
        unknown = used - known
        assert not unknown, (
            f"{path.relative_to(REPO)} sets {sorted(unknown)}, not in bmcell/settings.py"
        )


@pytest.mark.parametrize("service", sorted(SETTINGS))
def test_compose_gives_each_service_its_settings_ports_and_image(service: str) -> None:
    spec = compose()["services"][service]
    env = {k: str(v) for k, v in spec["environment"].items()}
    missing = required(SETTINGS[service]) - set(env)
    assert not missing, f"compose {service} lacks required {sorted(missing)}"
    for field, port in default_ports(service).items():
        assert env.get(env_name(field), str(port)) == str(port), (service, field)
        published = {str(p).split(":")[-1] for p in spec.get("ports", []) + spec.get("expose", [])}
        assert str(port) in published, f"compose {service} does not expose {field} {port}"
    assert spec["image"] == f"bmcell/{service}:{VERSION}"
    assert spec["build"]["args"]["SERVICE"] == service
    assert spec["build"]["dockerfile"] == "deploy/Dockerfile"


@pytest.mark.parametrize("service", sorted(SETTINGS))
def test_k8s_gives_each_service_its_settings_ports_and_image(service: str) -> None:
    objects = k8s_objects()
    (container,) = objects[("Deployment", service)]["spec"]["template"]["spec"]["containers"]
    env = k8s_env(container, objects)
    missing = required(SETTINGS[service]) - set(env)
    assert not missing, f"k8s {service} lacks required {sorted(missing)}"
    container_ports = {p["containerPort"] for p in container["ports"]}
    service_ports = {p["port"] for p in objects[("Service", service)]["spec"]["ports"]}
    for field, port in default_ports(service).items():
        assert env.get(env_name(field), str(port)) == str(port), (service, field)
        assert port in container_ports, f"k8s {service} container lacks {field} {port}"
        assert port in service_ports, f"k8s Service {service} lacks {field} {port}"
    assert container["image"] == f"bmcell/{service}:{VERSION}"
    assert env["BMCELL_HOST"] == "0.0.0.0"


def test_addresses_point_at_the_right_ports() -> None:
    objects = k8s_objects()
    compose_services = compose()["services"]
    triton_grpc = 8001
    classifier = default_ports("classifier")["grpc_port"]
    for env in (
        k8s_env(
            objects[("Deployment", "trainer")]["spec"]["template"]["spec"]["containers"][0],
            objects,
        ),
        {k: str(v) for k, v in compose_services["trainer"]["environment"].items()},
    ):
        assert env["BMCELL_CLASSIFIER_ADDR"] == f"classifier:{classifier}"
        assert env["BMCELL_RAY_ADDRESS"].endswith(":6379")
    assert (
        objects[("ConfigMap", "bmcell-config")]["data"]["BMCELL_TRITON_URL"]
        == f"triton:{triton_grpc}"
    )
    assert (
        compose_services["classifier"]["environment"]["BMCELL_TRITON_URL"]
        == f"triton:{triton_grpc}"
    )
    triton_ports = {p["port"] for p in objects[("Service", "triton")]["spec"]["ports"]}
    assert triton_grpc in triton_ports
    selector = default_ports("selector")["grpc_port"]
    trainer = default_ports("trainer")["grpc_port"]
    for env in (
        k8s_env(
            objects[("Deployment", "rounds")]["spec"]["template"]["spec"]["containers"][0],
            objects,
        ),
        {k: str(v) for k, v in compose_services["rounds"]["environment"].items()},
    ):
        assert env["BMCELL_SELECTOR_ADDR"] == f"selector:{selector}"
        assert env["BMCELL_TRAINER_ADDR"] == f"trainer:{trainer}"
    for name, port in (("selector", selector), ("trainer", trainer)):
        assert port in {p["port"] for p in objects[("Service", name)]["spec"]["ports"]}


def test_compose_and_k8s_run_the_same_images() -> None:
    compose_images = {s["image"] for s in compose()["services"].values()}
    k8s_images = set()
    for obj in k8s_objects().values():
        if obj["kind"] == "RayCluster":
            templates = [obj["spec"]["headGroupSpec"]["template"]] + [
                g["template"] for g in obj["spec"]["workerGroupSpecs"]
            ]
        elif obj["kind"] in ("Deployment", "StatefulSet", "Job"):
            templates = [obj["spec"]["template"]]
        else:
            continue
        k8s_images |= {c["image"] for t in templates for c in t["spec"]["containers"]}
    assert k8s_images <= compose_images, k8s_images - compose_images
    own = {i for i in compose_images if i.startswith("bmcell/")}
    assert own == {f"bmcell/{s}:{VERSION}" for s in SETTINGS} | {"bmcell/triton:23.12-torch2.13.0"}
    # Nothing floats: every image has an exact tag.
    assert all(":" in i and not i.endswith(":latest") for i in compose_images | k8s_images)


def test_triton_reads_its_repository_from_the_s3_store_with_explicit_control() -> None:
    bucket = st.Settings.model_fields["models_bucket"].default
    (container,) = k8s_objects()[("Deployment", "triton")]["spec"]["template"]["spec"]["containers"]
    k8s_env = k8s_objects()[("ConfigMap", "bmcell-config")]["data"]
    compose_env = compose()["x-bmcell-env"]
    for args, env in (
        (container["args"], k8s_env),
        (compose()["services"]["triton"]["command"], compose_env),
    ):
        # Over HTTPS when the services reach the store that way (Triton's s3://https://).
        scheme = "https://" if env["BMCELL_S3_SECURE"].split()[0] == "true" else ""
        assert f"--model-repository=s3://{scheme}{env['BMCELL_S3_ENDPOINT']}/{bucket}" in args
        assert "--model-control-mode=explicit" in args
    env_names = {e["name"] for e in container["env"]}
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= env_names


GRPC_SERVICES = [s for s in SETTINGS if s != "labelapi"]


@pytest.mark.parametrize("service", GRPC_SERVICES)
def test_each_grpc_service_gets_its_own_account_token(service: str) -> None:
    """BMCELL_SERVICE_TOKEN from the service's own Secret key (k8s) or .env entry
    (compose), and the accounts step registers every one of them."""
    objects = k8s_objects()
    (container,) = objects[("Deployment", service)]["spec"]["template"]["spec"]["containers"]
    (item,) = [e for e in container["env"] if e["name"] == "BMCELL_SERVICE_TOKEN"]
    assert item["valueFrom"]["secretKeyRef"] == {"name": "bmcell-service-tokens", "key": service}
    assert service in objects[("Secret", "bmcell-service-tokens")]["stringData"]
    (job,) = objects[("Job", "service-accounts")]["spec"]["template"]["spec"]["containers"]
    assert service in job["args"][0].split("for s in ")[1].split(";")[0].split()

    services = compose()["services"]
    variable = f"SERVICE_TOKEN_{service.upper()}"
    assert services[service]["environment"]["BMCELL_SERVICE_TOKEN"].startswith(f"${{{variable}:?")
    assert variable in services["accounts"]["environment"]
    assert f"\n{variable}=CHANGE-ME" in (DEPLOY / "env.example").read_text()
    assert services[service]["depends_on"]["accounts"]["condition"] == (
        "service_completed_successfully"
    )

"""Prometheus config, rules and the Grafana dashboard: valid, in sync, on real metric names."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from bmcell import grpc_server, metrics
from bmcell.stack import StackConfig
from bmcell.stack.components import prometheus_config
from bmcell.stack.config import REPO

DEPLOY = REPO / "deploy"
RULES = DEPLOY / "prometheus" / "rules" / "bmcell.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "bmcell.json"
OURS = {metrics.exposed_name(m) for m in metrics.ALL} | {
    metrics.exposed_name(grpc_server.RPC_TOTAL),
    metrics.exposed_name(grpc_server.RPC_SECONDS),
}


def promtool(*args: str) -> subprocess.CompletedProcess:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.skip("promtool not installed (Debian package prometheus; `make setup`)")
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=60)


def test_promtool_accepts_the_compose_config_and_its_rules() -> None:
    out = promtool("check", "config", str(DEPLOY / "prometheus" / "prometheus.yml"))
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_accepts_the_rules() -> None:
    out = promtool("check", "rules", *map(str, sorted(RULES.parent.glob("*.yml"))))
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_accepts_the_embedded_stack_config(tmp_path: Path) -> None:
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(prometheus_config(StackConfig(run_dir=tmp_path))))
    out = promtool("check", "config", str(path))
    assert out.returncode == 0, out.stdout + out.stderr


def test_alert_rules_behave() -> None:
    out = promtool("test", "rules", str(DEPLOY / "prometheus" / "tests" / "bmcell.test.yml"))
    assert out.returncode == 0, out.stdout + out.stderr


def test_prometheus_rule_in_k8s_equals_the_rules_file() -> None:
    docs = list(yaml.safe_load_all((DEPLOY / "k8s" / "base" / "monitoring.yaml").read_text()))
    (rule,) = [d for d in docs if d and d["kind"] == "PrometheusRule"]
    assert rule["spec"] == yaml.safe_load(RULES.read_text())


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(bmcell_[a-z0-9_]+?)(?:_bucket|_sum|_count)?\b", expr))


def test_rules_and_dashboard_query_defined_metrics_only() -> None:
    exprs = [r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    dash = json.loads(DASHBOARD.read_text())
    exprs += [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [a["expr"] for a in dash["annotations"]["list"]]
    used = set().union(*(metric_names(e) for e in exprs))
    assert used and used <= OURS, used - OURS


def test_dashboard_has_round_review_and_serving_rows() -> None:
    dash = json.loads(DASHBOARD.read_text())
    rows = [p["title"] for p in dash["panels"] if p["type"] == "row"]
    assert [r.split(":")[0] for r in rows] == ["Round", "Review", "Serving"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_every_metric_is_documented_in_operations_md() -> None:
    doc = (REPO / "docs" / "operations.md").read_text()
    missing = sorted(name for name in OURS if f"`{name}`" not in doc)
    assert not missing, f"docs/operations.md does not document {missing}"


def test_metric_names_follow_prometheus_conventions() -> None:
    for metric in metrics.ALL:
        name = metrics.exposed_name(metric)
        assert name.startswith("bmcell_"), name
        assert (metric._type == "counter") == name.endswith("_total"), name
        if "duration" in name:
            assert metric._type == "histogram" and name.endswith("_seconds"), name
        assert "cell_id" not in metric._labelnames and "job_id" not in metric._labelnames

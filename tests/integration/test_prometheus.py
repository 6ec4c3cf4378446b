"""`bmcell stack up --with-prometheus`: a real Prometheus scrapes every part of the stack.

This module starts its own stack (with Prometheus) on ``BMCELL_TEST_PORT_BASE + 200``
so it never clashes with the session's shared ``stack``; the calls below are the only
traffic that stack sees, so exact counts can be asserted through PromQL.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import grpc
import httpx
import pytest

from bmcell import grpc_client, tls
from bmcell.stack import Stack, StackConfig
from bmcell.stack.components import GRPC_SERVICES, labelapi_url
from bmcell.stack.config import REPO
from bmcell.v1 import (
    classifier_pb2,
    classifier_pb2_grpc,
    selector_pb2,
    selector_pb2_grpc,
)
from tests.conftest import stack_port_base

pytestmark = pytest.mark.integration

EXPECTED_JOBS = {*GRPC_SERVICES, "labelapi", "triton", "prometheus"}
SELECTOR_MISSES = 3
CLASSIFIER_LISTS = 2


@pytest.fixture(scope="module")
def prom_stack() -> Iterator[Stack]:
    base = stack_port_base() + 200
    cfg = StackConfig(run_dir=REPO / ".run" / f"test-{base}", port_base=base, with_prometheus=True)
    s = Stack(cfg, progress=lambda msg: print(f"[prom-stack] {msg}", flush=True))
    s.down()
    saved = dict(os.environ)
    try:
        s.up()
        # Its own CA and database: clients of this stack verify and authenticate there.
        os.environ.update(s.env())
        yield s
    finally:
        os.environ.clear()
        os.environ.update(saved)
        s.down()


def query(stack: Stack, promql: str) -> list[dict]:
    resp = httpx.get(
        f"http://{stack.config.addr('prometheus')}/api/v1/query",
        params={"query": promql},
        timeout=5,
    )
    resp.raise_for_status()
    body = resp.json()
    assert body["status"] == "success", body
    return body["data"]["result"]


def eventually(check, timeout_s: float = 30.0):
    """Retry ``check`` (which asserts) until it passes; scrapes come every 2 s."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def test_prometheus_is_part_of_the_stack(prom_stack: Stack) -> None:
    statuses = {s.name: s for s in prom_stack.status()}
    assert statuses["prometheus"].healthy, statuses["prometheus"]
    # A plain Stack on the same run dir (what `bmcell stack status/down` builds) still
    # sees the Prometheus that `up --with-prometheus` started.
    plain = Stack(
        StackConfig(run_dir=prom_stack.config.run_dir, port_base=prom_stack.config.port_base)
    )
    assert "prometheus" in {c.name for c in plain.components()}


def test_every_job_is_scraped_and_up(prom_stack: Stack) -> None:
    def all_up() -> None:
        series = query(prom_stack, "up")
        ups = {s["metric"]["job"]: float(s["value"][1]) for s in series}
        assert set(ups) == EXPECTED_JOBS, ups
        assert all(v == 1.0 for v in ups.values()), ups

    eventually(all_up)


def test_grpc_and_http_calls_show_up_in_promql(prom_stack: Stack) -> None:
    cfg = prom_stack.config
    token = prom_stack.operator_token()
    with grpc_client.channel(cfg.addr("selector"), token=token) as ch:
        stub = selector_pb2_grpc.SelectorStub(ch)
        for i in range(SELECTOR_MISSES):
            with pytest.raises(grpc.RpcError) as err:
                stub.GetSelection(selector_pb2.GetSelectionRequest(round_id=990000 + i), timeout=10)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with grpc_client.channel(cfg.addr("classifier"), token=token) as ch:
        stub = classifier_pb2_grpc.ClassifierStub(ch)
        for _ in range(CLASSIFIER_LISTS):
            stub.ListModels(classifier_pb2.ListModelsRequest(), timeout=10)
    healthz = httpx.get(f"{labelapi_url(cfg)}/healthz", timeout=5, verify=tls.httpx_verify())
    assert healthz.status_code == 200

    def counted() -> None:
        misses = query(
            prom_stack,
            'bmcell_grpc_requests_total{service="bmcell.v1.Selector",code="NOT_FOUND"}',
        )
        assert [float(s["value"][1]) for s in misses] == [SELECTOR_MISSES], misses
        assert misses[0]["metric"]["job"] == "selector"
        lists = query(
            prom_stack,
            'bmcell_grpc_requests_total{service="bmcell.v1.Classifier",method="ListModels",code="OK"}',
        )
        assert [float(s["value"][1]) for s in lists] == [CLASSIFIER_LISTS], lists
        latency = query(
            prom_stack,
            'bmcell_grpc_request_duration_seconds_count{service="bmcell.v1.Selector"}',
        )
        assert [float(s["value"][1]) for s in latency] == [SELECTOR_MISSES], latency

    eventually(counted)
    # The labeling API answers Prometheus on its HTTP port (process metrics at least).
    scraped = query(prom_stack, 'scrape_samples_scraped{job="labelapi"}')
    assert scraped and float(scraped[0]["value"][1]) > 0, scraped


def test_alert_rules_from_deploy_are_loaded_and_quiet(prom_stack: Stack) -> None:
    alerts = alerts_now(prom_stack)
    assert {
        "BmcellReviewBacklogGrowing",
        "BmcellGrpcErrorRateHigh",
        "BmcellNoHealthyTriton",
        "BmcellAccuracyDropAfterPublish",
        "BmcellTrainingJobFailed",
    } <= set(alerts)
    assert all(r["health"] in ("ok", "unknown") for r in alerts.values()), alerts

    def triton_alert_quiet() -> None:
        rule = alerts_now(prom_stack)["BmcellNoHealthyTriton"]
        assert rule["health"] == "ok" and rule["state"] == "inactive", rule

    eventually(triton_alert_quiet)


def alerts_now(stack: Stack) -> dict[str, dict]:
    resp = httpx.get(f"http://{stack.config.addr('prometheus')}/api/v1/rules", timeout=5)
    groups = resp.json()["data"]["groups"]
    return {r["name"]: r for g in groups for r in g["rules"] if r["type"] == "alerting"}

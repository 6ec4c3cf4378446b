"""The access table covers every call, and reads as DESIGN.md's roles say."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from bmcell import policy
from bmcell.auth import ALL_LAB_ROLES, ROLES, Principal
from bmcell.errors import PermissionDenied
from bmcell.settings import LabelApiSettings
from services.labelapi.app import create_app, route_calls


def _app():
    settings = LabelApiSettings(database_url="postgresql://x@127.0.0.1/x", s3_endpoint="x:1")
    return create_app(SimpleNamespace(settings=settings, db=None, store=None))


def test_every_proto_method_has_a_rule_and_no_rule_is_stale() -> None:
    methods = policy.proto_methods()
    assert len(methods) == 18  # a new rpc must come with a row in policy.GRPC
    assert sorted(set(methods) - set(policy.GRPC)) == []
    assert sorted(set(policy.GRPC) - set(methods)) == []


def test_every_labelapi_route_has_a_rule_and_no_rule_is_stale() -> None:
    calls = {f"{method} {path}" for method, path in route_calls(_app())}
    assert sorted(calls - set(policy.HTTP)) == []
    assert sorted(set(policy.HTTP) - calls) == []


def test_rules_name_known_roles_and_all_lab_calls_only_all_lab_roles() -> None:
    for call, rule in {**policy.GRPC, **policy.HTTP}.items():
        assert rule.open or rule.roles, call
        assert rule.roles <= set(ROLES), call
        if rule.scope == "all_labs":
            # A lab-bound role here would reach other labs' cells.
            assert rule.roles <= ALL_LAB_ROLES, call


def test_services_make_only_the_calls_between_services() -> None:
    by_service = sorted(call for call, rule in policy.GRPC.items() if "service" in rule.roles)
    assert by_service == [
        "/bmcell.v1.Classifier/ActivateModel",
        "/bmcell.v1.Classifier/PredictPool",
        "/bmcell.v1.Selector/SelectCandidates",
        "/bmcell.v1.Trainer/GetJob",
        "/bmcell.v1.Trainer/StartTraining",
    ]
    assert all(
        "service" not in rule.roles or rule.scope == "none"
        for call, rule in policy.HTTP.items()
        if call.startswith(("POST", "PUT"))
    )


def test_what_the_issue_names_is_for_operators_only() -> None:
    """Activating or rolling back the clinical model, training, cancelling, starting
    rounds: operators and admins (and the one service that must), nobody else."""
    for method in (
        "Classifier/ActivateModel",
        "Classifier/RollbackModel",
        "Trainer/StartTraining",
        "Trainer/CancelJob",
        "Rounds/StartRound",
        "Selector/SelectCandidates",
        "Classifier/PredictPool",
    ):
        assert policy.GRPC[f"/bmcell.v1.{method}"].roles <= policy.OPERATE_OR_SERVICE, method
    assert policy.GRPC["/bmcell.v1.Segmenter/Upload"].roles == {"uploader", "operator", "admin"}


def test_health_is_open_and_reflection_only_in_development() -> None:
    assert policy.grpc_rule("/grpc.health.v1.Health/Check", production=True).open
    reflect = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
    assert policy.grpc_rule(reflect, production=False).open
    assert not policy.grpc_rule(reflect, production=True).open
    assert policy.grpc_rule("/bmcell.v1.Classifier/Unheard", production=False) is None


def test_authorize_denies_by_default_and_names_the_roles() -> None:
    reviewer = Principal(1, "rita", "reviewer", frozenset({1}))
    with pytest.raises(PermissionDenied, match="has no access rule"):
        policy.authorize(reviewer, None, "/bmcell.v1.Classifier/Unheard")
    rule = policy.GRPC["/bmcell.v1.Classifier/ActivateModel"]
    with pytest.raises(PermissionDenied, match="'reviewer' may not call .*admin, operator"):
        policy.authorize(reviewer, rule, "/bmcell.v1.Classifier/ActivateModel")
    policy.authorize(Principal(2, "svc", "service", None), rule, "ActivateModel")


def test_people_are_for_admins_and_labs_and_specimen_roles_for_operators() -> None:
    """DESIGN.md: admins manage people and tokens; operators and admins manage labs
    and specimens' roles; everyone lists the labs and specimens they see."""
    for route, rule in policy.HTTP.items():
        if route.split(" ")[1].startswith("/v1/users"):
            assert rule.roles == {"admin"}, route
    assert policy.HTTP["POST /v1/labs"].roles == {"operator", "admin"}
    assert policy.HTTP["PUT /v1/specimens/{lab}/{specimen}/role"].roles == {"operator", "admin"}
    for route in ("GET /v1/labs", "GET /v1/specimens"):
        assert policy.HTTP[route].roles == policy.PEOPLE and policy.HTTP[route].scope == "request"

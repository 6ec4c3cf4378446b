"""Who may make which call: one table for every gRPC method and labeling API route.

The gRPC interceptor (:mod:`bmcell.grpc_auth`) and the labeling API's dependency look
a call up here before its handler runs, so a refusal has no side effect. A call that
is not in the table is refused (deny by default), and a unit test fails when a method
of ``proto/`` or a route of the labeling API has no entry.

Roles (DESIGN.md): reviewers answer review tasks of their labs; uploaders upload to
and read reports of their labs; operators run rounds, training and model versions;
admins manage people and tokens and may do what an operator may; a service account
(one per service) makes only the calls one service makes of another.

How lab scope applies (``Rule.scope``):

- ``none``: the call names no lab's data (model versions, training jobs, taxonomy).
- ``all_labs``: the call reaches every lab's cells (pool prediction, selection,
  training, rounds), so only roles that see every lab may make it; a unit test
  checks that no lab-bound role is listed.
- ``request``: the call names labs, specimens, cells, tasks or predictions; its
  handler limits it to the caller's labs. Something outside them answers NOT_FOUND
  (HTTP 404) as if it did not exist; an upload to a lab the caller chose but may not
  write answers PERMISSION_DENIED (bmcell.auth).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from bmcell.auth import ROLES, Principal
from bmcell.errors import PermissionDenied

Scope = Literal["none", "all_labs", "request"]

PEOPLE = frozenset({"uploader", "reviewer", "operator", "admin"})
EVERYONE = frozenset(ROLES)
OPERATE = frozenset({"operator", "admin"})
# Operators' calls that one service also makes of another.
OPERATE_OR_SERVICE = OPERATE | {"service"}
REVIEW = frozenset({"reviewer", "admin"})
UPLOAD = frozenset({"uploader", "operator", "admin"})
ADMIN = frozenset({"admin"})


@dataclass(frozen=True)
class Rule:
    roles: frozenset[str]
    scope: Scope
    # Open calls need no token at all (health, metrics, the static reviewer page).
    open: bool = False


OPEN = Rule(frozenset(), "none", open=True)


# Full gRPC method name -> rule. Who calls what between services: the selector asks
# the classifier to PredictPool, the trainer to ActivateModel; the rounds service asks
# the selector to SelectCandidates and the trainer to StartTraining and GetJob.
GRPC: dict[str, Rule] = {
    "/bmcell.v1.Segmenter/Upload": Rule(UPLOAD, "request"),
    "/bmcell.v1.Segmenter/ListCells": Rule(PEOPLE, "request"),
    "/bmcell.v1.Classifier/Classify": Rule(PEOPLE, "request"),
    "/bmcell.v1.Classifier/PredictPool": Rule(OPERATE_OR_SERVICE, "all_labs"),
    "/bmcell.v1.Classifier/ListModels": Rule(PEOPLE, "none"),
    "/bmcell.v1.Classifier/ActivateModel": Rule(OPERATE_OR_SERVICE, "none"),
    "/bmcell.v1.Classifier/RollbackModel": Rule(OPERATE, "none"),
    "/bmcell.v1.Selector/SelectCandidates": Rule(OPERATE_OR_SERVICE, "all_labs"),
    "/bmcell.v1.Selector/GetSelection": Rule(OPERATE, "all_labs"),
    "/bmcell.v1.Trainer/StartTraining": Rule(OPERATE_OR_SERVICE, "all_labs"),
    "/bmcell.v1.Trainer/GetJob": Rule(OPERATE_OR_SERVICE, "none"),
    "/bmcell.v1.Trainer/WatchJob": Rule(OPERATE, "none"),
    "/bmcell.v1.Trainer/CancelJob": Rule(OPERATE, "none"),
    "/bmcell.v1.Trainer/GetModelReport": Rule(PEOPLE, "none"),
    "/bmcell.v1.Rounds/StartRound": Rule(OPERATE, "all_labs"),
    "/bmcell.v1.Rounds/GetRound": Rule(OPERATE, "all_labs"),
    "/bmcell.v1.Rounds/ListRounds": Rule(OPERATE, "all_labs"),
    "/bmcell.v1.Rounds/RetryRound": Rule(OPERATE, "all_labs"),
}

# Standard services every server carries. Health stays open for load balancers and
# the stack; reflection lists the API, which a production deployment shows only to
# callers with a token (any role).
HEALTH_SERVICE = "grpc.health.v1.Health"
REFLECTION_SERVICES = (
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
)
REFLECTION = Rule(EVERYONE, "none")

# "METHOD /path template" of the labeling API -> rule.
HTTP: dict[str, Rule] = {
    "GET /": OPEN,
    "GET /static": OPEN,
    "GET /healthz": OPEN,
    "GET /metrics": OPEN,
    "GET /openapi.json": OPEN,
    "GET /docs": OPEN,
    "GET /docs/oauth2-redirect": OPEN,
    "GET /redoc": OPEN,
    "GET /v1/me": Rule(EVERYONE, "none"),
    "GET /v1/taxonomy": Rule(EVERYONE, "none"),
    "POST /v1/tasks/next": Rule(REVIEW, "request"),
    # A page of leases at once: the reviewer's gallery (CST) and prefetch.
    "POST /v1/tasks/page": Rule(REVIEW, "request"),
    "GET /v1/tasks/{task_id}": Rule(REVIEW | OPERATE, "request"),
    "POST /v1/tasks/{task_id}/submit": Rule(REVIEW, "request"),
    "POST /v1/tasks/{task_id}/release": Rule(REVIEW, "request"),
    "POST /v1/tasks": Rule(OPERATE, "request"),
    "GET /v1/cells/{cell_id}": Rule(PEOPLE, "request"),
    "GET /v1/cells/{cell_id}/image": Rule(PEOPLE, "request"),
    # The field around a cell with its box drawn (the reviewer's context view).
    "GET /v1/cells/{cell_id}/field": Rule(PEOPLE, "request"),
    "PUT /v1/cells/{cell_id}/label": Rule(REVIEW, "request"),
    "GET /v1/labels/export": Rule(REVIEW | OPERATE, "request"),
    # Labelled crops brought in (`bmcell import`): labels without review, so operators.
    "POST /v1/labs/{lab}/specimens/{specimen}/crops": Rule(OPERATE, "request"),
    "GET /v1/rounds/current/progress": Rule(PEOPLE, "request"),
    "GET /v1/specimens/{lab}/{specimen}/report": Rule(PEOPLE, "request"),
    # Labs and specimens as managed resources: everyone lists what they see, operators
    # and admins create labs and set specimens' roles (training, test, excluded).
    "GET /v1/labs": Rule(PEOPLE, "request"),
    "POST /v1/labs": Rule(OPERATE, "none"),
    "GET /v1/specimens": Rule(PEOPLE, "request"),
    "PUT /v1/specimens/{lab}/{specimen}/role": Rule(OPERATE, "request"),
    # People and their tokens: admins only.
    "GET /v1/users": Rule(ADMIN, "none"),
    "POST /v1/users": Rule(ADMIN, "none"),
    "PATCH /v1/users/{name}": Rule(ADMIN, "none"),
    "POST /v1/users/{name}/tokens": Rule(ADMIN, "none"),
    # Predicts the specimen's cells that lack a prediction (what the report needs).
    "POST /v1/specimens/{lab}/{specimen}/predict": Rule(PEOPLE, "request"),
    "POST /v1/specimens/{lab}/{specimen}/report/verify": Rule(REVIEW, "request"),
}


def proto_methods() -> list[str]:
    """Full names of every method of every service in ``proto/bmcell/v1``: what
    ``GRPC`` must cover."""
    from bmcell.v1 import classifier_pb2, rounds_pb2, segmenter_pb2, selector_pb2, trainer_pb2

    return [
        f"/{service.full_name}/{method.name}"
        for module in (segmenter_pb2, classifier_pb2, selector_pb2, trainer_pb2, rounds_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    ]


def grpc_rule(method: str, *, production: bool) -> Rule | None:
    """The rule of a full gRPC method name (``/package.Service/Method``); None: refuse."""
    service = method.split("/")[1] if method.count("/") == 2 else ""
    if service == HEALTH_SERVICE:
        return OPEN
    if service in REFLECTION_SERVICES:
        return REFLECTION if production else OPEN
    return GRPC.get(method)


def http_rule(method: str, path_template: str) -> Rule | None:
    return HTTP.get(f"{method} {path_template}")


def authorize(principal: Principal, rule: Rule | None, call: str) -> None:
    """PermissionDenied unless ``principal``'s role may make ``call`` under ``rule``."""
    if rule is None:
        raise PermissionDenied(f"{call} has no access rule, so it is refused (deny by default)")
    if principal.role not in rule.roles:
        raise PermissionDenied(
            f"role {principal.role!r} may not call {call}; "
            f"it needs one of {', '.join(sorted(rule.roles))}"
        )

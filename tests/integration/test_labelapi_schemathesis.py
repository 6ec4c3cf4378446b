"""schemathesis against the labeling API's own OpenAPI: no generated request gets a 5xx.

Every operation of ``/openapi.json`` is called with generated path, query and body
values (hypothesis, through schemathesis) and a valid token. Writes go with a
reviewer's token for a lab of this module's own, seeded with cells and tasks, so the
generated writes reach the queue's real code without touching other tests' rows;
reads go with an admin's token, which sees every lab. The only check is that the
server never answers 5xx: a refusal must be a 4xx naming the problem.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from bmcell.stack import Stack
from tests.integration.test_labelapi import Seeder, api_url, db, seed, store  # noqa: F401

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def api_schema(stack: Stack):
    return schemathesis.openapi.from_url(f"http://{stack.config.addr('labelapi')}/openapi.json")


@pytest.fixture
def tokens(seed: Seeder) -> dict[str, str]:  # noqa: F811
    lab_id, lab = seed.lab("fuzz")
    cells = seed.cells(lab_id, 6)
    round_id = seed.round()
    seed.tasks(cells[:3], kind="cst", round_id=round_id)
    seed.tasks(cells[3:], kind="al", round_id=round_id)
    _, reviewer = seed.user("fuzz-rev", "reviewer", [lab])
    _, admin = seed.user("fuzz-admin", "admin", [])
    return {"reviewer": reviewer, "admin": admin}


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(
    max_examples=12,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
def test_no_generated_request_gets_a_server_error(
    case,
    api_url: str,  # noqa: F811
    tokens: dict[str, str],
) -> None:
    token = tokens["admin"] if case.method.upper() == "GET" else tokens["reviewer"]
    case.call_and_validate(
        base_url=api_url,
        headers={"Authorization": f"Bearer {token}"},
        checks=[not_a_server_error],
        timeout=30,
    )

"""schemathesis against the labeling API's own OpenAPI: no generated request gets a 5xx.

Every operation of ``/openapi.json`` is called with generated path, query and body
values (hypothesis, through schemathesis) and a valid token. Writes go with a
reviewer's token for a lab of this module's own, seeded with cells and tasks, so the
generated writes reach the queue's real code without touching other tests' rows;
reads go with an admin's token, which sees every lab. The only check is that the
server never answers 5xx: a refusal must be a 4xx naming the problem.
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from bmcell import tls
from tests.integration.test_labelapi import Seeder, api_url, db, seed, store  # noqa: F401

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def api_schema(api_url: str):  # noqa: F811
    contract = httpx.get(f"{api_url}/openapi.json", timeout=30, verify=tls.httpx_verify())
    return schemathesis.openapi.from_dict(contract.raise_for_status().json())


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


def test_no_generated_request_gets_a_server_error(
    api_schema,
    api_url: str,  # noqa: F811
    tokens: dict[str, str],
) -> None:
    # schemathesis' own pytest plugin does not run under this pytest, so each operation
    # gets its hypothesis run here, from schemathesis' strategies: valid requests and
    # requests that break the schema (those must be 4xx, never 5xx).
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 10
    for operation in operations:
        token = tokens["admin"] if operation.method.upper() == "GET" else tokens["reviewer"]
        try:
            _fuzz(operation, api_url, token)
        except Exception as exc:
            raise AssertionError(f"{operation.method.upper()} {operation.path}: {exc}") from exc


def _fuzz(operation, base_url: str, token: str) -> None:
    verify = str(tls.ca_file()) if tls.enabled() else True  # the stack's CA
    cases = st.one_of(
        operation.as_strategy(GenerationMode.POSITIVE),
        operation.as_strategy(GenerationMode.NEGATIVE),
    )

    @settings(
        max_examples=15,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(cases)
    def call(case) -> None:
        case.call_and_validate(
            base_url=base_url,
            verify=verify,
            headers={"Authorization": f"Bearer {token}"},
            checks=[not_a_server_error],
            timeout=30,
        )

    call()

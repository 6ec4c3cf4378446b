"""The embedded stack's service accounts: one secret per service, kept, never shared."""

from __future__ import annotations

import stat

from bmcell.stack import Stack, StackConfig, accounts
from bmcell.stack.components import GRPC_SERVICES


def test_each_service_gets_its_own_kept_token_and_the_cli_an_operator_token(tmp_path) -> None:
    stack = Stack(StackConfig(run_dir=tmp_path, port_base=27700))
    env_of = {c.name: c.env for c in stack.components()}
    tokens = {name: env_of[name]["BMCELL_SERVICE_TOKEN"] for name in GRPC_SERVICES}
    assert len(set(tokens.values())) == len(GRPC_SERVICES)
    assert all(t.startswith("bmc_") for t in tokens.values())
    # Kept in the run folder: a second start hands out the same ones.
    again = Stack(StackConfig(run_dir=tmp_path, port_base=27700)).components()
    assert {c.name: c.env.get("BMCELL_SERVICE_TOKEN") for c in again if c.name in tokens} == tokens
    secrets = tmp_path / "secrets" / "tokens.json"
    assert stat.S_IMODE(secrets.stat().st_mode) == 0o600

    operator = stack.operator_token()
    assert operator not in tokens.values()
    # The labeling API calls the classifier (reports) as its own account, not the CLI's.
    assert "BMCELL_TOKEN" not in env_of["labelapi"]
    labelapi_token = env_of["labelapi"]["BMCELL_SERVICE_TOKEN"]
    assert labelapi_token not in {operator, *tokens.values()}
    assert labelapi_token == accounts.tokens(stack.config, ["labelapi"])["svc-labelapi"]
    assert all(env_of[n]["BMCELL_ENV"] == "development" for n in [*GRPC_SERVICES, "labelapi"])
    stack._write_env_file()
    assert f"BMCELL_TOKEN={operator}\n" in stack.config.env_file.read_text()
    assert stat.S_IMODE(stack.config.env_file.stat().st_mode) == 0o600
    assert accounts.tokens(stack.config, [])[accounts.OPERATOR] == operator
    # An admin's token beside it (people and tokens), never the CLI's default one.
    admin = stack.admin_token()
    assert admin not in {operator, *tokens.values()}
    assert f"BMCELL_ADMIN_TOKEN={admin}\n" in stack.config.env_file.read_text()
    assert accounts.tokens(stack.config, [])[accounts.ADMIN] == admin

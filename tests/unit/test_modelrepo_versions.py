"""Which versions a model's config asks Triton to load."""

from __future__ import annotations

import pytest

from bmcell import modelrepo


def test_with_versions_replaces_the_policy_and_keeps_the_rest() -> None:
    config = modelrepo.config_pbtxt("bmcell-cell")
    assert "version_policy: { all { } }" in config
    got = modelrepo.with_versions(config, [7, 3, 7])
    assert "version_policy: { specific { versions: [ 3, 7 ] } }" in got
    assert "all { }" not in got
    assert got.replace("specific { versions: [ 3, 7 ] }", "all { }") == config


def test_with_versions_adds_a_policy_to_a_config_without_one() -> None:
    config = 'name: "m"\nbackend: "python"\n'
    assert modelrepo.with_versions(config, [2]).endswith(
        "version_policy: { specific { versions: [ 2 ] } }\n"
    )


@pytest.mark.parametrize("versions", [[], [0], [-1]])
def test_with_versions_refuses_no_or_bad_versions(versions) -> None:
    with pytest.raises(ValueError):
        modelrepo.with_versions(modelrepo.config_pbtxt("m"), versions)

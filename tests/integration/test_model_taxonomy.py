"""A model's own taxonomy in Postgres (migration 0018, ``bmcell.taxonomy.for_model``)."""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path

import pytest

from bmcell.taxonomy import (
    DEFAULT_TAXONOMY,
    CellClass,
    Taxonomy,
    TaxonomyError,
    for_model,
    store_for_model,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "taxonomy-3class.yaml"


def test_stored_taxonomy_is_the_models_and_grows_only_by_appending(rt) -> None:
    _, db, _ = rt
    model = f"tax-{uuid.uuid4().hex[:8]}"
    three = Taxonomy.load(EXAMPLE)
    with db.connection() as conn:
        assert for_model(conn, model, max_age_s=0) == DEFAULT_TAXONOMY
        assert store_for_model(conn, model, three, loaded_by="test-admin") == 1
        assert for_model(conn, model, max_age_s=0).codes == ["LY", "NE", "ART"]

        grown = dataclasses.replace(three, classes=(*three.classes, CellClass("EO", "eosinophil")))
        assert store_for_model(conn, model, grown, loaded_by="test-admin") == 2
        assert for_model(conn, model, max_age_s=0).codes == ["LY", "NE", "ART", "EO"]

        reordered = dataclasses.replace(grown, classes=tuple(reversed(grown.classes)))
        with pytest.raises(TaxonomyError):
            store_for_model(conn, model, reordered, loaded_by="test-admin")
        rows = conn.execute(
            "SELECT version, loaded_by FROM model_taxonomies WHERE model_name = %s ORDER BY 1",
            (model,),
        ).fetchall()
    assert [(r["version"], r["loaded_by"]) for r in rows] == [(1, "test-admin"), (2, "test-admin")]

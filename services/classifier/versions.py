"""Model versions in Postgres: the classifier's repository module."""

from __future__ import annotations

from bmcell.db import Database


def list_versions(db: Database, model_name: str) -> list[dict]:
    with db.connection() as conn:
        return conn.execute(
            "SELECT * FROM model_versions WHERE model_name = %s ORDER BY version", (model_name,)
        ).fetchall()

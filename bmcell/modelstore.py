"""Model versions: registered in Postgres, their files in the models bucket.

Registering a version uploads the Triton layout that ``modelrepo.export_version``
produces to ``models_bucket`` and records a ``model_versions`` row in state
``registered``. Serving it (activation) is the classifier's job. Objects go first
and the row last, in one transaction; a failure in between deletes the objects this
call wrote, so nothing half-registered is left behind.

Registrations of one model are serialised by an advisory lock on its name, held from
choosing the version number to committing its row: two publishers at the same moment
get two numbers, each writes only under its own ``<model>/<version>/`` prefix, and a
failing one deletes only what it wrote, never the other's files. ``bmcell storage
check --repair`` takes the same lock before it deletes a version's orphaned files.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from typing import Any

import psycopg
from torch import nn

from bmcell import modelrepo
from bmcell.db import Database, advisory_locks, lock_key
from bmcell.storage import ObjectStore
from bmcell.taxonomy import Taxonomy


def register_version(
    db: Database,
    store: ObjectStore,
    model: nn.Module,
    taxonomy: Taxonomy,
    input_size: int,
    *,
    model_name: str,
    round_id: int | None = None,
    metrics: Mapping[str, Any] | None = None,
    validation_accuracy: float | None = None,
    test_accuracy: float | None = None,
    note: str = "",
) -> int:
    """Export ``model`` as the next version of ``model_name``; returns its number."""
    with db.connection() as conn, advisory_locks(conn, [model_lock_key(model_name)]):
        version = next_version(conn, model_name)
        conn.commit()
        files = modelrepo.export_version(
            model,
            taxonomy,
            input_size,
            model_name=model_name,
            version=version,
            metadata={"round_id": round_id, "note": note},
        )
        written: list[str] = []
        try:
            for rel, data in sorted(files.items()):
                if rel.endswith("config.pbtxt") and store.exists(rel, bucket=store.models_bucket):
                    continue  # shared by all versions; never rewrite it under a live Triton
                store.put(rel, data, bucket=store.models_bucket)
                written.append(rel)
            with conn.transaction():
                conn.execute(
                    """INSERT INTO model_versions (model_name, version, input_size, taxonomy,
                           round_id, validation_accuracy, test_accuracy, metrics, note)
                       VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)""",
                    (
                        model_name,
                        version,
                        input_size,
                        json.dumps(taxonomy.to_json()),
                        round_id,
                        validation_accuracy,
                        test_accuracy,
                        json.dumps(dict(metrics or {})),
                        note,
                    ),
                )
        except BaseException:
            _delete(store, written)
            raise
        return version


def model_lock_key(model_name: str) -> int:
    """The lock that serialises registering versions of ``model_name``."""
    return lock_key("model", model_name)


def next_version(conn: psycopg.Connection, model_name: str) -> int:
    row = conn.execute(
        "SELECT coalesce(max(version), 0) + 1 AS v FROM model_versions WHERE model_name = %s",
        (model_name,),
    ).fetchone()
    return int(row["v"] if isinstance(row, dict) else row[0])


def version_files(store: ObjectStore, model_name: str, version: int) -> dict[str, bytes]:
    """The stored Triton files of one version plus the model's config.pbtxt."""
    prefix = f"{model_name}/{version}/"
    files = {
        key: store.get(key, bucket=store.models_bucket)
        for key in store.list(prefix, bucket=store.models_bucket)
    }
    config = f"{model_name}/config.pbtxt"
    files[config] = store.get(config, bucket=store.models_bucket)
    return files


def _delete(store: ObjectStore, keys: list[str]) -> None:
    for key in keys:
        # Best effort: the error that brought us here matters more than this one.
        with contextlib.suppress(Exception):
            store.delete(key, bucket=store.models_bucket)


def state_dict_key(model_name: str, version: int) -> str:
    """Where a version's plain PyTorch weights live in the data bucket: what the next
    round's training transfers from."""
    return f"models/state_dicts/{model_name}/v{version}.pt"

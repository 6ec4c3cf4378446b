"""Which classifier version is served, and making Triton serve it.

Postgres says which version is active; Triton holds every version the repository
has (``version_policy: all``), so switching is a row update after the new version is
ready, and requests already in flight on the old version complete on it. Clients
always name a version, so no request lands on a version that is not loaded yet.
Activation and rollback are audited with the caller of the call in progress.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from bmcell import audit, log, modelrepo, modelstore
from bmcell.db import Database
from bmcell.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from bmcell.storage import ObjectStore
from services.classifier.triton_client import Triton

_LOG = log.get(__name__)
ACTIVE_CACHE_S = 1.0


class ModelServing:
    def __init__(
        self,
        db: Database,
        store: ObjectStore,
        triton: Triton,
        model_name: str,
        local_repository: str = "",
    ) -> None:
        self.db = db
        self.store = store
        self.triton = triton
        self.model_name = model_name
        self.local_repository = Path(local_repository) if local_repository else None
        self._lock = threading.Lock()
        self._active: tuple[float, dict | None] = (0.0, None)

    # --- reading ---------------------------------------------------------------------
    def versions(self, *, limit: int | None = None, after: int | None = None) -> list[dict]:
        """Versions in order, ``limit`` of them after ``after`` (one page) or all."""
        with self.db.connection() as conn:
            return conn.execute(
                """SELECT * FROM model_versions
                    WHERE model_name = %s AND (%s::bigint IS NULL OR version > %s)
                    ORDER BY version LIMIT %s""",
                (self.model_name, after, after, limit),
            ).fetchall()

    def active_version(self) -> int:
        with self.db.connection() as conn:
            row = conn.execute(
                "SELECT version FROM model_versions WHERE model_name = %s AND state = 'active'",
                (self.model_name,),
            ).fetchone()
        return row["version"] if row else 0

    def active(self) -> dict | None:
        at, row = self._active
        if time.monotonic() - at > ACTIVE_CACHE_S:
            with self.db.connection() as conn:
                row = conn.execute(
                    "SELECT * FROM model_versions WHERE model_name = %s AND state = 'active'",
                    (self.model_name,),
                ).fetchone()
            self._active = (time.monotonic(), row)
        return row

    def resolve(self, version: int) -> dict:
        """The row of ``version`` (0: the active one), ready to serve."""
        if version < 0:
            raise InvalidArgument(f"must be >= 0, got {version}", field="model_version")
        if version == 0:
            row = self.active()
            if row is None:
                # Versions are activated only after their gate (services/trainer/publish):
                # none active means none passed, or an operator retired it.
                raise FailedPrecondition(
                    f"no model passed the gate yet: {self.model_name} has no active version"
                )
            return row
        with self.db.connection() as conn:
            row = conn.execute(
                "SELECT * FROM model_versions WHERE model_name = %s AND version = %s",
                (self.model_name, version),
            ).fetchone()
        if row is None:
            raise NotFound(f"{self.model_name} has no version {version}", field="model_version")
        return row

    # --- making Triton serve a version -------------------------------------------------
    def ensure_loaded(self, version: int, timeout_s: float = 180.0) -> None:
        if self.triton.version_ready(self.model_name, version):
            return
        with self._lock:
            if self.triton.version_ready(self.model_name, version):
                return
            if self.local_repository is not None:
                files = modelstore.version_files(self.store, self.model_name, version)
                # Only this version and the active one stay loaded: each loaded version
                # is `instance_count` backend processes with torch in them, and a
                # reload restarts every one, so a model with 25 rounds of versions
                # under `version_policy: all` took minutes to load and gigabytes of
                # memory. A request naming another version loads it on demand.
                keep = {version, self.active_version()} - {0}
                config = f"{self.model_name}/config.pbtxt"
                files = {
                    **files,
                    config: modelrepo.with_versions(files[config].decode(), sorted(keep)).encode(),
                }
                modelrepo.write_tree(files, self.local_repository)
            self.triton.load(self.model_name, timeout_s)
            deadline = time.monotonic() + timeout_s
            while not self.triton.version_ready(self.model_name, version):
                if time.monotonic() > deadline:
                    raise Unavailable(f"Triton did not load {self.model_name} v{version} in time")
                time.sleep(0.2)
        _LOG.info("model version loaded", model=self.model_name, version=version)

    def restore(self) -> None:
        """After a Triton or service restart: serve the active version again."""
        row = self.active()
        if row is not None:
            self.ensure_loaded(row["version"])

    def activate(self, version: int, *, action: str = "model.activate") -> dict:
        row = self.resolve(version)
        if row["state"] == "rejected":
            raise FailedPrecondition(
                f"{self.model_name} v{version} was rejected by the promotion gate: {row['note']}"
            )
        self.ensure_loaded(version)
        with self.db.transaction() as conn:
            before = conn.execute(
                "SELECT version FROM model_versions WHERE model_name = %s AND state = 'active' "
                "FOR UPDATE",
                (self.model_name,),
            ).fetchone()
            conn.execute(
                "UPDATE model_versions SET state = 'retired' WHERE model_name = %s AND state = 'active'",
                (self.model_name,),
            )
            row = conn.execute(
                "UPDATE model_versions SET state = 'active', activated_at = now() "
                "WHERE model_name = %s AND version = %s RETURNING *",
                (self.model_name, version),
            ).fetchone()
            audit.record(
                conn,
                action,
                "model_version",
                f"{self.model_name}/{version}",
                before=None if before is None else {"active": before["version"]},
                after={"active": version},
            )
        self._active = (0.0, None)
        _LOG.info(
            "model version activated",
            model=self.model_name,
            version=version,
            previous=before and before["version"],
        )
        return row

    def rollback(self) -> dict:
        """Activate the version that was active before the current one."""
        with self.db.connection() as conn:
            previous = conn.execute(
                """SELECT version FROM model_versions
                    WHERE model_name = %s AND state = 'retired' AND activated_at IS NOT NULL
                    ORDER BY activated_at DESC LIMIT 1""",
                (self.model_name,),
            ).fetchone()
        if previous is None:
            raise FailedPrecondition(
                f"{self.model_name} has no earlier active version to roll back to"
            )
        return self.activate(previous["version"], action="model.rollback")

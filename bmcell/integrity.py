"""Storage integrity: objects that no row uses, rows whose object is gone, and repair.

Postgres says what must exist, object storage holds it; a crash between the two (an
object written, its row never committed), a lost volume or a hand that deleted the
wrong key leaves them disagreeing. ``bmcell storage check`` compares them:

=====================================================  ==================================
object (bucket)                                        is used by
=====================================================  ==================================
``fields/..`` (data)                                   ``field_images.object_key``
``cells/..png``, ``cells/..mask.png`` (data)           ``cells.crop_key``, ``mask_key``
``checkpoints/<job>/..``, ``training-jobs/<job>/..``   ``training_jobs.id``
``models/state_dicts/<model>/v<N>.pt`` (data)          ``model_versions`` (model, N)
``reports/confusion/<model>/v<N>-..`` (data)           ``model_versions`` (model, N)
``<model>/config.pbtxt``, ``<model>/<N>/..`` (models)  ``model_versions`` (model[, N])
=====================================================  ==================================

An *orphan* is an object under one of these prefixes that no row uses; a *missing*
object is one a row needs and storage lacks: a field's image, a cell's crop or mask,
a version's Triton files (:data:`VERSION_FILES` and the model's ``config.pbtxt``), a
version's ``confusion_key``. Checkpoints and state dicts count only as orphans: Ray
keeps the last few checkpoints of a job, and a version registered by hand has no
state dict. Whatever else the buckets hold (segmenter weights, anything unknown) is
not judged. The check reads one database (``BMCELL_DATABASE_URL``); objects that only
another database's rows use (an experiment's ``exp_*`` copies) show as orphans.

Repair deletes orphans older than a grace period, so an upload or a registration in
flight (objects written, rows not yet committed) is left alone; and each deletion
happens under the advisory lock that writers of that object hold until their rows
commit (:func:`bmcell.db.object_lock_key` for fields, crops and masks,
:func:`bmcell.modelstore.model_lock_key` for model files), after checking again that
no row uses the object. Lost crops and masks are cut again from their field by a
``Recut`` the caller hands in (the segmenter's, :mod:`services.segmenter.restore`);
what cannot be restored is reported with what must be uploaded or registered again.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

from psycopg import Connection

from bmcell.db import Database, advisory_locks, object_lock_key
from bmcell.errors import NotFound
from bmcell.modelstore import model_lock_key
from bmcell.storage import ObjectStore, digest_of_key

VERSION_FILES = ("model.pt", "model.py", "taxonomy.json", "preprocessing.json", "metadata.json")
DEFAULT_GRACE_S = 3600.0

# (field row, its cells' rows, the keys lost among them) -> verified bytes by key
Recut = Callable[[Mapping, list[Mapping], set[str]], dict[str, bytes]]

_STATE_DICT = re.compile(r"^models/state_dicts/(?P<model>[^/]+)/v(?P<version>\d+)\.pt$")
_CONFUSION = re.compile(r"^reports/confusion/(?P<model>[^/]+)/v(?P<version>\d+)-[^/]+$")
_JOB_FILES = re.compile(r"^(?:checkpoints|training-jobs)/(?P<job>[^/]+)/")
_MODEL_FILE = re.compile(r"^(?P<model>[^/]+)/(?:config\.pbtxt|(?P<version>\d+)/[^/]+)$")


@dataclass(frozen=True)
class Finding:
    problem: str  # "orphan" or "missing"
    bucket: str
    key: str
    kind: str  # field, crop, mask, checkpoint, state-dict, confusion, model-file
    row: str = ""  # the row that needs a missing object, e.g. "cell 12"
    modified: datetime | None = None  # an orphan's last write

    def to_json(self) -> dict:
        d = asdict(self)
        d["modified"] = self.modified.isoformat() if self.modified else None
        return d


@dataclass
class CheckReport:
    findings: list[Finding]

    @property
    def orphans(self) -> list[Finding]:
        return [f for f in self.findings if f.problem == "orphan"]

    @property
    def missing(self) -> list[Finding]:
        return [f for f in self.findings if f.problem == "missing"]

    def to_json(self) -> dict:
        return {
            "orphans": len(self.orphans),
            "missing": len(self.missing),
            "findings": [f.to_json() for f in self.findings],
        }


@dataclass
class RepairReport:
    deleted: list[Finding] = field(default_factory=list)
    too_young: list[Finding] = field(default_factory=list)  # orphans within the grace period
    restored: list[Finding] = field(default_factory=list)
    # (finding, what a person must do about it)
    unrepaired: list[tuple[Finding, str]] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "deleted": [f.to_json() for f in self.deleted],
            "too_young": [f.to_json() for f in self.too_young],
            "restored": [f.to_json() for f in self.restored],
            "unrepaired": [{**f.to_json(), "action": a} for f, a in self.unrepaired],
        }


# --- check ----------------------------------------------------------------------------


def check(db: Database, store: ObjectStore) -> CheckReport:
    """Every orphan and every missing object, data bucket first, by key."""
    with db.connection() as conn:
        refs = _references(conn)
    data, models = store.data_bucket, store.models_bucket
    findings: list[Finding] = []
    present: set[str] = set()
    for prefix in ("fields/", "cells/", "checkpoints/", "training-jobs/", "models/", "reports/"):
        for obj in store.list_objects(prefix, bucket=data):
            present.add(obj.key)
            kind = _data_kind(obj.key)
            if kind and not _data_used(obj.key, kind, refs):
                findings.append(Finding("orphan", data, obj.key, kind, modified=obj.modified))
    for key, (kind, row) in sorted(refs.data_needed.items()):
        if key not in present:
            findings.append(Finding("missing", data, key, kind, row))
    model_files: set[str] = set()
    for obj in store.list_objects("", bucket=models):
        model_files.add(obj.key)
        m = _MODEL_FILE.match(obj.key)
        if m is None:
            continue
        name, version = m.group("model"), m.group("version")
        used = (
            name in refs.model_names if version is None else (name, int(version)) in refs.versions
        )
        if not used:
            findings.append(Finding("orphan", models, obj.key, "model-file", modified=obj.modified))
    for name, version in sorted(refs.versions_needing_files):
        row = f"model {name} v{version}"
        for rel in (f"{name}/config.pbtxt", *(f"{name}/{version}/{f}" for f in VERSION_FILES)):
            if rel not in model_files:
                findings.append(Finding("missing", models, rel, "model-file", row))
    return CheckReport(_unique(findings))


@dataclass
class _Refs:
    data_needed: dict[str, tuple[str, str]]  # key -> (kind, row)
    jobs: set[str]
    versions: set[tuple[str, int]]
    model_names: set[str]
    versions_needing_files: set[tuple[str, int]]


def _references(conn: Connection) -> _Refs:
    needed: dict[str, tuple[str, str]] = {}
    for r in conn.execute("SELECT id, object_key FROM field_images"):
        needed[r["object_key"]] = ("field", f"field {r['id']}")
    for r in conn.execute("SELECT id, crop_key, mask_key FROM cells"):
        needed.setdefault(r["crop_key"], ("crop", f"cell {r['id']}"))
        needed.setdefault(r["mask_key"], ("mask", f"cell {r['id']}"))
    versions, needing, names = set(), set(), set()
    for r in conn.execute("SELECT model_name, version, state, confusion_key FROM model_versions"):
        versions.add((r["model_name"], r["version"]))
        names.add(r["model_name"])
        if r["state"] != "rejected":  # a refused version need not stay servable
            needing.add((r["model_name"], r["version"]))
        if r["confusion_key"]:
            needed[r["confusion_key"]] = ("confusion", f"model {r['model_name']} v{r['version']}")
    jobs = {r["id"] for r in conn.execute("SELECT id FROM training_jobs")}
    conn.commit()
    return _Refs(needed, jobs, versions, names, needing)


def _data_kind(key: str) -> str | None:
    if key.startswith("fields/"):
        return "field"
    if key.startswith("cells/"):
        return "mask" if key.endswith(".mask.png") else "crop"
    if _JOB_FILES.match(key):
        return "checkpoint"
    if _STATE_DICT.match(key):
        return "state-dict"
    if _CONFUSION.match(key):
        return "confusion"
    return None


def _data_used(key: str, kind: str, refs: _Refs) -> bool:
    if kind in ("field", "crop", "mask"):
        return key in refs.data_needed
    if kind == "checkpoint":
        return _JOB_FILES.match(key).group("job") in refs.jobs
    m = (_STATE_DICT if kind == "state-dict" else _CONFUSION).match(key)
    return key in refs.data_needed or (m.group("model"), int(m.group("version"))) in refs.versions


def _unique(findings: list[Finding]) -> list[Finding]:
    seen: set[tuple[str, str, str]] = set()
    out = []
    for f in findings:
        if (f.problem, f.bucket, f.key) not in seen:
            seen.add((f.problem, f.bucket, f.key))
            out.append(f)
    return out


# --- repair ---------------------------------------------------------------------------


def repair(
    db: Database,
    store: ObjectStore,
    report: CheckReport,
    *,
    recut: Recut | None,
    grace_s: float = DEFAULT_GRACE_S,
    now: datetime | None = None,
) -> RepairReport:
    """Delete the report's orphans older than ``grace_s``; restore what can be restored."""
    now = now or datetime.now(UTC)
    out = RepairReport()
    with db.connection() as conn:
        for f in report.orphans:
            if f.modified is not None and (now - f.modified).total_seconds() < grace_s:
                out.too_young.append(f)
            elif _delete_if_unused(conn, store, f):
                out.deleted.append(f)
        lost_cells = [f for f in report.missing if f.kind in ("crop", "mask")]
        _restore_cells(conn, store, lost_cells, recut, out)
    for f in report.missing:
        if f.kind == "field":
            out.unrepaired.append((f, "upload the field's file again (it restores the image)"))
        elif f.kind == "model-file":
            out.unrepaired.append((f, f"retire {f.row} or register the model again"))
        elif f.kind == "confusion":
            out.unrepaired.append((f, f"evaluate {f.row} again"))
    return out


def _delete_if_unused(conn: Connection, store: ObjectStore, f: Finding) -> bool:
    """Delete an orphan under its writers' lock, unless a row has started using it."""
    with advisory_locks(conn, _locks_of(f)):
        if _still_used(conn, f):
            return False
        store.delete(f.key, bucket=f.bucket)  # S3: deleting what is gone already succeeds
        return True


def _locks_of(f: Finding) -> list[int]:
    if f.kind in ("field", "crop", "mask"):
        digest = digest_of_key(f.key)
        return [object_lock_key(digest)] if digest else []
    if f.kind == "model-file":
        return [model_lock_key(f.key.split("/", 1)[0])]
    return []


def _still_used(conn: Connection, f: Finding) -> bool:
    """The check's verdict again, for one object, now that its writers wait."""
    if f.kind in ("field", "crop", "mask"):
        row = conn.execute(
            """SELECT EXISTS (SELECT 1 FROM field_images WHERE object_key = %(k)s)
                   OR EXISTS (SELECT 1 FROM cells WHERE crop_key = %(k)s OR mask_key = %(k)s)
                   AS used""",
            {"k": f.key},
        ).fetchone()
    elif f.kind == "checkpoint":
        job = _JOB_FILES.match(f.key).group("job")
        row = conn.execute(
            "SELECT EXISTS (SELECT 1 FROM training_jobs WHERE id = %s) AS used", (job,)
        ).fetchone()
    else:
        name, version = _model_and_version(f)
        row = conn.execute(
            """SELECT EXISTS (SELECT 1 FROM model_versions WHERE model_name = %s
                              AND (%s::int IS NULL OR version = %s)) AS used""",
            (name, version, version),
        ).fetchone()
    conn.commit()
    return bool(row["used"])


def _model_and_version(f: Finding) -> tuple[str, int | None]:
    if f.kind == "model-file":
        m = _MODEL_FILE.match(f.key)
    else:
        m = (_STATE_DICT if f.kind == "state-dict" else _CONFUSION).match(f.key)
    version = m.group("version")
    return m.group("model"), None if version is None else int(version)


def _restore_cells(
    conn: Connection,
    store: ObjectStore,
    lost: list[Finding],
    recut: Recut | None,
    out: RepairReport,
) -> None:
    """Cut lost crops and masks again, one field at a time, under their objects' locks."""
    handled: set[str] = set()  # a crop two fields share is restored once
    for field_row, cells, of_field in _by_field(conn, lost):
        findings = [f for f in of_field if f.key not in handled]
        keys = {f.key for f in findings}
        handled |= keys
        done: dict[str, bytes] = {}
        if recut is not None:
            digests = [d for d in map(digest_of_key, keys) if d]
            with advisory_locks(conn, map(object_lock_key, digests)):
                keys = {k for k in keys if not store.exists(k)}  # an upload was first
                try:
                    done = recut(field_row, cells, keys) if keys else {}
                except NotFound:
                    done = {}  # the field image is gone too: see below
                for key, data in done.items():
                    store.put(key, data, "image/png")
        for f in findings:
            if f.key in done or f.key not in keys:
                out.restored.append(f)
            else:
                out.unrepaired.append(
                    (
                        f,
                        f"upload field {field_row['id']} again (sha256 {field_row['sha256']}, "
                        f"lab {field_row['lab']}, specimen {field_row['specimen']})",
                    )
                )


def _by_field(
    conn: Connection, lost: list[Finding]
) -> Iterator[tuple[dict, list[dict], list[Finding]]]:
    if not lost:
        return
    keys = [f.key for f in lost]
    cells = conn.execute(
        """SELECT id, field_id, index_in_field, x0, y0, x1, y1, crop_key, mask_key
             FROM cells WHERE field_id IN
                  (SELECT field_id FROM cells WHERE crop_key = ANY(%(k)s) OR mask_key = ANY(%(k)s))
            ORDER BY field_id, index_in_field""",
        {"k": keys},
    ).fetchall()
    fields = {
        r["id"]: r
        for r in conn.execute(
            """SELECT f.id, f.sha256, f.object_key, f.segmenter, l.code AS lab, s.code AS specimen
                 FROM field_images f JOIN labs l ON l.id = f.lab_id
                      JOIN specimens s ON s.id = f.specimen_id
                WHERE f.id = ANY(%s)""",
            (sorted({c["field_id"] for c in cells}),),
        )
    }
    conn.commit()
    for field_id, field_row in sorted(fields.items()):
        of_field = [c for c in cells if c["field_id"] == field_id]
        used = {k for c in of_field for k in (c["crop_key"], c["mask_key"])}
        yield field_row, of_field, [f for f in lost if f.key in used]

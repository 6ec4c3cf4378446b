"""Simulated reviewers: answer review tasks through the real labeling API from known truth.

The demo, the round orchestrator and experiments need people to answer CST, AL,
bootstrap and adjudication tasks. :func:`simulate_reviews` runs N reviewer threads,
each with its own user and token, against ``POST /v1/tasks/next`` and
``POST /v1/tasks/{id}/submit`` exactly as the reviewer page does. Each answer comes
from a :class:`TruthIndex` (the synthetic ground truth), with injected mistakes and
"too difficult" verdicts at the rates asked for.

Truth: a segmented cell maps back to the synthetic manifest by its field (the
sha256 of the uploaded file, which the segmenter's ListCells gives with every cell)
and then by the field's instance mask (``*.instances.png``): the instance ids under
the cell's bounding box are the candidates, and the one whose manifest bbox overlaps
the segmented bbox best (IoU >= 0.3) is the cell. Cells put in some other way
(tests, imports) can be given a JSON mapping ``{cell_id: class}`` instead
(:meth:`TruthIndex.load`).

Everything goes through the public interfaces a lab has: cells come from the
segmenter's ListCells (a :data:`CellSource`), reviewers are created and given tokens
through the labeling API's ``/v1/users`` with an admin's token. Nothing here opens
Postgres or object storage.

Determinism: every decision (difficult, error, which wrong class) is drawn from a
generator seeded by ``(seed, task id, reviews so far)``, so the same tasks get the
same answers whatever thread leases them. Thread interleaving still decides which
reviewer answers which task.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np

from bmcell import http_client
from bmcell.storage import sha256_hex
from bmcell.synth.manifest import CellRecord, FieldRecord, Manifest, load_manifest
from bmcell.taxonomy import DEFAULT_TAXONOMY, Taxonomy

#: Maturation series: a mistaken reviewer usually picks a neighbour in one of these.
MATURATION_SERIES: tuple[tuple[str, ...], ...] = (
    ("MB", "PMC", "MC", "MMC", "Band", "Seg"),
    ("PEB", "PCEB", "OEB"),
    ("BN", "ART"),
    ("LY", "PC"),
)
#: Share of injected errors that go to a maturation neighbour (the rest: any class).
NEIGHBOUR_SHARE = 0.8
#: Minimum bbox IoU between a segmented cell and a manifest cell to call them one.
MIN_IOU = 0.3
USER_PREFIX = "sim-reviewer"
ADJUDICATOR = "sim-adjudicator"
#: A cell the index cannot place triggers a fresh listing at most this often.
REFRESH_EVERY_S = 2.0

#: (lab, specimen) -> that specimen's cells as mappings with id, field_id,
#: field_sha256, x0, y0, x1, y1 (the segmenter's ListCells, see bmcell.scenario).
CellSource = Callable[[str, str], Iterable[Mapping]]


# --- truth ----------------------------------------------------------------------------


def bbox_iou(a: Sequence[int], b: Sequence[int]) -> float:
    """IoU of two x0, y0, x1, y1 boxes (x1, y1 exclusive)."""
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def match_cell(
    record: FieldRecord, instances: np.ndarray, bbox: Sequence[int], min_iou: float = MIN_IOU
) -> CellRecord | None:
    """The manifest cell a segmented ``bbox`` of this field stands for, or None.

    Candidates are the instance ids under the bbox (the one at its centre first); the
    winner is the candidate whose manifest bbox overlaps ``bbox`` best.
    """
    x0, y0, x1, y1 = (int(v) for v in bbox)
    h, w = instances.shape[:2]
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
    if x1 <= x0 or y1 <= y0:
        return None
    by_id = {c.id: c for c in record.cells}
    window = instances[y0:y1, x0:x1]
    ids, counts = np.unique(window[window > 0], return_counts=True)
    centre = int(instances[(y0 + y1 - 1) // 2, (x0 + x1 - 1) // 2])
    best: tuple[float, int, CellRecord] | None = None
    for iid, n in zip(ids.tolist(), counts.tolist(), strict=True):
        cell = by_id.get(int(iid))
        if cell is None:
            continue
        score = (bbox_iou(cell.bbox, bbox), int(iid == centre), n)
        if best is None or score[:2] > best[:2]:
            best = (score[0], score[1], cell)
    if best is None or best[0] < min_iou:
        return None
    return best[2]


class TruthIndex:
    """Cell id -> true class code, from a synthetic manifest or a plain mapping.

    :meth:`truth` answers None for a cell it cannot place. Built from a manifest with
    a :data:`CellSource` (:meth:`from_manifest`), it places cells uploaded after it
    was built too, on first use; it is safe to share between threads.
    """

    def __init__(
        self,
        mapping: Mapping[int, str] | None = None,
        *,
        manifest: Manifest | None = None,
        cells: CellSource | None = None,
        labs: Mapping[str, str] | None = None,
    ) -> None:
        self._known: dict[int, str | None] = {int(k): v for k, v in (mapping or {}).items()}
        self._manifest = manifest
        self._cells = cells
        self._labs = dict(labs or {})
        self._lock = threading.Lock()
        self._refreshed_at = -REFRESH_EVERY_S
        self._by_sha: dict[str, FieldRecord] = {}
        if manifest is not None:
            root = manifest.root or Path(".")
            for _spec, rec in manifest.fields():
                path = root / rec.image
                if not path.exists():
                    raise ValueError(f"{path}: a manifest's images are needed to place its cells")
                self._by_sha[sha256_hex(path.read_bytes())] = rec

    # construction ----------------------------------------------------------------------

    @classmethod
    def from_mapping(cls, mapping: Mapping[int | str, str]) -> TruthIndex:
        return cls({int(k): v for k, v in mapping.items()})

    @classmethod
    def from_manifest(
        cls,
        manifest: Manifest | str | Path,
        cells: CellSource,
        labs: Mapping[str, str] | None = None,
    ) -> TruthIndex:
        """Truth for every cell of the manifest's uploaded fields; see the module doc.
        ``labs`` maps a manifest lab to the lab its specimens were uploaded to, where
        the two differ."""
        if not isinstance(manifest, Manifest):
            manifest = load_manifest(manifest)
        index = cls(manifest=manifest, cells=cells, labs=labs)
        index.refresh()
        return index

    @classmethod
    def from_rows(cls, manifest: Manifest, cells: Iterable[Mapping]) -> TruthIndex:
        """Without a cell source: ``cells`` rows have id, field_id, field_sha256, x0,
        y0, x1, y1 (as a :data:`CellSource` gives them)."""
        index = cls(manifest=manifest)
        index._place(list(cells))
        return index

    @classmethod
    def load(cls, path: str | Path, cells: CellSource | None = None) -> TruthIndex:
        """A ``manifest.json`` (or its folder; needs ``cells``) or a ``{cell_id: class}`` JSON."""
        path = Path(path)
        if path.is_dir():
            path = path / "manifest.json"
        data = json.loads(path.read_text())
        if isinstance(data, dict) and "specimens" in data and "version" in data:
            if cells is None:
                raise ValueError(
                    f"{path} is a synth manifest: placing its cells needs the segmenter"
                )
            return cls.from_manifest(path, cells)
        if isinstance(data, dict):
            return cls.from_mapping(data)
        if isinstance(data, list):  # [{"cell_id": 1, "class": "MB"}, ...]
            return cls.from_mapping({r["cell_id"]: r["class"] for r in data})
        raise ValueError(f"{path}: expected a synth manifest or a {{cell_id: class}} mapping")

    # lookups ---------------------------------------------------------------------------

    def truth(self, cell_id: int) -> str | None:
        """The cell's true class code, or None when it cannot be placed."""
        cell_id = int(cell_id)
        with self._lock:
            if cell_id in self._known:
                return self._known[cell_id]
            stale = time.monotonic() - self._refreshed_at >= REFRESH_EVERY_S
        if self._cells is None or not stale:
            return None
        self.refresh()  # a cell uploaded since the last listing
        with self._lock:
            return self._known.setdefault(cell_id, None)

    def __len__(self) -> int:
        return sum(v is not None for v in self._known.values())

    def mapping(self) -> dict[int, str]:
        """Every placed cell and its class (writable as the fallback JSON)."""
        with self._lock:
            return {k: v for k, v in sorted(self._known.items()) if v is not None}

    def refresh(self) -> None:
        """Place every cell of the manifest's specimens, listed from the cell source."""
        if self._cells is None or self._manifest is None:
            return
        with self._lock:
            self._refreshed_at = time.monotonic()
        rows: list[Mapping] = []
        for spec in self._manifest.specimens:
            rows += list(self._cells(self._labs.get(spec.lab, spec.lab), spec.id))
        self._place(rows)

    def _place(self, cells: list[Mapping]) -> None:
        assert self._manifest is not None
        root = self._manifest.root or Path(".")
        by_field: dict[int, list[Mapping]] = {}
        for c in cells:
            by_field.setdefault(int(c["field_id"]), []).append(c)
        found: dict[int, str | None] = {}
        for rows in by_field.values():
            rec = self._by_sha.get(str(rows[0].get("field_sha256") or "").strip())
            if rec is None:  # a field that is not the manifest's
                found.update({int(c["id"]): None for c in rows})
                continue
            instances = _read_ids(root / rec.instances)
            for c in rows:
                hit = match_cell(rec, instances, (c["x0"], c["y0"], c["x1"], c["y1"]))
                found[int(c["id"])] = hit.cls if hit else None
        with self._lock:
            self._known.update(found)


def _read_ids(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im).astype(np.int64)


# --- answering ------------------------------------------------------------------------


def wrong_class(truth: str, rng: random.Random, taxonomy: Taxonomy = DEFAULT_TAXONOMY) -> str:
    """A class other than ``truth``: mostly a maturation neighbour, else any other."""
    codes = taxonomy.codes
    neighbours: list[str] = []
    for series in MATURATION_SERIES:
        if truth in series:
            i = series.index(truth)
            neighbours = [c for c in series[max(0, i - 1) : i + 2] if c != truth and c in codes]
    if neighbours and rng.random() < NEIGHBOUR_SHARE:
        return rng.choice(neighbours)
    return rng.choice([c for c in codes if c != truth])


@dataclass(frozen=True)
class Decision:
    answer: str  # confirm | correct | difficult
    class_code: str | None  # what the answer amounts to (None for difficult)
    error: bool  # an injected mistake
    send_class: bool  # whether the submit body carries class_code


def decide(
    task: Mapping,
    truth: str | None,
    *,
    error_rate: float,
    difficult_rate: float,
    seed: int,
    taxonomy: Taxonomy = DEFAULT_TAXONOMY,
    on_unknown: str = "difficult",
) -> Decision:
    """How a simulated reviewer answers ``task`` (a leased task's JSON)."""
    rng = random.Random(f"{seed}:{task['task_id']}:{task.get('reviews_so_far', 0)}")
    suggestion = task.get("suggested_class") or (
        task["top"][0]["class_code"] if task.get("top") else None
    )
    if truth is None:
        if on_unknown == "confirm" and suggestion:
            return Decision("confirm", suggestion, False, False)
        return Decision("difficult", None, False, False)
    if rng.random() < difficult_rate:
        return Decision("difficult", None, False, False)
    error = rng.random() < error_rate
    chosen = wrong_class(truth, rng, taxonomy) if error else truth
    if suggestion is not None and chosen == suggestion:
        return Decision("confirm", chosen, error, False)
    return Decision("correct", chosen, error, True)


# --- users ----------------------------------------------------------------------------


def ensure_reviewers(
    labelapi_url: str,
    admin_token: str,
    n: int,
    *,
    labs: Sequence[str] | None = None,
    prefix: str = USER_PREFIX,
    adjudicator: str | None = ADJUDICATOR,
    expires_days: float = 1.0,
) -> list[tuple[str, str]]:
    """Users ``{prefix}-1..n`` (role reviewer, every lab of ``labs`` or every lab there
    is, missing lab grants added) and ``adjudicator`` (admin) if given; returns
    (name, fresh token) pairs, the adjudicator last. Made through the labeling API
    with ``admin_token``, as an admin would with `bmcell users`."""
    with people_client(labelapi_url, admin_token) as api:
        existing = {lab["code"] for lab in _json(_request(api, "GET", "/v1/labs"))["labs"]}
        missing = sorted(set(labs or ()) - existing)
        if missing:
            raise ValueError(f"lab {missing[0]!r} does not exist")
        if not existing:
            raise ValueError("there are no labs yet: `bmcell labs add` or upload fields first")
        codes = sorted(labs) if labs is not None else sorted(existing)
        out = []
        for i in range(1, n + 1):
            name = f"{prefix}-{i}"
            ensure_user(api, name, "reviewer", codes)
            out.append((name, issue_token(api, name, expires_days)))
        if adjudicator:
            ensure_user(api, adjudicator, "admin", [])
            out.append((adjudicator, issue_token(api, adjudicator, expires_days)))
    return out


def people_client(labelapi_url: str, token: str) -> httpx.Client:
    """An HTTP client of the labeling API speaking as ``token``'s owner."""
    return http_client.client(labelapi_url, token)


def ensure_user(api: httpx.Client, name: str, role: str, labs: Sequence[str]) -> None:
    """User ``name`` with ``role``, granted at least ``labs`` (created when missing)."""
    resp = _request(api, "POST", "/v1/users", json={"name": name, "role": role, "labs": list(labs)})
    if resp.status_code != 409:
        _check(resp)
        return
    users = _json(_request(api, "GET", "/v1/users"))["users"]
    user = next(u for u in users if u["name"] == name)
    if user["role"] != role:
        raise ValueError(f"user {name!r} exists with role {user['role']!r}, not {role!r}")
    granted = set(user.get("labs") or ())
    if role in ("reviewer", "uploader") and not set(labs) <= granted:
        _check(
            _request(api, "PATCH", f"/v1/users/{name}", json={"labs": sorted(granted | set(labs))})
        )


def issue_token(api: httpx.Client, name: str, expires_days: float) -> str:
    return _json(
        _request(api, "POST", f"/v1/users/{name}/tokens", json={"expires_days": expires_days})
    )["token"]


def _json(resp: httpx.Response) -> dict:
    _check(resp)
    return resp.json()


# --- the simulation -------------------------------------------------------------------


@dataclass
class ReviewStats:
    reviews: int = 0
    confirms: int = 0
    corrections: int = 0
    difficult: int = 0
    errors_injected: int = 0
    unknown_truth: int = 0
    adjudications: int = 0  # adjudication tasks answered
    adjudications_created: int = 0  # submits whose outcome sent the cell to an admin
    labelled: int = 0  # submits that settled a label
    conflicts: int = 0  # 409: the lease was lost (expired, taken over)
    seconds: float = 0.0
    by_reviewer: dict[str, int] = field(default_factory=dict)
    by_kind: dict[str, int] = field(default_factory=dict)
    answers: list[dict] = field(default_factory=list)
    stopped: str = ""  # empty | max_tasks | timeout

    @property
    def tasks_per_s(self) -> float:
        return self.reviews / self.seconds if self.seconds > 0 else 0.0

    def to_json(self, *, with_answers: bool = False) -> dict:
        d = asdict(self)
        if not with_answers:
            d.pop("answers")
        d["tasks_per_s"] = round(self.tasks_per_s, 3)
        d["seconds"] = round(self.seconds, 3)
        return d


class _Coordinator:
    """Decides when every reviewer has found the queue empty since the last answer."""

    def __init__(self, names: list[str], max_tasks: int | None, deadline: float | None):
        self.lock = threading.Lock()
        self.generation = 0  # submits so far
        self.empty_at: dict[str, int] = {}
        self.names = names
        self.claimed = 0
        self.max_tasks = max_tasks
        self.deadline = deadline
        self.stop = threading.Event()
        self.reason = ""
        self.error: BaseException | None = None

    def claim(self) -> bool:
        """May this reviewer lease another task?"""
        with self.lock:
            if self.stop.is_set():
                return False
            if self.deadline is not None and time.monotonic() > self.deadline:
                self.reason = "timeout"
                self.stop.set()
                return False
            if self.max_tasks is not None and self.claimed >= self.max_tasks:
                self.reason = "max_tasks"
                self.stop.set()
                return False
            self.claimed += 1
            return True

    def unclaim(self) -> None:
        with self.lock:
            self.claimed -= 1

    def submitted(self) -> None:
        with self.lock:
            self.generation += 1

    def empty(self, name: str, generation: int) -> None:
        with self.lock:
            self.empty_at[name] = generation
            if all(self.empty_at.get(n) == self.generation for n in self.names):
                self.reason = "empty"
                self.stop.set()

    def fail(self, exc: BaseException) -> None:
        with self.lock:
            self.error = self.error or exc
            self.stop.set()


def simulate_reviews(
    labelapi_url: str,
    admin_token: str,
    truth: TruthIndex,
    reviewers: int = 3,
    error_rate: float = 0.0,
    difficult_rate: float = 0.0,
    seed: int = 0,
    stop_when_empty: bool = True,
    *,
    max_tasks: int | None = None,
    kind: str | None = None,
    labs: Sequence[str] | None = None,
    adjudicate: bool = True,
    user_prefix: str = USER_PREFIX,
    adjudicator: str = ADJUDICATOR,
    on_unknown: str = "difficult",
    timeout_s: float | None = None,
    poll_s: float = 0.2,
    taxonomy: Taxonomy = DEFAULT_TAXONOMY,
    progress: Callable[[ReviewStats], None] | None = None,
    page_size: int = 1,
) -> ReviewStats:
    """Answer tasks through the labeling API at ``labelapi_url`` until the queue is empty.

    ``reviewers`` threads (users ``{user_prefix}-1..N``, role reviewer, granted
    ``labs`` or every lab; created when missing with ``admin_token``) plus, with ``adjudicate``, one admin
    thread (``adjudicator``) that answers only adjudication tasks. Each lease is
    answered from ``truth``: "difficult" with probability ``difficult_rate``, else a
    wrong class (mostly a maturation neighbour) with probability ``error_rate``, else
    the truth; "confirm" when the class equals the task's suggestion (CST suggestion,
    AL top class), "correct" otherwise. A cell without truth is answered per
    ``on_unknown`` ("difficult", or "confirm" the suggestion).

    Stops when every thread has found no task since the last answer anyone gave
    (``stop_when_empty``; otherwise it keeps polling until ``max_tasks`` or
    ``timeout_s``), after ``max_tasks`` leases, or after ``timeout_s``. With ``labs``,
    leases ask for those labs only, so an admin adjudicator stays out of other labs.

    ``page_size`` > 1: each reviewer leases that many tasks at a time
    (``POST /v1/tasks/page``, as the reviewer page's gallery does) and answers each with
    its own submit; one lease call then serves a page, not a task. With ``max_tasks``
    leases stay one at a time, so the count is exact.
    """
    if not 0 <= error_rate <= 1 or not 0 <= difficult_rate <= 1:
        raise ValueError("error_rate and difficult_rate must be within 0..1")
    if reviewers < 1:
        raise ValueError("reviewers must be >= 1")
    users = ensure_reviewers(
        labelapi_url,
        admin_token,
        reviewers,
        labs=labs,
        prefix=user_prefix,
        adjudicator=adjudicator if adjudicate and kind in (None, "adjudication") else None,
    )
    if kind == "adjudication":
        users = users[reviewers:]  # only the admin can lease these
    started = time.monotonic()
    coord = _Coordinator(
        [u for u, _ in users],
        max_tasks,
        None if timeout_s is None else started + timeout_s,
    )
    stats = ReviewStats(by_reviewer={u: 0 for u, _ in users})
    stats_lock = threading.Lock()
    lab_cycle: list[str | None] = list(labs) if labs else [None]

    page = 1 if max_tasks is not None else page_size

    def lease(client: httpx.Client, lease_kind: str | None) -> list[dict]:
        for lab in lab_cycle:
            params = {k: v for k, v in (("kind", lease_kind), ("lab", lab)) if v}
            if page > 1:
                resp = _request(client, "POST", "/v1/tasks/page", params={**params, "size": page})
                _check(resp)
                tasks = resp.json()["tasks"]
                if tasks:
                    return tasks
                continue
            resp = _request(client, "POST", "/v1/tasks/next", params=params)
            if resp.status_code == 204:
                continue
            _check(resp)
            return [resp.json()]
        return []

    def work(name: str, token: str) -> None:
        lease_kind = "adjudication" if name == adjudicator and adjudicate else kind
        with people_client(labelapi_url, token) as client:
            while coord.claim():
                generation = coord.generation
                tasks = lease(client, lease_kind)
                if not tasks:
                    coord.unclaim()
                    if stop_when_empty:
                        coord.empty(name, generation)
                    coord.stop.wait(poll_s)
                    continue
                for task in tasks:
                    answer(client, name, task)

    def answer(client: httpx.Client, name: str, task: dict) -> None:
        cell_id = task["cell"]["id"]
        true_class = truth.truth(cell_id)
        d = decide(
            task,
            true_class,
            error_rate=error_rate,
            difficult_rate=difficult_rate,
            seed=seed,
            taxonomy=taxonomy,
            on_unknown=on_unknown,
        )
        body: dict = {"lease_token": task["lease_token"], "answer": d.answer}
        if d.send_class:
            body["class_code"] = d.class_code
        resp = _request(client, "POST", f"/v1/tasks/{task['task_id']}/submit", json=body)
        if resp.status_code == 409:
            with stats_lock:
                stats.conflicts += 1
            return
        _check(resp)
        out = resp.json()
        coord.submitted()
        with stats_lock:
            stats.reviews += 1
            stats.by_reviewer[name] += 1
            stats.by_kind[task["kind"]] = stats.by_kind.get(task["kind"], 0) + 1
            stats.confirms += d.answer == "confirm"
            stats.corrections += d.answer == "correct"
            stats.difficult += d.answer == "difficult"
            stats.errors_injected += d.error
            stats.unknown_truth += true_class is None
            stats.adjudications += task["kind"] == "adjudication"
            stats.adjudications_created += out["status"] == "adjudication"
            stats.labelled += out["status"] == "labelled"
            stats.answers.append(
                {
                    "task_id": task["task_id"],
                    "cell_id": cell_id,
                    "kind": task["kind"],
                    "reviewer": name,
                    "truth": true_class,
                    "suggested": task.get("suggested_class"),
                    "answer": d.answer,
                    "class_code": d.class_code,
                    "error": d.error,
                    "status": out["status"],
                }
            )
            if progress is not None:
                progress(stats)

    def guarded(name: str, token: str) -> None:
        try:
            work(name, token)
        except BaseException as exc:  # noqa: BLE001 - reported to the caller below
            coord.fail(exc)

    threads = [
        threading.Thread(target=guarded, args=(u, t), name=f"review-sim-{u}", daemon=True)
        for u, t in users
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats.seconds = time.monotonic() - started
    stats.stopped = coord.reason
    stats.answers.sort(key=lambda a: (a["task_id"], a["reviewer"]))
    if coord.error is not None:
        raise coord.error
    return stats


class LabelApiError(RuntimeError):
    pass


def _request(
    client: httpx.Client, method: str, path: str, *, retry_s: float = 60.0, **kw
) -> httpx.Response:
    """One call, retried on connection errors and 5xx for up to ``retry_s`` (backing off
    to 2 s), so reviewers wait out a labeling API that restarts.

    Retrying is safe for both calls the reviewers make: a lease whose answer was lost
    comes back on the next lease (a caller holding a live lease gets it again), and a
    submit that was recorded replays its outcome (the lease token is unique).
    """
    deadline = time.monotonic() + retry_s
    delay = 0.25
    while True:
        try:
            resp = client.request(method, path, **kw)
        except httpx.TransportError:
            if time.monotonic() + delay > deadline:
                raise
        else:
            if resp.status_code < 500 or time.monotonic() + delay > deadline:
                return resp
        time.sleep(delay)
        delay = min(2 * delay, 2.0)


def _check(resp: httpx.Response) -> None:
    if resp.status_code >= 400:
        try:
            detail = resp.json().get("error", resp.text)
        except ValueError:
            detail = resp.text
        raise LabelApiError(
            f"{resp.request.method} {resp.request.url.path}: {resp.status_code} {detail}"
        )

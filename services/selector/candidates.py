"""Run a round's selection: sample the pool, predict, apply the strategy, write tasks.

The rules themselves are the pure functions of ``selection``; this module decides
the order of effects so that a selection is all-or-nothing and happens once per
round. Predictions are made before the write transaction (they are idempotent
rows keyed by cell and model version), and the selection record, its review tasks
and the cells' new status are written in one transaction guarded by the record's
primary key: a second or concurrent call for the same round finds the first's
record and creates nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from bmcell import audit
from bmcell import selection as rules
from bmcell.db import Database
from bmcell.errors import InvalidArgument
from services.selector import store

DEFAULT_SAMPLE_SIZE = 5000
DEFAULT_CST_THRESHOLD = 0.9
DEFAULT_AL_MARGIN = 0.2
MAX_SAMPLE_SIZE = 1_000_000

# (cell ids) -> model version whose predictions are now stored for those cells
Predict = Callable[[list[int]], int]


@dataclass(frozen=True)
class SelectionRequest:
    round_id: int
    strategy: str
    sample_size: int = DEFAULT_SAMPLE_SIZE
    cst_threshold: float = DEFAULT_CST_THRESHOLD
    al_margin: float = DEFAULT_AL_MARGIN
    per_class_cap: int | None = None
    seed: int | None = None
    labs: list[str] = field(default_factory=list)

    def params(self) -> rules.SelectionParams:
        if self.strategy not in rules.ROUND_STRATEGIES:
            raise InvalidArgument(
                f"unknown strategy {self.strategy!r}; expected one of "
                f"{list(rules.ROUND_STRATEGIES)}",
                field="strategy",
            )
        if not 0 < self.sample_size <= MAX_SAMPLE_SIZE:
            raise InvalidArgument(
                f"must be 1..{MAX_SAMPLE_SIZE}, got {self.sample_size}",
                field="parameters.sample_size",
            )
        checks = {
            "parameters.cst_threshold": self.cst_threshold,
            "parameters.al_margin": self.al_margin,
        }
        for name, value in checks.items():
            if not 0.0 < value <= 1.0:
                raise InvalidArgument(f"must be in (0, 1], got {value}", field=name)
        if self.per_class_cap is not None and self.per_class_cap < 1:
            raise InvalidArgument(
                f"must be >= 1 or unset, got {self.per_class_cap}",
                field="parameters.per_class_cap",
            )
        return rules.SelectionParams(
            threshold=self.cst_threshold, margin=self.al_margin, cap=self.per_class_cap
        )

    def effective_seed(self) -> int:
        # Recorded with the selection, so the sample can be redrawn exactly.
        return self.seed if self.seed is not None else 7919 * self.round_id + 17


@dataclass(frozen=True)
class Outcome:
    record: dict
    existing: bool


class CandidateSelector:
    def __init__(self, db: Database, model_name: str, predict: Predict) -> None:
        self.db = db
        self.model_name = model_name
        self.predict = predict

    def select(self, req: SelectionRequest) -> Outcome:
        params = req.params()
        with self.db.connection() as conn:
            round_row = store.get_round(conn, req.round_id)
            if (existing := store.get_selection(conn, req.round_id)) is not None:
                return Outcome(existing, existing=True)
            if unknown := store.unknown_labs(conn, req.labs):
                raise InvalidArgument(f"unknown labs {unknown}", field="parameters.labs")
            store.active_model(conn, self.model_name)  # fail fast, before any work
            pool = store.pool_cell_ids(conn, req.labs)
        seed = req.effective_seed()
        sample = rules.sample_pool(pool, req.sample_size, seed)
        version = self.predict(sample.tolist()) if sample.size else 0
        with self.db.connection() as conn:
            if sample.size:
                P = store.probabilities(conn, sample, self.model_name, version)
                model = conn.execute(
                    "SELECT taxonomy FROM model_versions WHERE model_name = %s AND version = %s",
                    (self.model_name, version),
                ).fetchone()
                codes = [c["code"] for c in model["taxonomy"]["classes"]]
                if req.strategy in rules.EFFICIENCY_STRATEGIES:
                    chosen = rules.select_efficient(req.strategy, P, params)
                else:
                    chosen = rules.select(req.strategy, P, params, seed)
            else:
                codes, chosen = [], None
        tasks, pseudo = _tasks(sample, chosen, codes)
        record = {
            "round_id": req.round_id,
            "strategy": req.strategy,
            "seed": seed,
            "pool_size": int(pool.size),
            "sample_size": int(sample.size),
            "model_version": version,
            "params": {**asdict(req), "seed": seed},
            "counts_by_kind": chosen.counts_by_kind() if chosen else {},
            "counts_by_class": chosen.counts_by_class(codes) if chosen else {},
        }
        with self.db.transaction() as conn:
            # ON CONFLICT waits for a concurrent call's transaction; if it won, its
            # selection stands and this call writes nothing.
            inserted = store.insert_selection(conn, record)
            if inserted:
                store.insert_tasks(conn, req.round_id, tasks)
                store.insert_pseudo_labels(conn, round_row, pseudo)
                audit.record(
                    conn,
                    "selection.create",
                    "round",
                    req.round_id,
                    {k: record[k] for k in ("strategy", "seed", "sample_size", "model_version")}
                    | {"tasks": len(tasks), "pseudo_labels": len(pseudo)},
                )
            saved = store.get_selection(conn, req.round_id)
        return Outcome(saved, existing=not inserted)


def _tasks(
    sample: np.ndarray, chosen: rules.Selection | None, codes: list[str]
) -> tuple[list[dict], list[tuple[int, str]]]:
    if chosen is None:
        return [], []
    tasks = []
    for row in chosen.cst:
        tasks.append(_task(sample, chosen, codes, int(row), "cst"))
    for row in chosen.al:
        tasks.append(_task(sample, chosen, codes, int(row), "al"))
    pseudo = [(int(sample[r]), codes[int(chosen.top_classes[r, 0])]) for r in chosen.st]
    return tasks, pseudo


def _task(sample, chosen, codes, row: int, kind: str) -> dict:
    top = [codes[int(i)] for i in chosen.top_classes[row]]
    return {
        "cell_id": int(sample[row]),
        "kind": kind,
        "suggested_class": top[0] if kind == "cst" else None,
        "top_classes": top,
        "top_probabilities": [float(p) for p in chosen.top_probs[row]],
    }

"""Prometheus series only the labeling API has.

The shared series it also updates live in ``bmcell.metrics``: the review backlog
(read from Postgres at scrape time, so every replica reports the same queue), labels
recorded, and the HTTP request count and latency.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

TASKS_LEASED = Counter(
    "bmcell_labelapi_tasks_leased_total", "Review tasks leased to a reviewer", ["kind"]
)
TASKS_SUBMITTED = Counter(
    "bmcell_labelapi_tasks_submitted_total",
    "Answers recorded, by task kind and answer",
    ["kind", "answer"],
)
TASKS_EXPIRED = Counter(
    "bmcell_labelapi_leases_expired_total",
    "Leases that ran out and were taken over by another lease call",
    ["kind"],
)
TASK_OUTCOMES = Counter(
    "bmcell_labelapi_task_outcomes_total",
    "Finished tasks by outcome (labelled, difficult, adjudication)",
    ["kind", "outcome"],
)
REVIEW_SECONDS = Histogram(
    "bmcell_labelapi_review_seconds",
    "Time from lease to answer",
    ["kind"],
    buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800),
)

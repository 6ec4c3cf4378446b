"""20 reviewers against 2,000 tasks through two labelapi replicas.

The stack's labelapi leases for 300 s; a second replica started here leases for 2 s,
so abandoned and slow leases expire during the run. Checked afterwards: every task
labelled exactly once, no task held by two people at once, every expired lease served
again, nothing lost.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from datetime import datetime

import httpx
import psycopg
import pytest

from bmcell import tls
from tests.conftest import free_port
from tests.integration import test_labelapi as shared
from tests.integration.test_labelapi import Seeder, client

pytestmark = pytest.mark.integration
# The seeding fixtures, shared with the other labelapi tests.
api_url, db, seed, store = shared.api_url, shared.db, shared.seed, shared.store

N_TASKS = 2000
N_REVIEWERS = 20
N_SHORT = 5  # reviewers using the short-lease replica
N_ABANDON = 10
SHORT_LEASE_S = 2
SLOW_EVERY = 40  # a short-lease reviewer dawdles past the lease on every 40th task


@pytest.fixture(scope="module")
def short_lease_api(stack_env: dict[str, str]) -> Iterator[str]:
    port = free_port()
    env = {
        **os.environ,
        **stack_env,
        "BMCELL_HTTP_PORT": str(port),
        "BMCELL_HOST": "127.0.0.1",
        "BMCELL_LEASE_SECONDS": str(SHORT_LEASE_S),
        "BMCELL_LOG_LEVEL": "WARNING",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.labelapi"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    VERIFY = tls.httpx_verify()
    url = f"{tls.http_scheme()}://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=2, verify=VERIFY).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "short-lease labelapi did not start"
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _ts(value: str) -> datetime:
    return datetime.fromisoformat(value)


def test_twenty_reviewers_two_thousand_tasks(
    seed: Seeder, db: psycopg.Connection, api_url: str, short_lease_api: str
) -> None:
    lab_id, code = seed.lab("conc")
    cells = seed.cells(lab_id, N_TASKS)
    rnd = seed.round(number=7)
    seed.tasks(cells[: N_TASKS * 3 // 4], kind="cst", round_id=rnd)
    seed.tasks(cells[N_TASKS * 3 // 4 :], kind="al", round_id=rnd)
    tokens = [seed.user(f"rev{i}", "reviewer", [code])[1] for i in range(N_REVIEWERS)]
    quitters = [seed.user(f"quit{i}", "reviewer", [code])[1] for i in range(N_ABANDON)]

    # Leases that are walked away from, on the short-lease replica.
    abandoned = []
    for token in quitters:
        with client(short_lease_api, token) as c:
            abandoned.append(c.post("/v1/tasks/next").json())
    assert len({t["task_id"] for t in abandoned}) == N_ABANDON

    lock = threading.Lock()
    leases: list[dict] = []  # every lease handed out, by whom
    accepted: list[tuple[int, int, str]] = []  # (task, reviewer, class) of accepted submits
    stale: list[int] = []  # tasks whose submit was refused as stale
    errors: list[str] = []
    for who, t in enumerate(abandoned):
        leases.append(
            {
                "task": t["task_id"],
                "who": -1 - who,
                "start": _ts(t["leased_at"]),
                "end": _ts(t["lease_expires_at"]),
            }
        )

    def review(who: int) -> None:
        url = short_lease_api if who < N_SHORT else api_url
        n = 0
        deadline = time.monotonic() + 300
        with client(url, tokens[who]) as c:
            while time.monotonic() < deadline:
                resp = c.post("/v1/tasks/next")
                if resp.status_code == 204:
                    left = c.get(f"/v1/rounds/current/progress?round_id={rnd}").json()
                    if left["remaining"] == 0:
                        return
                    time.sleep(0.2)
                    continue
                if resp.status_code != 200:
                    with lock:
                        errors.append(f"next: {resp.status_code} {resp.text}")
                    return
                t = resp.json()
                n += 1
                with lock:
                    leases.append(
                        {
                            "task": t["task_id"],
                            "who": who,
                            "start": _ts(t["leased_at"]),
                            "end": _ts(t["lease_expires_at"]),
                        }
                    )
                if who < N_SHORT and n % SLOW_EVERY == 0:
                    time.sleep(SHORT_LEASE_S + 0.5)
                cls = "MB" if t["kind"] == "cst" else ("PMC", "LY", "MO")[t["task_id"] % 3]
                body = {"lease_token": t["lease_token"], "answer": "correct", "class_code": cls}
                if t["kind"] == "cst":
                    body = {"lease_token": t["lease_token"], "answer": "confirm"}
                out = c.post(f"/v1/tasks/{t['task_id']}/submit", json=body)
                with lock:
                    if out.status_code == 200 and not out.json()["replayed"]:
                        accepted.append((t["task_id"], who, out.json()["class_code"]))
                    elif out.status_code == 409:
                        stale.append(t["task_id"])
                    else:
                        errors.append(f"submit {t['task_id']}: {out.status_code} {out.text}")
        with lock:
            errors.append(f"reviewer {who} ran out of time")

    started = time.monotonic()
    threads = [threading.Thread(target=review, args=(i,)) for i in range(N_REVIEWERS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    elapsed = time.monotonic() - started
    print(
        f"\n{N_TASKS} tasks, {N_REVIEWERS} reviewers: {elapsed:.1f}s, "
        f"{len(leases)} leases, {len(stale)} stale submits refused"
    )
    assert not errors, errors[:5]

    # The walked-away leases are stale now: their owners' late answers are refused.
    for token, t in zip(quitters, abandoned, strict=True):
        with client(short_lease_api, token) as c:
            late = c.post(
                f"/v1/tasks/{t['task_id']}/submit",
                json={"lease_token": t["lease_token"], "answer": "confirm"},
            )
        assert late.status_code == 409, late.text

    # Every task labelled exactly once.
    per_task = Counter(task for task, _, _ in accepted)
    assert len(per_task) == N_TASKS and set(per_task.values()) == {1}
    rows = db.execute(
        """SELECT t.id, t.state, l.class_code, l.task_id AS label_task,
                  (SELECT count(*) FROM reviews r WHERE r.task_id = t.id) AS reviews
             FROM review_tasks t LEFT JOIN labels l ON l.cell_id = t.cell_id
            WHERE t.round_id = %s""",
        (rnd,),
    ).fetchall()
    assert len(rows) == N_TASKS
    assert all(
        r["state"] == "done" and r["reviews"] == 1 and r["label_task"] == r["id"] for r in rows
    )
    answered = {task: cls for task, _, cls in accepted}
    assert all(answered[r["id"]] == r["class_code"] for r in rows)
    assert (
        db.execute(
            "SELECT count(*) AS n FROM cells WHERE lab_id = %s AND status <> 'labelled'", (lab_id,)
        ).fetchone()["n"]
        == 0
    )

    # No task held by two people at once: each lease begins after the previous ended.
    by_task: dict[int, list[dict]] = defaultdict(list)
    for lease in leases:
        by_task[lease["task"]].append(lease)
    for task, its in by_task.items():
        its.sort(key=lambda x: x["start"])
        for prev, nxt in zip(its, its[1:], strict=False):
            assert nxt["start"] >= prev["end"], (task, prev, nxt)

    # Expired leases were served again and finished by someone else.
    for t in abandoned:
        assert len(by_task[t["task_id"]]) >= 2 and per_task[t["task_id"]] == 1
    assert stale, "no lease expired under a slow reviewer"
    assert all(per_task[task] == 1 for task in stale)
    expired = [
        ln
        for url in (api_url, short_lease_api)
        for ln in httpx.get(f"{url}/metrics", verify=tls.httpx_verify()).text.splitlines()
        if ln.startswith("bmcell_labelapi_leases_expired_total{")
    ]
    assert sum(float(ln.rsplit(" ", 1)[1]) for ln in expired) >= N_ABANDON

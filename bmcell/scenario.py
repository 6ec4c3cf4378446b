"""A synthetic multi-lab study on a running stack, step by step: what `bmcell demo` and
`bmcell experiment` are made of.

Every step goes through the system's own doors, as a lab would: an admin's token
makes the people (the labeling API's ``/v1/users``); labs upload with `bmcell upload`
(one process per lab, concurrently, with an operator's API token), saying which
specimens are test specimens (``--role test``); rounds are started and followed
through the rounds service (with the same token); reviewers answer through the
labeling API; the truth of a segmented cell is found from the segmenter's ListCells.
Nothing here opens Postgres or object storage.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc

from bmcell import grpc_client, paging
from bmcell.review_sim import (
    CellSource,
    ReviewStats,
    TruthIndex,
    ensure_user,
    issue_token,
    people_client,
    simulate_reviews,
)
from bmcell.synth import Manifest, SpecimenRecord, generate_dataset, load_manifest
from bmcell.training_progress import progress_line
from bmcell.v1 import rounds_pb2, rounds_pb2_grpc, segmenter_pb2, segmenter_pb2_grpc

Say = Callable[[str], None]
# `bmcell upload` processes at once (at least one a lab) and the fields each has in
# flight: enough that the segmenter's workers always have the next field waiting.
UPLOAD_PROCESSES = 4
UPLOAD_JOBS = 2
LIVE = ("created", "predicting", "selecting", "reviewing", "training", "evaluating")


@dataclass(frozen=True)
class Reviewers:
    count: int = 4
    error_rate: float = 0.02
    difficult_rate: float = 0.01
    seed: int = 0
    # Tasks leased per call, as the reviewer page's gallery leases them: one lease
    # call per page instead of per task (bmcell.review_sim.simulate_reviews).
    page_size: int = 8


def synthesize(
    out: Path, labs: int, specimens: int, fields: int, seed: int, size: int, say: Say
) -> Manifest:
    if (out / "manifest.json").exists():
        # Generation is a pure function of its arguments: a run that stopped after
        # synthesising can reuse what it wrote.
        old = load_manifest(out / "manifest.json")
        if (old.seed, old.size, len(old.labs), len(old.specimens)) == (
            seed,
            size,
            labs,
            labs * specimens,
        ) and all(len(s.fields) == fields for s in old.specimens):
            say(f"synthetic specimens already in {out}")
            return old
    say(f"synthesising {labs} labs x {specimens} specimens x {fields} fields ({size}px)")
    started = time.monotonic()
    manifest = generate_dataset(
        out,
        labs=labs,
        specimens=specimens,
        fields=fields,
        seed=seed,
        size=size,
        workers=min(len(os.sched_getaffinity(0)), labs * specimens * fields // 8 + 1),
    )
    n = labs * specimens * fields
    say(f"  {n} fields in {time.monotonic() - started:.1f}s -> {out}")
    return manifest


def person_token(
    labelapi_url: str,
    admin_token: str,
    name: str,
    role: str = "operator",
    labs: list[str] | None = None,
    expires_days: float = 1.0,
) -> str:
    """A fresh token of user ``name``, created with ``role`` if new: what an admin does
    with `bmcell users add NAME --role ROLE` and `bmcell users token NAME`."""
    with people_client(labelapi_url, admin_token) as api:
        ensure_user(api, name, role, labs or [])
        return issue_token(api, name, expires_days)


def segmenter_cells(segmenter_addr: str, token: str) -> CellSource:
    """A specimen's cells as the segmenter's ListCells gives them (page after page)."""

    def cells(lab: str, specimen: str) -> list[dict]:
        with grpc_client.channel(segmenter_addr, default_timeout_s=60, token=token) as ch:
            stub = segmenter_pb2_grpc.SegmenterStub(ch)
            request = segmenter_pb2.ListCellsRequest(lab=lab, specimen=specimen)
            try:
                found = list(paging.follow(stub.ListCells, request, "cells"))
            except grpc.RpcError as err:
                if err.code() == grpc.StatusCode.NOT_FOUND:
                    return []  # not uploaded (yet)
                raise
        return [
            {
                "id": c.cell_id,
                "field_id": c.field_id,
                "field_sha256": c.field_sha256,
                "x0": c.bbox.x0,
                "y0": c.bbox.y0,
                "x1": c.bbox.x1,
                "y1": c.bbox.y1,
            }
            for c in found
        ]

    return cells


def test_specimens(manifest: Manifest, per_lab: int) -> set[tuple[str, str]]:
    """The last ``per_lab`` specimens of each lab: the test set (never trained on)."""
    by_lab: dict[str, list[str]] = {}
    for spec in manifest.specimens:
        by_lab.setdefault(spec.lab, []).append(spec.id)
    return {(lab, s) for lab, specs in by_lab.items() for s in sorted(specs)[-per_lab:] if per_lab}


def upload(
    manifest: Manifest,
    say: Say,
    token: str,
    env: dict[str, str] | None = None,
    *,
    test_per_lab: int = 0,
) -> list[str]:
    """The labs upload their specimens at once, each specimen in its own `bmcell upload`
    process (``UPLOAD_PROCESSES`` at a time, at least one a lab, labs taking turns),
    with ``token`` (passed as BMCELL_TOKEN, so it never shows in a process list). The
    last ``test_per_lab`` specimens of each lab go up with ``--role test``; returns
    their ids."""
    tests = test_specimens(manifest, test_per_lab)
    root = manifest.root
    assert root is not None
    by_lab: dict[str, list] = {}
    for spec in manifest.specimens:
        by_lab.setdefault(spec.lab, []).append(spec)

    total = len(manifest.specimens)
    done = itertools.count(1)

    def upload_specimen(spec: SpecimenRecord) -> None:
        lab = spec.lab
        files = [str(root / f.image) for f in spec.fields]
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "bmcell.cli.main",
                "upload",
                "--lab",
                lab,
                "--specimen",
                spec.id,
                "--diagnosis",
                spec.diagnosis,
                "--role",
                "test" if (lab, spec.id) in tests else "training",
                "--jobs",
                str(UPLOAD_JOBS),
                *files,
            ],
            capture_output=True,
            text=True,
            # COLUMNS: the summary line stays one line in the captured output.
            env={**os.environ, **(env or {}), "BMCELL_TOKEN": token, "COLUMNS": "200"},
        )
        if out.returncode != 0:
            raise RuntimeError(f"upload of {spec.id} failed:\n{out.stderr[-2000:]}")
        summary = out.stderr.strip().splitlines()[-1]
        say(f"  [{next(done)}/{total}] {lab}/{spec.id}: {summary}")

    say(f"{len(by_lab)} labs upload concurrently ({total} specimens)")
    started = time.monotonic()
    # Labs take turns in the queue, so every lab is uploading from the start.
    queue = [
        spec
        for turn in itertools.zip_longest(*(by_lab[lab] for lab in sorted(by_lab)))
        for spec in turn
        if spec is not None
    ]
    with ThreadPoolExecutor(max(len(by_lab), UPLOAD_PROCESSES)) as pool:
        list(pool.map(upload_specimen, queue))
    say(f"  uploaded and segmented in {time.monotonic() - started:.1f}s")
    if tests:
        say(f"test specimens (never used for training): {', '.join(sorted(s for _, s in tests))}")
    return sorted(s for _, s in tests)


def add_stats(a: ReviewStats, b: ReviewStats) -> ReviewStats:
    """Counts of two review sessions together (answers and per-reviewer detail dropped)."""
    return ReviewStats(
        **{
            name: getattr(a, name) + getattr(b, name)
            for name in (
                "reviews",
                "confirms",
                "corrections",
                "difficult",
                "errors_injected",
                "unknown_truth",
                "adjudications",
                "adjudications_created",
                "labelled",
                "conflicts",
                "seconds",
            )
        }
    )


def run_round(
    rounds_addr: str,
    request: rounds_pb2.StartRoundRequest,
    *,
    token: str,
    labelapi_url: str,
    admin_token: str,
    truth: TruthIndex,
    reviewers: Reviewers,
    say: Say,
    poll_s: float = 1.0,
    follow: int = 0,
    stages: dict[str, float] | None = None,
    checkpoint: Callable[[rounds_pb2.Round, ReviewStats], None] | None = None,
) -> tuple[rounds_pb2.Round, ReviewStats]:
    """Start a round, answer its review tasks as they appear, return it when it ends.
    ``token`` is an operator's (starting rounds is theirs, bmcell.policy);
    ``admin_token`` makes the simulated reviewers.

    ``follow``: the id of a round already started (a run that stopped while the round
    was live) to carry on with instead of starting one. ``stages`` gets the seconds
    the round spent in each state, as seen from here (polled every ``poll_s``);
    ``checkpoint`` is called with the round and the review counts so far after the
    start and after every review session, for a caller that must survive a stop.
    """
    stub = rounds_pb2_grpc.RoundsStub(
        grpc_client.channel(rounds_addr, default_timeout_s=60, token=token)
    )
    if follow:
        r = _get_round(stub, follow)
        say(f"round {r.number} ({r.strategy}) followed again: {r.state}")
    else:
        r = stub.StartRound(request)
        say(f"round {r.number} ({r.strategy}) started")
    total = ReviewStats()
    if checkpoint is not None:
        checkpoint(r, total)
    last_state, since = "", time.monotonic()
    last_epoch = (r.training.job_id, r.training.epoch)
    while r.state in LIVE:
        if r.state != last_state:
            now = time.monotonic()
            if last_state and stages is not None:
                stages[last_state] = stages.get(last_state, 0.0) + now - since
            say(f"  round {r.number}: {r.state}")
            last_state, since = r.state, now
        epoch = (r.training.job_id, r.training.epoch)
        if r.training.epoch and epoch != last_epoch:  # one line per epoch seen
            say(f"    {progress_line(r.training)}")
        last_epoch = epoch
        if r.state == "reviewing":
            stats = simulate_reviews(
                labelapi_url,
                admin_token,
                truth,
                reviewers=reviewers.count,
                error_rate=reviewers.error_rate,
                difficult_rate=reviewers.difficult_rate,
                seed=reviewers.seed + r.number,
                stop_when_empty=True,
                labs=list(request.selection.labs) or None,
                page_size=reviewers.page_size,
            )
            total = add_stats(total, stats)
            if checkpoint is not None:
                checkpoint(r, total)
        time.sleep(poll_s)
        r = _get_round(stub, r.round_id)
    if last_state and stages is not None:
        stages[last_state] = stages.get(last_state, 0.0) + time.monotonic() - since
    say(f"  round {r.number}: {r.state} {r.message}")
    return r, total


MAX_BOOTSTRAPS = 3
ROUNDS_OUTAGE_S = 120.0


def _get_round(stub: rounds_pb2_grpc.RoundsStub, round_id: int) -> rounds_pb2.Round:
    """GetRound, waiting out a restart of the rounds service: the round is in Postgres
    and carries on when the service is back, so whoever follows it should too."""
    deadline = time.monotonic() + ROUNDS_OUTAGE_S
    while True:
        try:
            return stub.GetRound(rounds_pb2.GetRoundRequest(round_id=round_id))
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def bootstrap(
    rounds_addr: str,
    request: rounds_pb2.StartRoundRequest,
    *,
    attempts: int = MAX_BOOTSTRAPS,
    say: Say,
    **common,
) -> tuple[rounds_pb2.Round, ReviewStats]:
    """The bootstrap round, repeated as the study's protocol says while the initial
    model misses the gate: reviewers label more initial cells and it trains again (the
    validation split, fixed by the first bootstrap, stays as it is)."""
    request = rounds_pb2.StartRoundRequest.FromString(request.SerializeToString())  # ours to vary
    total = ReviewStats()
    for attempt in range(1, attempts + 1):
        boot, stats = run_round(rounds_addr, request, say=say, **common)
        total = add_stats(total, stats)
        if boot.state == "published" or "gate" not in boot.message:
            break
        if attempt < attempts:
            say(f"bootstrap {attempt} missed the gate: labelling more cells and training again")
            request.selection.seed += 1  # a different wave of random cells
            # One more wave is "more initial cells"; the next model starts from this
            # one's weights. More waves would spend the pool the rounds need.
            request.max_waves = 1
    return boot, total

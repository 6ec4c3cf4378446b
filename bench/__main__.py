"""``make bench``: every bench on one stack, one table at the end, one JSON file a run.

    python -m bench [--quick] [--seconds S] [--rounds N] [--cells N] [--port-base P]
                    [segmenter] [classifier] [trainer]

Starts the stack once (a private run directory, ``--port-base``), measures the
machine's FLOP floor (a 2-thread sgemm) on the spot, runs the benches named (all by
default; the segmenter first, as its uploads make the cells the others use), prints
the table and writes ``bench/results/<UTC time>.json`` (see its README). Arms of a
bench alternate A B A B in this run; compare figures across runs only as ratios.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import math
import subprocess
import sys
import time
import traceback
from pathlib import Path

from bench import harness
from bench.context import BenchStack, Options

# In run order (the segmenter's uploads make the cells the others use). Imported
# only once the BenchStack is made: see its note on pyarrow.
BENCHES = ("segmenter", "classifier", "trainer")
TRAINER_WORKERS = 2
RESULTS = Path(__file__).resolve().parent / "results"
QUICK = {"seconds": 5.0, "rounds": 1, "cells": 128, "fields_per_client": 1}


def parse(argv: list[str]) -> tuple[Options, list[str], bool]:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("benches", nargs="*", metavar="BENCH", help=f"of {', '.join(BENCHES)}")
    ap.add_argument("--quick", action="store_true", help="a smoke run: short arms, A B once")
    ap.add_argument("--seconds", type=float, help="each arm slot at least this long (30)")
    ap.add_argument("--rounds", type=int, help="times each arm runs, alternated (2)")
    ap.add_argument("--cells", type=int, help="cells of the pool and the training set (768)")
    ap.add_argument(
        "--port-base", type=int, default=Options.port_base, help="the private stack's ports (28800)"
    )
    ap.add_argument("--threads", type=int, default=Options.threads, help="in-process threads")
    ap.add_argument("--no-save", action="store_true", help="do not write bench/results/")
    args = ap.parse_args(argv)
    values = dict(QUICK) if args.quick else {}
    for name in ("seconds", "rounds", "cells"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    opts = Options(port_base=args.port_base, threads=args.threads, **values)
    args.benches = [b.removeprefix("bench_") for b in args.benches]  # old module names
    unknown = sorted(set(args.benches) - set(BENCHES))
    if unknown:
        ap.error(f"unknown bench {unknown}; choose from {list(BENCHES)}")
    if opts.seconds <= 0 or opts.rounds < 1 or opts.cells < 2 * TRAINER_WORKERS:
        ap.error("--seconds must be > 0, --rounds >= 1, --cells >= 4")
    chosen = [b for b in BENCHES if b in args.benches] or list(BENCHES)  # segmenter first
    return opts, chosen, not args.no_save


def finite(value: object) -> object:
    """``value`` with NaN and infinities as null: strict JSON, for any reader."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def main(argv: list[str]) -> None:
    opts, names, save = parse(argv)
    started_at = dt.datetime.now(dt.UTC)
    wall = time.perf_counter()
    load_start = harness.loadavg()
    commit = git_commit()  # what is measured: the tree as the run starts
    floor_start = harness.measure_floor(threads=opts.threads)
    print(
        f"FLOP floor: {floor_start / 1e9:.1f} GFLOP/s ({opts.threads}-thread sgemm), load {load_start}"
    )
    results: list[harness.ArmResult] = []
    failed: list[str] = []
    ctx = BenchStack(opts)
    runs = {name: importlib.import_module(f"bench.bench_{name}").run for name in names}
    with ctx.running(), harness.CpuMeter(ctx.cpu_roots) as meter:
        for name in names:
            print(f"== {name} ==", flush=True)
            t0 = time.perf_counter()
            try:
                results.extend(runs[name](ctx, meter))
            except Exception:  # the others still run; the exit status says it failed
                traceback.print_exc()
                failed.append(name)
            print(f"   ({time.perf_counter() - t0:.0f} s)", flush=True)
    load_end = harness.loadavg()
    # Measured again at the end: on a shared machine the load moves, and the floor is
    # what the machine could do during the run, the better of the two.
    floor_end = harness.measure_floor(threads=opts.threads)
    floor = max(floor_start, floor_end)
    print()
    print(harness.table(results, floor))
    print(
        f"floor {floor / 1e9:.1f} GFLOP/s (start {floor_start / 1e9:.1f}, end "
        f"{floor_end / 1e9:.1f}); load average (1, 5, 15 min) {load_start} at the "
        f"start, {load_end} at the end; {time.perf_counter() - wall:.0f} s in all"
    )
    if save:
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / f"{started_at.strftime('%Y%m%dT%H%M%SZ')}.json"
        record = {
            "started_at": started_at.isoformat(),
            "git_commit": commit,
            "options": opts.__dict__,
            "wall_seconds": time.perf_counter() - wall,
            "load_average_start": load_start,
            "load_average_end": load_end,
            "floor_flop_per_s": floor,
            "floor_flop_per_s_start_end": [floor_start, floor_end],
            "floor": f"torch.mm fp32 sgemm, {opts.threads} threads, best of ~3 s at the start "
            "and at the end, the better of the two",
            "failed": failed,
            "arms": [r.to_json(floor) for r in results],
        }
        path.write_text(json.dumps(finite(record), indent=2, allow_nan=False) + "\n")
        print(f"written {path}")
    if failed:
        sys.exit(f"failed: {', '.join(failed)} (tracebacks above)")


if __name__ == "__main__":
    main(sys.argv[1:])

"""Run every ``bench/bench_*.py`` (or those named on the command line) in one process.

Figures printed in one run are comparable with each other; across runs on these
shared machines only ratios are.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import time

import bench


def main(argv: list[str]) -> None:
    names = argv or sorted(
        m.name for m in pkgutil.iter_modules(bench.__path__) if m.name.startswith("bench_")
    )
    for name in names:
        module = importlib.import_module(f"bench.{name.removeprefix('bench.')}")
        print(f"== {name} ==", flush=True)
        started = time.perf_counter()
        module.main()
        print(f"   ({time.perf_counter() - started:.1f}s)", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])

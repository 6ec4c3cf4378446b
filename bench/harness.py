"""The measuring part of ``make bench``: arms alternated in one run, CPU of the whole
stack, the load average, and every figure against the FLOP floor measured on the spot.

An *arm* is one way of doing a bench's work (through the service, or in this
process). Arms of one bench are alternated A B A B within one run, each for at
least ``seconds``, in *passes* (one pool prediction, one batch of uploads, one
training run); the figure is the median items/s over the arm's samples (a pass,
or an epoch where a pass reports per-epoch rates).

CPU-seconds are those of every process of the stack and of this process, with all
their descendants (Postgres backends, Ray workers, Triton's backend stubs): each
process's ``utime + stime`` from ``/proc/<pid>/stat``. A process that ends keeps
what it had used when last seen, so the meter samples the trees every second in a
thread and a figure is a difference of the total around each pass (a process that
lives less than a second between two samples is missed). Only ratios within one
run are comparable on a shared machine; the load average says how shared it was.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

PROC = Path("/proc")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# --- /proc --------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcStat:
    """The fields of ``/proc/<pid>/stat`` the harness uses (times in clock ticks)."""

    pid: int
    comm: str
    state: str
    ppid: int
    utime: int
    stime: int
    cutime: int
    cstime: int
    starttime: int  # with the pid, names one process (pids are reused)

    @property
    def ticks(self) -> int:
        """CPU of the process itself (its children are counted as processes)."""
        return self.utime + self.stime


def parse_stat(text: str) -> ProcStat:
    """One ``/proc/<pid>/stat`` line. The command name is in parentheses and may
    itself hold spaces and parentheses, so the fields after it are found from the
    last ``)``."""
    head, sep, tail = text.rpartition(")")
    if not sep or "(" not in head:
        raise ValueError(f"not a /proc/<pid>/stat line: {text[:80]!r}")
    pid_text, _, comm = head.partition("(")
    rest = tail.split()
    if len(rest) < 20:
        raise ValueError(f"/proc/<pid>/stat line with {len(rest)} fields after the name")
    # rest[0] is field 3 (state) of proc(5); utime..cstime are fields 14..17.
    return ProcStat(
        pid=int(pid_text),
        comm=comm,
        state=rest[0],
        ppid=int(rest[1]),
        utime=int(rest[11]),
        stime=int(rest[12]),
        cutime=int(rest[13]),
        cstime=int(rest[14]),
        starttime=int(rest[19]),
    )


def read_processes(proc: Path = PROC) -> dict[int, ProcStat]:
    """Every process's stat now (processes that end while being read are skipped)."""
    out = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            out[int(entry.name)] = parse_stat((entry / "stat").read_text())
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return out


def tree(processes: dict[int, ProcStat], roots: Iterable[int]) -> set[int]:
    """``roots`` (those alive) and all their descendants, from every process's ppid."""
    children: dict[int, list[int]] = {}
    for p in processes.values():
        children.setdefault(p.ppid, []).append(p.pid)
    found: set[int] = set()
    todo = [r for r in roots if r in processes]
    while todo:
        pid = todo.pop()
        if pid in found:
            continue
        found.add(pid)
        todo.extend(children.get(pid, []))
    return found


def _children(pid: int, proc: Path) -> list[int]:
    out: list[int] = []
    for task in (proc / str(pid) / "task").iterdir():
        out.extend(int(c) for c in (task / "children").read_text().split())
    return out


def tree_stats(roots: Iterable[int], proc: Path = PROC) -> dict[int, ProcStat]:
    """The stat of ``roots`` and of all their descendants. Walks the kernel's
    ``task/*/children`` lists, so only the tree is read (a shared machine has
    thousands of other processes); without them, every process's ppid."""
    task = proc / "self" / "task"
    if not (task.is_dir() and any(task.glob("*/children"))):
        processes = read_processes(proc)
        return {p: processes[p] for p in tree(processes, roots)}
    found: dict[int, ProcStat] = {}
    todo = list(roots)
    while todo:
        pid = todo.pop()
        if pid in found:
            continue
        try:
            found[pid] = parse_stat((proc / str(pid) / "stat").read_text())
            todo.extend(_children(pid, proc))
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue  # ended while being read: what was read of it stands
    return found


def tree_cpu_seconds(roots: Iterable[int], proc: Path = PROC) -> float:
    """CPU-seconds the live processes of the trees have used so far."""
    return sum(s.ticks for s in tree_stats(roots, proc).values()) / CLOCK_TICKS


def loadavg(text: str | None = None) -> tuple[float, float, float]:
    """The 1, 5 and 15 minute load averages (``/proc/loadavg``)."""
    parts = (text if text is not None else (PROC / "loadavg").read_text()).split()
    return float(parts[0]), float(parts[1]), float(parts[2])


# --- arithmetic -----------------------------------------------------------------------


def median(values: Iterable[float]) -> float:
    data = list(values)
    if not data:
        raise ValueError("median of no values")
    return float(statistics.median(data))


def alternation(arms: list[str], rounds: int) -> list[str]:
    """The order arms run in: A B A B ... (``rounds`` times each)."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if len(set(arms)) != len(arms):
        raise ValueError(f"arm names must differ: {arms}")
    return [a for _ in range(rounds) for a in arms]


def floor_fraction(items_per_s: float, flop_per_item: float, floor_flop_per_s: float) -> float:
    """How much of the machine's FLOP floor a rate uses."""
    if floor_flop_per_s <= 0:
        raise ValueError(f"floor must be > 0, got {floor_flop_per_s}")
    return items_per_s * flop_per_item / floor_flop_per_s


def measure_floor(threads: int = 2, n: int = 1024, seconds: float = 3.0) -> float:
    """FLOP/s of an fp32 sgemm (``torch.mm``) on ``threads`` intra-op threads: the best
    of repeated (n x n) @ (n x n) products over about ``seconds``, 2 n^3 FLOP each.
    The best, not the median: the floor is what the machine can do."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a = torch.randn(n, n, dtype=torch.float32)
        b = torch.randn(n, n, dtype=torch.float32)
        torch.mm(a, b)  # first call allocates and warms the kernels
        best = 0.0
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            torch.mm(a, b)
            best = max(best, 2.0 * n**3 / (time.perf_counter() - started))
        return best
    finally:
        torch.set_num_threads(before)


# --- arms -----------------------------------------------------------------------------


@dataclass
class Sample:
    """What one pass did: ``items`` in ``seconds``; ``rates`` replaces the pass's own
    items/s where the work has finer samples (a training run's epochs)."""

    items: int
    seconds: float
    rates: list[float] | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class Arm:
    bench: str
    name: str
    unit: str  # what an item is: "cells", "fields", "samples"
    flop_per_item: float
    run_pass: Callable[[], Sample]
    prepare: Callable[[], None] | None = None  # before each pass, not timed
    note: str = ""


@dataclass
class ArmResult:
    bench: str
    arm: str
    unit: str
    flop_per_item: float
    note: str = ""
    rates: list[float] = field(default_factory=list)
    items: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    load_1m: list[float] = field(default_factory=list)
    passes: list[dict] = field(default_factory=list)
    # Figures of this arm beyond items/s (latency percentiles, epoch wall time).
    figures: dict[str, float] = field(default_factory=dict)

    @property
    def median_rate(self) -> float:
        return median(self.rates) if self.rates else 0.0

    @property
    def cpu_per_item(self) -> float:
        return self.cpu_seconds / self.items if self.items else 0.0

    @property
    def mean_load(self) -> float:
        return sum(self.load_1m) / len(self.load_1m) if self.load_1m else 0.0

    def fraction(self, floor_flop_per_s: float) -> float:
        return floor_fraction(self.median_rate, self.flop_per_item, floor_flop_per_s)

    def to_json(self, floor_flop_per_s: float) -> dict:
        out = asdict(self)
        out.update(
            median_items_per_s=self.median_rate,
            cpu_seconds_per_item=self.cpu_per_item,
            mean_load_1m=self.mean_load,
            fraction_of_floor=self.fraction(floor_flop_per_s),
        )
        return out


class CpuMeter:
    """CPU-seconds used by the process trees under ``roots()`` (asked anew at each
    sample, so a component restarted in between is followed), counting processes
    that have ended with what they had used when last sampled. Sampled by a thread
    every ``interval_s`` while running (``with meter:``) and at every ``now()``."""

    def __init__(
        self, roots: Callable[[], list[int]], interval_s: float = 1.0, proc: Path = PROC
    ) -> None:
        self.roots = roots
        self.interval_s = interval_s
        self.proc = proc
        self._seen: dict[tuple[int, int], int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> None:
        stats = tree_stats(self.roots(), self.proc)
        with self._lock:
            for s in stats.values():
                self._seen[(s.pid, s.starttime)] = s.ticks

    def now(self) -> float:
        """CPU-seconds of every process seen so far, up to this moment."""
        self.sample()
        with self._lock:
            return sum(self._seen.values()) / CLOCK_TICKS

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sample()
            except (OSError, ValueError):  # the state file mid-write, a process mid-exit
                continue

    def __enter__(self) -> CpuMeter:
        self.sample()
        self._thread = threading.Thread(target=self._run, name="cpu-meter", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def run_alternated(
    arms: list[Arm],
    rounds: int,
    seconds: float,
    meter: CpuMeter,
    progress: Callable[[str], None] = print,
) -> list[ArmResult]:
    """Run ``arms`` A B A B, each slot for at least ``seconds`` (one pass at least)."""
    by_name = {a.name: a for a in arms}
    results = {a.name: ArmResult(a.bench, a.name, a.unit, a.flop_per_item, a.note) for a in arms}
    for slot, name in enumerate(alternation([a.name for a in arms], rounds)):
        arm, result = by_name[name], results[name]
        started, first = time.perf_counter(), len(result.rates)
        while True:
            if arm.prepare is not None:
                arm.prepare()
            load_before = loadavg()[0]
            cpu_before = meter.now()
            sample = arm.run_pass()
            cpu = meter.now() - cpu_before
            load_after = loadavg()[0]
            rates = sample.rates or [sample.items / sample.seconds]
            result.rates.extend(rates)
            result.items += sample.items
            result.seconds += sample.seconds
            result.cpu_seconds += cpu
            result.load_1m.extend([load_before, load_after])
            result.passes.append(
                {
                    "slot": slot,
                    "items": sample.items,
                    "seconds": sample.seconds,
                    "cpu_seconds": cpu,
                    "rates": rates,
                    "load_1m": [load_before, load_after],
                    **sample.extra,
                }
            )
            if time.perf_counter() - started >= seconds:
                break
        progress(
            f"  {arm.bench}/{name} (slot {slot + 1}): {median(result.rates[first:]):.2f} "
            f"{arm.unit}/s, load {loadavg()[0]:.2f}"
        )
    return [results[a.name] for a in arms]


# --- the table ------------------------------------------------------------------------


def table(results: list[ArmResult], floor_flop_per_s: float) -> str:
    header = ("bench", "arm", "median items/s", "CPU-s/item", "of floor", "load avg", "also")
    rows = [
        (
            r.bench,
            r.arm,
            f"{r.median_rate:.2f} {r.unit}/s",
            f"{r.cpu_per_item:.4f}",
            f"{r.fraction(floor_flop_per_s):.3f}",
            f"{r.mean_load:.2f}",
            ", ".join(f"{k} {v:.3g}" for k, v in r.figures.items()),
        )
        for r in results
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(line.format(*row) for row in [header, *rows])

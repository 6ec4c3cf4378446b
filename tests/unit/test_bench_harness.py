"""The benchmark harness's pure parts: /proc parsing, process trees, the arithmetic,
the A B A B order and what an alternated run records. No speed is asserted."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench import harness
from bench.harness import Arm, CpuMeter, Sample


def _stat(pid: int, comm: str, ppid: int, utime: int, stime: int, cutime=0, cstime=0) -> str:
    # Fields 3.. of proc(5): state ppid pgrp session tty tpgid flags minflt cminflt
    # majflt cmajflt utime stime cutime cstime priority nice threads itreal starttime ...
    rest = f"S {ppid} 1 1 0 -1 4194560 10 0 0 0 {utime} {stime} {cutime} {cstime} 20 0 1 0 99"
    return f"{pid} ({comm}) {rest} 1000 200 0\n"


def test_parse_stat_reads_the_cpu_fields() -> None:
    s = harness.parse_stat(_stat(42, "python", 7, 150, 25, 30, 5))
    assert (s.pid, s.comm, s.state, s.ppid) == (42, "python", "S", 7)
    assert (s.utime, s.stime, s.cutime, s.cstime, s.starttime) == (150, 25, 30, 5, 99)
    assert s.ticks == 175  # children are processes of the tree, counted on their own


def test_parse_stat_survives_spaces_and_parentheses_in_the_name() -> None:
    s = harness.parse_stat(_stat(9, "ray::Train (worker) 1)", 3, 11, 2))
    assert (s.pid, s.comm, s.ppid, s.utime, s.stime) == (9, "ray::Train (worker) 1)", 3, 11, 2)


@pytest.mark.parametrize("text", ["", "12 no parentheses S 1", "12 (x) S 1 2 3 4 5 6 7 8 9"])
def test_parse_stat_refuses_what_is_not_a_stat_line(text: str) -> None:
    with pytest.raises(ValueError):
        harness.parse_stat(text)


def test_this_process_parses_and_spends_cpu() -> None:
    me = harness.parse_stat(Path(f"/proc/{os.getpid()}/stat").read_text())
    assert me.pid == os.getpid() and me.ppid == os.getppid()
    before = harness.tree_cpu_seconds([os.getpid()])
    sum(i * i for i in range(3_000_000))  # some CPU of our own
    assert harness.tree_cpu_seconds([os.getpid()]) > before


def _fake_proc(tmp_path: Path, lines: dict[int, str], *, children_lists: bool = True) -> Path:
    """A /proc with these stat lines; ``task/<pid>/children`` made from their ppids."""
    kids: dict[int, list[int]] = {}
    for line in lines.values():
        st = harness.parse_stat(line)
        kids.setdefault(st.ppid, []).append(st.pid)
    for pid, line in lines.items():
        (tmp_path / str(pid) / "task" / str(pid)).mkdir(parents=True, exist_ok=True)
        (tmp_path / str(pid) / "stat").write_text(line)
        if children_lists:
            text = " ".join(map(str, kids.get(pid, [])))
            (tmp_path / str(pid) / "task" / str(pid) / "children").write_text(text)
    (tmp_path / "self" / "task" / "1").mkdir(parents=True, exist_ok=True)  # not a pid
    if children_lists:
        (tmp_path / "self" / "task" / "1" / "children").write_text("")
    return tmp_path


STACK = {
    1: _stat(1, "init", 0, 1000, 1000),
    10: _stat(10, "bench", 1, 100, 0),
    11: _stat(11, "postgres", 10, 50, 0),
    12: _stat(12, "postgres: backend", 11, 5, 0),
    20: _stat(20, "raylet", 10, 7, 3, cutime=40),  # reaped children: not counted twice
    30: _stat(30, "someone else", 1, 999, 0),
}


@pytest.mark.parametrize("children_lists", [True, False])
def test_tree_is_the_roots_and_all_descendants_only(tmp_path: Path, children_lists) -> None:
    proc = _fake_proc(tmp_path, STACK, children_lists=children_lists)
    assert set(harness.tree_stats([10], proc)) == {10, 11, 12, 20}
    assert set(harness.tree_stats([11, 99], proc)) == {11, 12}  # a dead root is ignored
    assert harness.tree(harness.read_processes(proc), [20]) == {20}
    ticks = harness.tree_cpu_seconds([10], proc) * harness.CLOCK_TICKS
    assert ticks == pytest.approx(100 + 50 + 5 + 10)


def test_meter_keeps_the_cpu_of_processes_that_ended(tmp_path: Path) -> None:
    proc = _fake_proc(tmp_path, STACK)
    meter = CpuMeter(lambda: [10], proc=proc)
    start = meter.now() * harness.CLOCK_TICKS
    assert start == pytest.approx(165)
    # The backend works 20 ticks, then ends; a new worker is born and works 8.
    (proc / "12" / "stat").write_text(_stat(12, "postgres: backend", 11, 25, 0))
    meter.sample()
    for path in sorted((proc / "12").rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    (proc / "12").rmdir()
    (proc / "11" / "task" / "11" / "children").write_text("")
    (proc / "21" / "task" / "21").mkdir(parents=True)
    (proc / "21" / "task" / "21" / "children").write_text("")
    (proc / "21" / "stat").write_text(_stat(21, "ray::IDLE", 20, 6, 2))
    (proc / "20" / "task" / "20" / "children").write_text("21")
    assert meter.now() * harness.CLOCK_TICKS - start == pytest.approx(20 + 8)


def test_meter_samples_in_a_thread_while_running() -> None:
    meter = CpuMeter(lambda: [os.getpid()], interval_s=0.01)
    with meter:
        before = meter.now()
        sum(i * i for i in range(3_000_000))
    assert meter.now() > before
    assert meter._thread is not None and not meter._thread.is_alive()


def test_loadavg_parses_the_three_averages() -> None:
    assert harness.loadavg("1.50 0.75 2.00 3/120 4567\n") == (1.5, 0.75, 2.0)
    assert len(harness.loadavg()) == 3


def test_median() -> None:
    assert harness.median([3.0, 1.0, 2.0]) == 2.0
    assert harness.median([4.0, 1.0, 2.0, 3.0]) == 2.5
    with pytest.raises(ValueError):
        harness.median([])


def test_alternation_is_a_b_a_b() -> None:
    assert harness.alternation(["a", "b"], 2) == ["a", "b", "a", "b"]
    assert harness.alternation(["a", "b", "c"], 1) == ["a", "b", "c"]
    with pytest.raises(ValueError):
        harness.alternation(["a", "a"], 2)
    with pytest.raises(ValueError):
        harness.alternation(["a", "b"], 0)


def test_floor_fraction() -> None:
    # 500 cells/s at 107 MFLOP a cell on a 151 GFLOP/s machine.
    assert harness.floor_fraction(500, 107e6, 151e9) == pytest.approx(0.3543, abs=1e-4)
    with pytest.raises(ValueError):
        harness.floor_fraction(1, 1, 0)


def test_run_alternated_records_each_arm_in_order() -> None:
    order: list[str] = []
    prepared: list[str] = []

    def arm(name: str, items: int, rates=None) -> Arm:
        def run_pass() -> Sample:
            order.append(name)
            return Sample(items, 0.5, rates=rates, extra={"tag": name})

        return Arm("b", name, "things", 2e9, run_pass, lambda: prepared.append(name))

    cpu = iter(float(i) for i in range(100))
    meter = CpuMeter(lambda: [])
    meter.now = lambda: next(cpu)  # each pass: one CPU-second between its two readings
    a, b = harness.run_alternated(
        [arm("a", 10), arm("b", 4, rates=[6.0, 8.0, 100.0])], 2, 0.0, meter, lambda _m: None
    )
    assert order == ["a", "b", "a", "b"] and prepared == order
    assert (a.items, a.seconds, a.cpu_seconds, a.rates) == (20, 1.0, 2.0, [20.0, 20.0])
    assert a.cpu_per_item == pytest.approx(0.1)
    assert a.fraction(10e9) == pytest.approx(20.0 * 2e9 / 10e9)
    assert b.median_rate == 8.0 and b.items == 8
    assert [p["slot"] for p in b.passes] == [1, 3] and b.passes[0]["tag"] == "b"
    assert len(a.load_1m) == 4
    row = b.to_json(10e9)
    assert row["median_items_per_s"] == 8.0 and row["cpu_seconds_per_item"] == 0.25
    text = harness.table([a, b], 10e9)
    assert text.splitlines()[0].split()[:2] == ["bench", "arm"] and "8.00 things/s" in text

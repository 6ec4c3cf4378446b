"""The server-side deadline for client streams (bmcell.streams.paced), with real threads."""

from __future__ import annotations

import threading
import time

import pytest

from bmcell.errors import DeadlineExceeded
from bmcell.streams import paced


def _trickle(parts: list[bytes], gap_s: float, released: threading.Event | None = None):
    for part in parts:
        yield part
        if released is not None and released.wait(gap_s):
            return
        if released is None:
            time.sleep(gap_s)


def test_a_prompt_stream_passes_through_whole() -> None:
    parts = [b"a" * 100, b"b" * 100, b"c"]
    got = list(paced(iter(parts), idle_timeout_s=5, min_bytes_per_s=10, size=len))
    assert got == parts


def test_an_idle_stream_is_refused_naming_the_setting() -> None:
    release = threading.Event()
    stream = paced(
        _trickle([b"x" * 10, b"y"], 30, release), idle_timeout_s=0.5, min_bytes_per_s=0, size=len
    )
    assert next(stream) == b"x" * 10
    with pytest.raises(DeadlineExceeded, match="nothing for 0.5 s.*BMCELL_UPLOAD_IDLE_TIMEOUT_S"):
        next(stream)
    release.set()


def test_a_stream_below_the_rate_floor_is_refused() -> None:
    # Never idle for long (a byte every 0.1 s) but ~10 B/s against a floor of 1000 B/s.
    stream = paced(_trickle([b"z"] * 100, 0.1), idle_timeout_s=0.5, min_bytes_per_s=1000, size=len)
    with pytest.raises(DeadlineExceeded, match="too slow.*BMCELL_UPLOAD_MIN_BYTES_PER_S"):
        for _ in stream:
            pass


def test_the_streams_own_error_reaches_the_consumer() -> None:
    def broken():
        yield b"ok"
        raise ValueError("client went away")

    stream = paced(broken(), idle_timeout_s=5, min_bytes_per_s=0, size=len)
    assert next(stream) == b"ok"
    with pytest.raises(ValueError, match="client went away"):
        next(stream)


def test_closing_early_stops_the_reader_thread() -> None:
    release = threading.Event()
    before = set(threading.enumerate())
    stream = paced(
        _trickle([b"a"] * 1000, 0.0, release), idle_timeout_s=5, min_bytes_per_s=0, size=len
    )
    assert next(stream) == b"a"
    started = set(threading.enumerate()) - before
    assert [t.name for t in started] == ["stream-reader"]
    stream.close()  # the consumer gave up (a refusal): the reader must not spin for ever
    release.set()
    deadline = time.monotonic() + 5
    while any(t.is_alive() for t in started) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(t.is_alive() for t in started)

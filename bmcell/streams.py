"""A server-side deadline for a client's stream: idle too long or too slow is cancelled.

A gRPC request iterator blocks its handler thread until the client sends the next
message, so a client that opens an upload and then trickles (or sends nothing) holds
a worker thread for ever. :func:`paced` reads the stream on a helper thread and
hands messages over through a small queue; the handler waits at most
``idle_timeout_s`` for each one and, once ``idle_timeout_s`` has passed since the
start, requires an average of ``min_bytes_per_s``. Either refusal is
:class:`~bmcell.errors.DeadlineExceeded` naming the setting. When the handler
returns, gRPC ends the call and the helper's blocked read ends with it.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from bmcell.errors import DeadlineExceeded

T = TypeVar("T")
_END = object()
_TICK_S = 0.25


def paced(
    items: Iterator[T],
    *,
    idle_timeout_s: float,
    min_bytes_per_s: int,
    size: Callable[[T], int],
    field: str = "chunk",
    idle_setting: str = "BMCELL_UPLOAD_IDLE_TIMEOUT_S",
    rate_setting: str = "BMCELL_UPLOAD_MIN_BYTES_PER_S",
) -> Iterator[T]:
    """``items`` as they come, refused once idle or on average slower than the floor."""
    handoff: queue.Queue = queue.Queue(maxsize=4)
    stop = threading.Event()

    def pass_on(entry: object) -> bool:
        while not stop.is_set():
            try:
                handoff.put(entry, timeout=_TICK_S)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:
        try:
            for item in items:
                if not pass_on(("item", item)):
                    return
        except BaseException as exc:  # the stream's own error goes to the handler
            pass_on(("error", exc))
            return
        pass_on(("end", _END))

    reader = threading.Thread(target=read, name="stream-reader", daemon=True)
    started = last = time.monotonic()
    received = 0
    reader.start()
    try:
        while True:
            try:
                kind, value = handoff.get(timeout=_TICK_S)
            except queue.Empty:
                now = time.monotonic()
                if now - last > idle_timeout_s:
                    raise DeadlineExceeded(
                        f"the stream sent nothing for {idle_timeout_s:g} s ({idle_setting})",
                        field=field,
                    ) from None
                _check_rate(
                    received, now - started, idle_timeout_s, min_bytes_per_s, field, rate_setting
                )
                continue
            if kind == "end":
                return
            if kind == "error":
                raise value
            last = time.monotonic()
            received += size(value)
            yield value
            _check_rate(
                received,
                time.monotonic() - started,
                idle_timeout_s,
                min_bytes_per_s,
                field,
                rate_setting,
            )
    finally:
        stop.set()


def _check_rate(
    received: int, elapsed: float, grace_s: float, floor: int, field: str, setting: str
) -> None:
    if floor <= 0 or elapsed <= grace_s:
        return
    if received / elapsed < floor:
        raise DeadlineExceeded(
            f"the stream is too slow: {received} bytes in {elapsed:.0f} s, below the floor of "
            f"{floor} bytes/s ({setting})",
            field=field,
        )

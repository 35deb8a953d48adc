"""Throttled progress reporting from the copy loop (MigrateKit OSSEA's cadence)."""

from __future__ import annotations

import time
from collections import namedtuple
from collections.abc import Callable


class CopyProgress(namedtuple("CopyProgress", "bytes_done bytes_total elapsed_s")):
    """One progress sample of a copy: bytes done of bytes_total, seconds since it began."""

    __slots__ = ()

    @property
    def percent(self) -> float:
        if self.bytes_total <= 0:
            return 100.0
        return min(100.0, 100.0 * self.bytes_done / self.bytes_total)

    @property
    def throughput_bps(self) -> int:
        return int(self.bytes_done / self.elapsed_s) if self.elapsed_s > 0 else 0


ProgressCallback = Callable[[CopyProgress], None]


class ThrottledReporter:
    """Calls `callback` at most every `interval_s` seconds or every
    `step_percent` of the total, whichever comes first, and always for the
    final state. An exception from the callback (a cancel) propagates."""

    def __init__(self, callback: ProgressCallback | None, bytes_total: int,
                 interval_s: float = 2.0, step_percent: float = 1.0):
        self.callback = callback
        self.bytes_total = bytes_total
        self.interval_s = interval_s
        self.step_bytes = max(1, int(bytes_total * step_percent / 100))
        self.started = time.monotonic()
        self.last_time = self.started
        self.last_bytes = 0

    def update(self, bytes_done: int, final: bool = False) -> None:
        if self.callback is None:
            return
        now = time.monotonic()
        due = (now - self.last_time >= self.interval_s
               or bytes_done - self.last_bytes >= self.step_bytes)
        if not (due or final):
            return
        self.last_time, self.last_bytes = now, bytes_done
        self.callback(CopyProgress(bytes_done, self.bytes_total, now - self.started))

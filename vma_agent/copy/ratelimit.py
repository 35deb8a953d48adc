"""A copy's bandwidth limit, shared by its connections and changeable while
the copy runs."""

from __future__ import annotations

import threading
import time

TICK_S = 0.1
# How late a read may take its time slot and keep it. The copy loop takes a
# slot a millisecond or so after it comes; starting each next slot from that
# moment lost the lateness every time: a tenth of the rate at 60 MiB/s
# (512 KiB slots of 8 ms), measured 53-55 MiB/s. A pause longer than this is
# not made up: at most this long's worth of reads comes at once after idling.
CATCH_UP_S = 0.05


class RateLimit:
    """A bandwidth limit shared by the copy's connections, changeable while a
    copy runs (`set`). Each read takes its own time slot on a shared schedule,
    so N bytes take at least N / rate seconds and idle time never turns into
    a burst."""

    def __init__(self, bytes_per_s: float | None = None, *, clock=time.monotonic, sleep=time.sleep):
        self._lock = threading.Lock()
        self._rate = bytes_per_s if bytes_per_s and bytes_per_s > 0 else None
        self._clock, self._sleep = clock, sleep  # injectable: the tests drive a clock of their own
        self._next = clock()

    @property
    def bytes_per_s(self) -> float | None:
        return self._rate

    def set(self, bytes_per_s: float | None) -> None:
        """A new rate, from now on (None or 0: no limit)."""
        with self._lock:
            self._rate = bytes_per_s if bytes_per_s and bytes_per_s > 0 else None
            self._next = self._clock()

    def reserve(self, nbytes: int) -> float:
        """Take the next slot for nbytes; returns the clock time at which
        they may be read (now or earlier: at once)."""
        if self._rate is None:
            return 0.0  # no limit: at once, without the lock or the clock (once per request)
        with self._lock:
            now = self._clock()
            if not self._rate:
                return now
            self._next = max(now - CATCH_UP_S, self._next) + nbytes / self._rate
            return self._next

    def wait_time(self, slot_end: float) -> float:
        return max(0.0, slot_end - self._clock())

    def acquire(self, nbytes: int, cancel: threading.Event) -> bool:
        """Wait until nbytes may be read; False if `cancel` was set meanwhile."""
        slot_end = self.reserve(nbytes)
        # Wait in small steps so a cancel is seen promptly.
        while (delay := self.wait_time(slot_end)) > 0 and not cancel.is_set():
            self._sleep(min(delay, TICK_S))
        return not cancel.is_set()

"""A one-slot mailbox and the thread that empties it: how the agent sends
what only matters in its newest version (a copy's progress to the progress
API, its task state to Flower) without ever making the sender wait.

offer() never blocks: it replaces whatever still waits. The thread hands
each item to `deliver`; one that raises one of `retry_on` is offered again
after a backoff, unless a newer one came meanwhile. Free of Django."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class Mailbox:
    """The newest item, delivered from a thread started by the first offer."""

    def __init__(self, deliver: Callable[[object], None], *, name: str, what: str = "update",
                 retry_on: tuple[type[BaseException], ...] = (), backoff_s: float = 0.5, max_backoff_s: float = 10.0,
                 linger_s: float = 60.0):
        self._deliver = deliver
        self.name = name
        self.what = what
        self.retry_on = retry_on
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.linger_s = linger_s
        self._slot: object | None = None
        self._busy = False
        self._failing = False  # the last attempt failed: the receiver is down or refusing us
        self._stopping = False
        self._give_up_at = float("inf")
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self.failures = self.superseded = 0

    def offer(self, item: object) -> None:
        with self._cond:
            if self._slot is not None:
                self.superseded += 1
            self._slot = item
            self._cond.notify_all()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()

    def close(self, timeout_s: float = 2.0) -> bool:
        """No more items. What is still waiting goes out from the thread,
        retried for up to `linger_s`, whether or not the caller waits. The
        caller waits up to `timeout_s` for it, but no longer than the
        receiver works: once an attempt failed, waiting would only delay
        the caller's next step. Returns whether everything was delivered."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._stopping = True
            self._give_up_at = time.monotonic() + self.linger_s
            self._cond.notify_all()
            while (self._slot is not None or self._busy) and not self._failing:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            return self._slot is None and not self._busy

    def _run(self) -> None:
        delay = self.backoff_s
        while True:
            with self._cond:
                while self._slot is None and not self._stopping:
                    self._cond.wait()
                if self._slot is None:
                    return
                item, self._slot, self._busy = self._slot, None, True
            try:
                self._deliver(item)
            except self.retry_on as exc:
                self.failures += 1
                if not self._back_off(item, delay, exc):
                    return
                delay = min(self.max_backoff_s, delay * 2)
                continue
            delay = self.backoff_s
            with self._cond:
                self._busy = self._failing = False
                self._cond.notify_all()

    def _back_off(self, item: object, delay: float, exc: BaseException) -> bool:
        """Keep the failed item unless a newer one came, and wait `delay`;
        False once a closed mailbox has lingered long enough."""
        with self._cond:
            if self._slot is None:
                self._slot = item
            self._busy = False
            self._failing = True
            self._cond.notify_all()
            retry_at = time.monotonic() + delay
            if self._stopping and retry_at > self._give_up_at:
                log.warning("%s dropped: not delivered %.0f s after its sender closed: %s", self.what,
                            self.linger_s, exc)
                self._slot = None
                return False
            log.warning("%s not delivered (retry in %.1f s): %s", self.what, delay, exc)
            # Newer offers and close() do not cut the backoff short.
            while (remaining := retry_at - time.monotonic()) > 0:
                self._cond.wait(remaining)
        return True

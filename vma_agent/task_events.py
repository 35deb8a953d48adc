"""Copy progress as Celery task state and events, so Flower shows it.

update_state(PROGRESS) alone leaves Flower at STARTED (it reads events, not
the result backend), so a custom "task-progress" event goes out too. Both
are monitoring only: they are published from a thread with a one-slot
mailbox like the agent's reporter, so a slow broker never slows the copy,
and a failure to publish never touches it."""

from __future__ import annotations

import logging
import threading
import time

from vma_agent.progress import CopyProgress

log = logging.getLogger(__name__)


class TaskProgressPublisher:
    def __init__(self, task, disk_id: str, interval_s: float = 2.0):
        self.task = task
        # Celery's request is thread-local: take what the events need now.
        self.task_id = task.request.id
        self.hostname = task.request.hostname
        self.disk_id = disk_id
        self.interval_s = interval_s
        self.last = 0.0
        self.published = 0
        self._slot: dict | None = None
        self._closed = False
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def __call__(self, progress: CopyProgress) -> None:
        now = time.monotonic()
        final = progress.bytes_done >= progress.bytes_total
        if not final and now - self.last < self.interval_s:
            return
        self.last = now
        meta = {"current": progress.bytes_done, "total": progress.bytes_total,
                "percent": round(progress.percent, 2), "disk_id": self.disk_id}
        with self._cond:
            self._slot = meta
            self._cond.notify_all()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"task-events-{self.disk_id}", daemon=True)
                self._thread.start()

    def close(self, timeout_s: float = 2.0) -> None:
        """Let the last state go out (bounded), then stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._slot is None and not self._closed:
                    self._cond.wait()
                if self._slot is None:
                    return
                meta, self._slot = self._slot, None
            try:
                self.task.update_state(task_id=self.task_id, state="PROGRESS", meta=meta)
                with self.task.app.events.default_dispatcher(hostname=self.hostname) as dispatcher:
                    dispatcher.send("task-progress", uuid=self.task_id, **meta)
                self.published += 1
            except Exception as exc:
                log.debug("task progress event not sent: %s", exc)

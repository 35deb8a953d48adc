"""Copy progress as Celery task state and events, so Flower shows it.

update_state(PROGRESS) alone leaves Flower at STARTED (it reads events, not
the result backend), so a custom "task-progress" event goes out too. Both
are monitoring only: they are published through a one-slot mailbox
(vma_agent.mailbox) like the agent's reporter, so a slow broker never slows
the copy, and a failure to publish never touches it."""

from __future__ import annotations

import logging
import time

from vma_agent.mailbox import Mailbox
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
        self._mailbox = Mailbox(self._publish, name=f"task-events-{disk_id}", what="task progress event")

    def __call__(self, progress: CopyProgress) -> None:
        now = time.monotonic()
        final = progress.bytes_done >= progress.bytes_total
        if not final and now - self.last < self.interval_s:
            return
        self.last = now
        self._mailbox.offer({"current": progress.bytes_done, "total": progress.bytes_total,
                             "percent": round(progress.percent, 2), "disk_id": self.disk_id})

    def close(self, timeout_s: float = 2.0) -> None:
        """Let the last state go out (bounded), then stop the thread."""
        self._mailbox.close(timeout_s)

    def _publish(self, meta: dict) -> None:
        try:
            self.task.update_state(task_id=self.task_id, state="PROGRESS", meta=meta)
            with self.task.app.events.default_dispatcher(hostname=self.hostname) as dispatcher:
                dispatcher.send("task-progress", uuid=self.task_id, **meta)
            self.published += 1
        except Exception as exc:
            log.debug("task progress event not sent: %s", exc)

"""Copy progress as Celery task state and events, so Flower shows it.

update_state(PROGRESS) alone leaves Flower at STARTED (it reads events, not
the result backend), so a custom "task-progress" event goes out too. Both are
monitoring only: a failure to publish never touches the copy."""

from __future__ import annotations

import logging
import time

from vma_agent.progress import CopyProgress

log = logging.getLogger(__name__)


class TaskProgressPublisher:
    def __init__(self, task, disk_id: int, interval_s: float = 2.0):
        self.task = task
        self.disk_id = disk_id
        self.interval_s = interval_s
        self.last = 0.0
        self.published = 0

    def __call__(self, progress: CopyProgress) -> None:
        now = time.monotonic()
        final = progress.bytes_done >= progress.bytes_total
        if not final and now - self.last < self.interval_s:
            return
        self.last = now
        meta = {"current": progress.bytes_done, "total": progress.bytes_total,
                "percent": round(progress.percent, 2), "disk_id": self.disk_id}
        try:
            self.task.update_state(state="PROGRESS", meta=meta)
            self.task.send_event("task-progress", **meta)
            self.published += 1
        except Exception as exc:
            log.debug("task progress event not sent: %s", exc)

"""Progress from the copy loop to the VMA progress API, off the data path.

The copy loop only drops the newest update into a one-slot mailbox
(vma_agent.mailbox); a background thread posts it. A slow or failing POST therefore never slows or
fails a copy: while it is retried (with backoff) newer updates replace the
waiting one, and only the latest state is ever sent. Free of Django."""

from __future__ import annotations

import logging
import time
from collections import deque

from vma_agent import contract
from vma_agent.client import ProgressClient, ProgressUnavailable
from vma_agent.mailbox import Mailbox
from vma_agent.progress import CopyProgress

log = logging.getLogger(__name__)


class LatestUpdateSender(Mailbox):
    """Posts the newest update of one stream (one disk, or a job's stages)
    from a thread; offer() never blocks on the network. An API that cannot
    be reached is retried with backoff; an update it refuses (4xx) is dropped."""

    def __init__(self, client: ProgressClient, record_id: str, *, backoff_s: float = 0.5,
                 max_backoff_s: float = 10.0, linger_s: float = 60.0, name: str = "progress-sender"):
        super().__init__(self._post, name=name, what=f"progress update for {record_id}",
                         retry_on=(ProgressUnavailable,), backoff_s=backoff_s, max_backoff_s=max_backoff_s,
                         linger_s=linger_s)
        self.client = client
        self.record_id = record_id
        self.sent = self.refused = 0
        self.last_sent: dict | None = None

    def _post(self, body: dict) -> None:
        try:
            self.client.post_update(self.record_id, body)
        except ValueError as exc:
            self.refused += 1
            log.error("progress update for %s refused: %s", self.record_id, exc)
            return
        self.sent += 1
        self.last_sent = body


class SequenceNumbers:
    """Per-stream sequence numbers that stay increasing across processes and
    restarts of a copy (microseconds of wall time, never repeating)."""

    def __init__(self):
        self.last = 0

    def next(self) -> int:
        self.last = max(self.last + 1, time.time_ns() // 1000)
        return self.last


class MovingRate:
    """Throughput over the last `window_s` seconds of samples."""

    def __init__(self, window_s: float = 10.0):
        self.window_s = window_s
        self.samples: deque[tuple[float, int]] = deque()

    def add(self, elapsed_s: float, bytes_done: int) -> int:
        self.samples.append((elapsed_s, bytes_done))
        while len(self.samples) > 2 and elapsed_s - self.samples[1][0] >= self.window_s:
            self.samples.popleft()
        (t0, b0), (t1, b1) = self.samples[0], self.samples[-1]
        if t1 - t0 <= 0:
            return int(bytes_done / elapsed_s) if elapsed_s > 0 else 0
        return max(0, int((b1 - b0) / (t1 - t0)))


class DiskReporter:
    """Reports one disk's copy: stage updates, then the copy loop's progress
    (call it with CopyProgress), then the final status."""

    def __init__(self, client: ProgressClient, job_id: str, disk_id: str, *, export_name: str | None = None,
                 sync_type: str | None = None, window_s: float = 10.0, attempt: int | None = None,
                 worker: str | None = None):
        self.job_id = job_id
        self.disk_id = disk_id
        self.export_name = export_name
        self.sync_type = sync_type
        self.attempt = attempt
        self.worker = worker
        self.checkpoint_bytes = 0
        self.seq = SequenceNumbers()
        self.rate = MovingRate(window_s)
        self.last: CopyProgress | None = None
        self.last_stage = contract.INITIALIZING
        self.sender = LatestUpdateSender(client, job_id, name=f"progress-{disk_id}")

    def _body(self, stage: str, status: str, **fields) -> dict:
        body = {"stage": stage, "status": status, "seq": self.seq.next(), "disk_id": self.disk_id,
                "job_id": self.job_id, **fields}
        if self.export_name:
            body["export_name"] = self.export_name
        if self.sync_type:
            body["sync_type"] = self.sync_type
        if self.attempt is not None:
            body.update(attempt=self.attempt, checkpoint_bytes=self.checkpoint_bytes)
        if self.worker:
            body["worker"] = self.worker
        return body

    def stage(self, stage: str) -> None:
        self.last_stage = stage
        self.sender.offer(self._body(stage, "in_progress"))

    def checkpoint(self, cursor: int) -> None:
        """The engine's committed cursor: goes out with the next update."""
        self.checkpoint_bytes = max(self.checkpoint_bytes, cursor)

    def beat(self) -> None:
        """The latest state again, under a new sequence number: the OMA's
        sign that this copy is alive while nothing else moves."""
        if self.last is not None:
            self(self.last)
        else:
            self.stage(self.last_stage)

    def __call__(self, progress: CopyProgress) -> None:
        self.last = progress
        self.last_stage = contract.TRANSFER
        rate = self.rate.add(progress.elapsed_s, progress.bytes_done)
        remaining = max(0, progress.bytes_total - progress.bytes_done)
        fields = {"bytes_transferred": progress.bytes_done, "total_bytes": progress.bytes_total,
                  "percent": round(progress.percent, 4), "throughput_bps": rate}
        if rate > 0:
            fields["eta_seconds"] = int(remaining / rate)
        self.sender.offer(self._body(contract.TRANSFER, "in_progress", **fields))

    def finish(self, status: str, *, bytes_total: int | None = None, throughput_bps: int = 0,
               error_message: str = "") -> None:
        stage = {"completed": contract.COMPLETED, "failed": contract.FAILED, "cancelled": contract.CANCELLED}[status]
        fields: dict = {"throughput_bps": throughput_bps}
        if status == "completed":
            total = bytes_total if bytes_total is not None else (self.last.bytes_total if self.last else 0)
            fields.update(bytes_transferred=total, total_bytes=total, percent=100.0, eta_seconds=0)
        elif self.last is not None:
            fields.update(bytes_transferred=self.last.bytes_done, total_bytes=self.last.bytes_total,
                          percent=round(self.last.percent, 4))
        if error_message:
            fields["error_message"] = error_message[:4000]
        self.sender.offer(self._body(stage, status, **fields))

    def close(self, timeout_s: float = 2.0) -> bool:
        return self.sender.close(timeout_s)


class JobStageReporter:
    """Job-level stage updates (the workflow's steps before the copies)."""

    def __init__(self, client: ProgressClient, job_id: str, sync_type: str | None = None):
        self.job_id = job_id
        self.sync_type = sync_type
        self.seq = SequenceNumbers()
        self.sender = LatestUpdateSender(client, job_id, name=f"progress-{job_id}")

    def stage(self, stage: str, percent: float, status: str = "in_progress", error_message: str = "") -> None:
        body = {"stage": stage, "status": status, "seq": self.seq.next(), "job_id": self.job_id,
                "percent": float(percent)}
        if self.sync_type:
            body["sync_type"] = self.sync_type
        if error_message:
            body["error_message"] = error_message[:4000]
        self.sender.offer(body)

    def close(self, timeout_s: float = 2.0) -> bool:
        return self.sender.close(timeout_s)

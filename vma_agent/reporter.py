"""Progress from the copy loop to the VMA progress API, off the data path.

The copy loop only drops the newest update into a one-slot mailbox; a
background thread posts it. A slow or failing POST therefore never slows or
fails a copy: while it is retried (with backoff) newer updates replace the
waiting one, and only the latest state is ever sent. Free of Django."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

import requests

from vma_agent.progress import CopyProgress

log = logging.getLogger(__name__)


class ProgressUnavailable(Exception):
    """The progress API could not be asked (network error, 5xx, bad answer)."""


class ProgressClient:
    """HTTP client of the VMA progress API."""

    def __init__(self, base_url: str, token: str | None, timeout_s: float = 5.0, keep_alive: bool = True):
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.keep_alive = keep_alive
        self.session = requests.Session()
        if token:  # none: only an agent on this host's loopback that trusts it answers
            self.session.headers["Authorization"] = f"Bearer {token}"

    def _request(self, method: str, url: str, **kwargs) -> requests.Response:
        try:
            return self.session.request(method, url, timeout=self.timeout_s, **kwargs)
        finally:
            if not self.keep_alive:
                # A fresh connection per request: a server that writes headers
                # and body separately (Django's runserver) otherwise costs a
                # 40 ms Nagle/delayed-ACK stall on every reused connection.
                self.session.close()

    def post_update(self, record_id: str, body: dict) -> dict:
        """Post one update; raises ProgressUnavailable on anything worth a
        retry and ValueError on a refusal (4xx), which a retry cannot fix."""
        try:
            response = self._request("POST", f"{self.base_url}/api/v1/progress/{record_id}/update", json=body)
        except requests.RequestException as exc:
            raise ProgressUnavailable(str(exc)) from exc
        if response.status_code >= 500 or response.status_code in (401, 408, 429):
            # 401 too: the token may be fixed on the agent while the copy runs.
            raise ProgressUnavailable(f"HTTP {response.status_code}: {response.text[:200]}")
        if response.status_code >= 400:
            raise ValueError(f"HTTP {response.status_code}: {response.text[:300]}")
        return response.json()

    def stop(self, job_id: str, reason: str) -> None:
        """Ask the agent to stop a job's copies; raises on any failure."""
        response = self._request("POST", f"{self.base_url}/api/v1/jobs/{job_id}/stop", json={"reason": reason})
        if response.status_code != 200:
            raise ProgressUnavailable(f"HTTP {response.status_code}: {response.text[:200]}")

    def set_limit(self, job_id: str, bytes_per_s: int | None) -> dict:
        """Change a job's bandwidth limit on the agent; returns the agent's
        view of it (see the agent API's /jobs/{id}/limit); raises on any failure."""
        return self._limit("POST", job_id, json={"bytes_per_s": bytes_per_s})

    def job_limit(self, job_id: str) -> dict:
        return self._limit("GET", job_id)

    def _limit(self, method: str, job_id: str, **kwargs) -> dict:
        try:
            response = self._request(method, f"{self.base_url}/api/v1/jobs/{job_id}/limit", **kwargs)
        except requests.RequestException as exc:
            raise ProgressUnavailable(str(exc)) from exc
        if response.status_code != 200:
            raise ProgressUnavailable(f"HTTP {response.status_code}: {response.text[:200]}")
        return response.json()

    def get(self, record_id: str) -> dict | None:
        """The record for a job id or export name; None when there is none (404)."""
        try:
            response = self._request("GET", f"{self.base_url}/api/v1/progress/{record_id}")
        except requests.RequestException as exc:
            raise ProgressUnavailable(str(exc)) from exc
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise ProgressUnavailable(f"HTTP {response.status_code}: {response.text[:200]}")
        try:
            return response.json()
        except ValueError as exc:
            raise ProgressUnavailable(f"answer is not JSON: {exc}") from exc

    def changes_page(self, since: int, limit: int | None = None) -> dict:
        """One page of the change feed, as the API answers it: epoch, cursor,
        more, records (changed after `since`), expired."""
        params = {"since": since} | ({"limit": limit} if limit else {})
        try:
            response = self._request("GET", f"{self.base_url}/api/v1/progress", params=params)
        except requests.RequestException as exc:
            raise ProgressUnavailable(str(exc)) from exc
        if response.status_code != 200:
            raise ProgressUnavailable(f"HTTP {response.status_code}: {response.text[:200]}")
        try:
            page = response.json()
            page["cursor"] = int(page["cursor"])
            if not isinstance(page["records"], list):
                raise TypeError("records is not a list")
        except (ValueError, KeyError, TypeError) as exc:
            raise ProgressUnavailable(f"not a change feed answer: {exc!r}") from exc
        return page

    def changes(self, since: int) -> tuple[list[dict], int]:
        """Every record changed after cursor `since` (0: every live record)
        and the cursor to ask from next time; follows the pages. Does not
        notice a store emptied meanwhile: for that, read changes_page's epoch."""
        records: dict[str, dict] = {}
        while True:
            page = self.changes_page(since)
            for record in page["records"]:
                records.pop(record["id"], None)  # changed again while paging: its latest, in change order
                records[record["id"]] = record
            since = page["cursor"]
            if not page.get("more"):
                return list(records.values()), since


class LatestUpdateSender:
    """A thread posting the newest update of one stream (one disk, or a job's
    stages). offer() never blocks on the network."""

    def __init__(self, client: ProgressClient, record_id: str, *, backoff_s: float = 0.5,
                 max_backoff_s: float = 10.0, linger_s: float = 60.0, name: str = "progress-sender"):
        self.client = client
        self.record_id = record_id
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.linger_s = linger_s
        self._slot: dict | None = None
        self._busy = False
        self._failing = False  # the last attempt failed: the API is down or refusing us
        self._stopping = False
        self._give_up_at = float("inf")
        self._cond = threading.Condition()
        self.sent = self.failures = self.superseded = self.refused = 0
        self.last_sent: dict | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def offer(self, body: dict) -> None:
        with self._cond:
            if self._slot is not None:
                self.superseded += 1
            self._slot = body
            self._cond.notify_all()

    def close(self, timeout_s: float = 2.0) -> bool:
        """No more updates. What is still waiting goes out from the thread,
        retried for up to `linger_s`, whether or not the caller waits. The
        caller waits up to `timeout_s` for it, but no longer than the
        channel works: once an attempt failed (API down, unreachable or
        refusing the token) waiting only delays the caller's next step -
        a workflow step used to lose the whole `timeout_s` this way.
        Returns whether everything offered was delivered."""
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
                body, self._slot, self._busy = self._slot, None, True
            try:
                self.client.post_update(self.record_id, body)
            except ProgressUnavailable as exc:
                self.failures += 1
                with self._cond:
                    if self._slot is None:
                        self._slot = body  # retry it unless a newer one came meanwhile
                    self._busy = False
                    self._failing = True
                    self._cond.notify_all()
                    retry_at = time.monotonic() + delay
                    if self._stopping and retry_at > self._give_up_at:
                        log.warning("progress update for %s dropped: not delivered %.0f s after its reporter "
                                    "closed: %s", self.record_id, self.linger_s, exc)
                        self._slot = None
                        return
                    log.warning("progress update for %s not delivered (retry in %.1f s): %s",
                                self.record_id, delay, exc)
                    # Newer offers and close() do not cut the backoff short.
                    while (remaining := retry_at - time.monotonic()) > 0:
                        self._cond.wait(remaining)
                delay = min(self.max_backoff_s, delay * 2)
                continue
            except ValueError as exc:
                self.refused += 1
                log.error("progress update for %s refused: %s", self.record_id, exc)
            else:
                self.sent += 1
                self.last_sent = body
            delay = self.backoff_s
            with self._cond:
                self._busy = self._failing = False
                self._cond.notify_all()


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
        self.last_stage = "Initializing"
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
        self.last_stage = "Transfer"
        rate = self.rate.add(progress.elapsed_s, progress.bytes_done)
        remaining = max(0, progress.bytes_total - progress.bytes_done)
        fields = {"bytes_transferred": progress.bytes_done, "total_bytes": progress.bytes_total,
                  "percent": round(progress.percent, 4), "throughput_bps": rate}
        if rate > 0:
            fields["eta_seconds"] = int(remaining / rate)
        self.sender.offer(self._body("Transfer", "in_progress", **fields))

    def finish(self, status: str, *, bytes_total: int | None = None, throughput_bps: int = 0,
               error_message: str = "") -> None:
        stage = {"completed": "Completed", "failed": "Failed", "cancelled": "Cancelled"}[status]
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

"""The OMA progress poller: agent progress records -> the database.

Every pass reads the set of jobs to poll from the database (never from
memory, so a restarted poller simply carries on), fetches their records from
the VMA progress API concurrently, and applies them in this thread:
monotonic (by per-disk sequence number), throttled (>= 1 %, >= 2 s, or a
stage change), job totals always aggregated from the disks.

This is the one path by which copy counters reach the database, and every
update applied is also the copy run's heartbeat (with its resume cursor).
The poller judges nothing: "no record yet" and network errors only mean
"poll again"; the reaper alone decides that a run is lost."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime

import redis
from django.conf import settings
from django.db import transaction
from django.db.models import Prefetch
from django.utils import timezone

from replication.choices import DiskStatus, JobStatus, Stage
from replication.models import ReplicationJob, VMDisk
from vma_agent.reporter import ProgressClient, ProgressUnavailable

log = logging.getLogger(__name__)

# Pending jobs have nothing to report yet (the reaper watches them).
POLLED_STATUSES = (JobStatus.PREPARING, JobStatus.REPLICATING, JobStatus.FINALIZING)
FETCH_ATTEMPTS = 3
FETCH_BACKOFF_S = 0.2
LOCK_KEY = "oma:progress-poller:lock"
APPLY_BATCH_JOBS = 10  # 40 disks: a statement well under SQLite's parameter limit


@dataclass
class Fetched:
    """What the agent said about one job: disk entries by VMDisk pk."""

    job_id: str
    entries: dict[int, dict] = field(default_factory=dict)
    found: bool = False
    error: str | None = None
    requests: int = 0


@dataclass
class PassStats:
    jobs: int = 0
    requests: int = 0
    disks_written: int = 0
    jobs_written: int = 0
    not_found: int = 0
    errors: int = 0
    failed: list[str] = field(default_factory=list)
    seconds: float = 0.0
    apply_seconds: float = 0.0  # of `seconds`, spent applying (database) rather than fetching


_local = threading.local()


def _client() -> ProgressClient:
    # One HTTP session per poller thread: requests' sessions are not thread-safe.
    key = (settings.VMA_URL, settings.VMA_TOKEN)
    if getattr(_local, "key", None) != key:
        _local.client = ProgressClient(settings.VMA_URL, settings.VMA_TOKEN, timeout_s=settings.VMA_REQUEST_TIMEOUT_S,
                                       keep_alive=settings.VMA_HTTP_KEEPALIVE)
        _local.key = key
    return _local.client


def _get(record_id: str, fetched: Fetched) -> dict | None:
    """GET with retries and backoff; raises ProgressUnavailable after the last."""
    delay = FETCH_BACKOFF_S
    for attempt in range(FETCH_ATTEMPTS):
        fetched.requests += 1
        try:
            return _client().get(record_id)
        except ProgressUnavailable:
            if attempt == FETCH_ATTEMPTS - 1:
                raise
            time.sleep(delay)
            delay *= 2
    return None


def fetch(job: ReplicationJob) -> Fetched:
    """The agent's entries for the job's disks. One GET by job id gives every
    disk that reported with its job id; disks still missing are looked up by
    their export names (ReplicationJob -> VMDisk -> TargetVolume), which also
    finds updates an agent posted by export name alone. Runs in a pool
    thread: HTTP only, no database."""
    fetched = Fetched(job.id)
    disks = list(job.disks.all())  # prefetched
    by_key = {d.disk_key: d.pk for d in disks}
    by_export = {d.target_volume.export_name: d.pk for d in disks}
    try:
        record = _get(job.id, fetched)
        if record is not None:
            fetched.found |= _collect(record, fetched, job, by_key, by_export)
        for export, pk in by_export.items():
            if pk in fetched.entries:
                continue
            record = _get(export, fetched)
            if record is not None:
                fetched.found |= _collect(record, fetched, job, by_key, by_export, export_pk=pk)
    except ProgressUnavailable as exc:
        fetched.error = str(exc)
    return fetched


def _collect(record: dict, fetched: Fetched, job: ReplicationJob, by_key: dict, by_export: dict,
             export_pk: int | None = None) -> bool:
    """Take the record's entries for this job's disks; False when the record
    is not this job's (an export whose volume an earlier job reported)."""
    record_job = record.get("job_id")
    if record_job not in (None, job.id):
        return False
    started = (job.started_at or job.created_at).timestamp()
    for disk_id, entry in (record.get("disks") or {}).items():
        if record_job is None:
            # A record an agent kept under the export name alone: everything
            # in it is that export's disk, but only if newer than this job.
            if export_pk is None or entry.get("received_at", 0) < started - 1:
                continue
            pk = export_pk
        else:
            pk = by_key.get(disk_id) or by_export.get(disk_id) or by_export.get(entry.get("export_name"))
        if pk is not None and entry.get("seq", 0) > fetched.entries.get(pk, {}).get("seq", 0):
            fetched.entries[pk] = entry
    return record_job == job.id or bool(fetched.entries)


def _should_write(disk: VMDisk, entry: dict, now: datetime) -> bool:
    if entry["seq"] <= disk.progress_seq:
        return False  # late or replayed
    if entry.get("attempt", disk.attempts) != disk.attempts:
        return False  # an older run of the disk, taken over: it speaks no more
    if entry.get("stage") != disk.current_operation:
        return True
    total = entry.get("total_bytes") or 0
    done = entry.get("bytes_transferred") or 0
    percent = 100.0 if total <= 0 else 100.0 * done / total
    if abs(percent - disk.progress_percent) >= settings.PROGRESS_WRITE_STEP_PERCENT:
        return True
    changed = (done, total, entry.get("throughput_bps") or 0) != (disk.bytes_done, disk.bytes_total,
                                                                  disk.throughput_bps)
    last = disk.last_progress_at or disk.started_at or now
    if changed and (now - last).total_seconds() >= settings.PROGRESS_WRITE_INTERVAL_S:
        return True
    # Nothing moved, but the run spoke: its heartbeat, stored often enough for
    # the reaper's HEARTBEAT_TIMEOUT_S and no more often.
    beat = disk.heartbeat_at or disk.started_at or now
    return (now - beat).total_seconds() >= settings.HEARTBEAT_TIMEOUT_S / 4


def apply(job: ReplicationJob, fetched: Fetched, now: datetime, stats: PassStats) -> None:
    apply_batch([(job, fetched)], now, stats)


def apply_batch(pairs: list[tuple[ReplicationJob, Fetched]], now: datetime, stats: PassStats) -> None:
    """Classify each job's outcome, then write every due disk of the batch in
    one conditional UPDATE and the jobs' totals in one more, in one commit:
    commits and round trips, not rows, are what a pass costs."""
    due_jobs, updates = [], []
    for job, fetched in pairs:
        try:
            due = _classify(job, fetched, now, stats)
        except Exception:
            # One bad job never stops the pass for the others.
            log.exception("applying progress of job %s failed", job.id)
            continue
        if due:
            due_jobs.append(job)
            updates += [_update_of(disk, entry) for disk, entry in due]
    if not updates:
        return
    with transaction.atomic():
        stats.disks_written += VMDisk.apply_progress_of(updates, now)
        ReplicationJob.refresh_totals_of(due_jobs)
        stats.jobs_written += len(due_jobs)


def _update_of(disk: VMDisk, entry: dict) -> dict:
    return {"pk": disk.pk, "seq": entry["seq"], "attempt": entry.get("attempt", disk.attempts),
            "bytes_done": entry.get("bytes_transferred") or 0, "bytes_total": entry.get("total_bytes") or 0,
            "throughput_bps": entry.get("throughput_bps") or 0,
            "stage": entry["stage"] if entry.get("stage") in Stage.values else disk.current_operation,
            "eta_seconds": entry.get("eta_seconds"),
            "checkpoint_bytes": max(disk.checkpoint_bytes, entry.get("checkpoint_bytes") or 0),
            "worker": (entry.get("worker") or disk.worker)[:200]}


def _classify(job: ReplicationJob, fetched: Fetched, now: datetime, stats: PassStats) -> list:
    """Count what is not progress (errors, no record yet: the reaper alone
    judges whether a run is lost); returns the (disk, entry) pairs worth
    writing. Only copying disks take progress: a finished disk keeps the
    state its outcome wrote."""
    if fetched.error is not None and not fetched.entries:
        stats.errors += 1
        job.record_poll(error=True)
        return []
    if job.poll_errors:
        job.record_poll(error=False)
    if not fetched.found:
        stats.not_found += 1
        return []
    return [(disk, fetched.entries[disk.pk]) for disk in job.disks.all()
            if disk.pk in fetched.entries and disk.status == DiskStatus.COPYING
            and _should_write(disk, fetched.entries[disk.pk], now)]


def active_jobs() -> list[ReplicationJob]:
    return list(
        ReplicationJob.objects.filter(status__in=POLLED_STATUSES)
        .prefetch_related(Prefetch("disks", queryset=VMDisk.objects.select_related("target_volume")))
    )


def poll_once(now: datetime | None = None) -> PassStats:
    """One pass over every job the database says is active."""
    started = time.monotonic()
    jobs = active_jobs()
    stats = PassStats(jobs=len(jobs))
    if jobs:
        workers = max(1, min(settings.PROGRESS_POLL_CONCURRENCY, len(jobs)))
        current = now or timezone.now()
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="progress-poll") as pool:
            results = list(zip(jobs, pool.map(fetch, jobs), strict=True))
        applying = time.monotonic()
        stats.requests = sum(fetched.requests for _, fetched in results)
        for start in range(0, len(results), APPLY_BATCH_JOBS):
            # A few jobs per statement and commit; short transactions keep
            # row locks brief for the copies' heartbeats.
            try:
                apply_batch(results[start:start + APPLY_BATCH_JOBS], current, stats)
            except Exception:
                log.exception("applying a batch of progress failed; the next pass retries it")
        stats.apply_seconds = time.monotonic() - applying
    stats.seconds = time.monotonic() - started
    return stats


def poll_once_locked() -> PassStats | None:
    """A pass unless another poller's pass is still running (beat fires every
    few seconds; a slow pass must not pile up behind itself)."""
    client = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    token = str(time.time_ns())
    ttl = max(10, int(settings.PROGRESS_POLL_INTERVAL_S * 6))
    if not client.set(LOCK_KEY, token, nx=True, ex=ttl):
        return None
    try:
        return poll_once()
    finally:
        if client.get(LOCK_KEY) == token.encode():
            client.delete(LOCK_KEY)

"""The reaper: no job stays non-terminal after the processes working on it
are gone. Runs as a periodic task; every decision is written with its reason."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.conf import settings
from django.utils import timezone

from replication.choices import JOB_TERMINAL, DiskStatus, JobStatus
from replication.models import (
    CopyAttempt,
    JobEvent,
    ReplicationJob,
    VMDisk,
    database_up_since,
    heartbeats_stale_before,
)
from replication.services import jobs as job_service
from replication.services import sweeper

log = logging.getLogger(__name__)


@dataclass
class Reaped:
    failed: list[str] = field(default_factory=list)
    requeued: list[str] = field(default_factory=list)
    disks_failed: list[int] = field(default_factory=list)
    disks_requeued: list[int] = field(default_factory=list)
    swept: list[str] = field(default_factory=list)


def reap(now: datetime | None = None) -> Reaped:
    now = now or timezone.now()
    result = Reaped()
    timeout = settings.REAPER_TIMEOUT_S
    up_since = database_up_since()
    stale = heartbeats_stale_before(now, timeout, up_since)  # None: nothing is judged yet
    running = (JobStatus.PREPARING, JobStatus.REPLICATING, JobStatus.FINALIZING)
    for job in ReplicationJob.objects.filter(status__in=running) if stale else ():
        quiet = (now - job.last_sign_of_life()).total_seconds()
        if quiet < timeout:
            continue
        if job.status == JobStatus.FINALIZING and job.all_disks_completed():
            # Every disk is written: only the finalize step was lost. It is
            # idempotent, so run it again rather than throw the copy away.
            job.beat()
            job_service.enqueue_job_step("finalize_job", job.id)
            log.warning("job %s: finalize lost (%.0f s without heartbeat), requeued", job.id, quiet)
            result.requeued.append(job.id)
            continue
        reason = f"no heartbeat for {quiet:.0f} s while {job.status}: the worker running it is gone"
        _fail(job, reason, now, result)
    pending_cutoff = now - timedelta(seconds=settings.REAPER_PENDING_TIMEOUT_S)
    for job in ReplicationJob.objects.filter(status=JobStatus.PENDING, created_at__lt=pending_cutoff):
        _fail(job, f"never started: pending for more than {settings.REAPER_PENDING_TIMEOUT_S:.0f} s", now, result)
    # Copies whose job already ended and whose task died before noticing.
    for disk in VMDisk.objects.filter(status=DiskStatus.COPYING, job__status__in=JOB_TERMINAL) if stale else ():
        if disk.heartbeat_at is None or disk.heartbeat_at < stale:
            if disk.fail("copy task lost after its job ended"):
                disk.end_attempt(CopyAttempt.Outcome.LOST, reason="worker gone after its job ended")
                result.disks_failed.append(disk.pk)
    _requeue_lost_copies(now, result, up_since)
    result.swept = sweeper.sweep()
    return result


def _requeue_lost_copies(now: datetime, result: Reaped, up_since: datetime | None = None) -> None:
    """A copy whose heartbeat went stale while its job replicates lost its
    worker (killed, or its host gone): Redis would hand its unacknowledged
    task back only after the visibility timeout (hours), so the reaper hands
    the disk to a new task at once, which resumes from the checkpoint; after
    COPY_MAX_ATTEMPTS runs the job fails with the reason instead. A pending
    disk whose task never started (a broker that lost its queue) is queued
    again; a duplicate of a task that is merely waiting loses its claim.
    Nothing is judged until the database has been up HEARTBEAT_TIMEOUT_S."""
    stale = heartbeats_stale_before(now, settings.HEARTBEAT_TIMEOUT_S, up_since)
    if stale is None:
        log.info("database up since %s: lost copies are judged from %s s after its start", up_since,
                 settings.HEARTBEAT_TIMEOUT_S)
        return
    lost = VMDisk.objects.filter(status=DiskStatus.COPYING, job__status=JobStatus.REPLICATING,
                                 heartbeat_at__lt=stale).select_related("job__vm")
    for disk in lost:
        quiet = (now - disk.heartbeat_at).total_seconds()
        who = disk.worker or "a requeued task that never started"
        if disk.attempts >= settings.COPY_MAX_ATTEMPTS:
            reason = (f"{disk.disk_key}: copy lost {disk.attempts} times, the last on {who} "
                      f"(no heartbeat for {quiet:.0f} s); giving up (COPY_MAX_ATTEMPTS)")
            if disk.fail(reason):
                result.disks_failed.append(disk.pk)
            job_service.fail_job(disk.job_id, reason)
            result.failed.append(disk.job_id)
            log.warning("job %s reaped: %s", disk.job_id, reason)
            continue
        task_id = str(uuid.uuid4())
        attempt, checkpoint = disk.attempts, disk.checkpoint_bytes
        if not disk.hand_over(task_id):
            continue  # it beat, or another reaper took it, meanwhile
        message = (f"{disk.disk_key}: copy attempt {attempt} on {who} silent for {quiet:.0f} s; "
                   f"requeued as attempt {attempt + 1}, resuming from offset {checkpoint}")
        JobEvent.objects.create(job=disk.job, status=disk.job.status, stage=disk.job.current_operation,
                                message=message)
        log.warning("job %s: %s", disk.job_id, message)
        job_service.enqueue_copy(disk, task_id)
        result.disks_requeued.append(disk.pk)
    for job in ReplicationJob.objects.filter(status=JobStatus.REPLICATING).select_related("vm"):
        if job.last_sign_of_life() >= stale:
            continue
        for disk in job.disks.filter(status=DiskStatus.PENDING).select_related("job__vm"):
            job_service.enqueue_copy(disk)
            log.warning("job %s: %s never started; its copy task queued again", job.id, disk.disk_key)
            result.disks_requeued.append(disk.pk)


def _fail(job: ReplicationJob, reason: str, now: datetime, result: Reaped) -> None:
    log.warning("job %s reaped: %s", job.id, reason)
    job_service.fail_job(job.id, reason)
    stale = now - timedelta(seconds=settings.HEARTBEAT_TIMEOUT_S)
    for disk in job.disks.filter(status=DiskStatus.COPYING):
        if (disk.heartbeat_at is None or disk.heartbeat_at < stale) and disk.fail(reason):
            disk.end_attempt(CopyAttempt.Outcome.LOST, reason=reason)
            result.disks_failed.append(disk.pk)
    result.failed.append(job.id)

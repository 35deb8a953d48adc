"""The reaper: no job stays non-terminal after the processes working on it
are gone. Runs as a periodic task; every decision is written with its reason."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.conf import settings
from django.utils import timezone

from replication.choices import JOB_TERMINAL, DiskStatus, JobStatus
from replication.models import ReplicationJob, VMDisk
from replication.services import jobs as job_service

log = logging.getLogger(__name__)


@dataclass
class Reaped:
    failed: list[str] = field(default_factory=list)
    requeued: list[str] = field(default_factory=list)
    disks_failed: list[int] = field(default_factory=list)


def reap(now: datetime | None = None) -> Reaped:
    now = now or timezone.now()
    result = Reaped()
    timeout = settings.REAPER_TIMEOUT_S
    running = (JobStatus.PREPARING, JobStatus.REPLICATING, JobStatus.FINALIZING)
    for job in ReplicationJob.objects.filter(status__in=running):
        quiet = (now - job.last_sign_of_life()).total_seconds()
        if quiet < timeout:
            continue
        if job.status == JobStatus.FINALIZING and job.all_disks_completed():
            # Every disk is written: only the finalize step was lost. It is
            # idempotent, so run it again rather than throw the copy away.
            job.beat()
            job_service._enqueue("finalize_job", job.id)
            log.warning("job %s: finalize lost (%.0f s without heartbeat), requeued", job.id, quiet)
            result.requeued.append(job.id)
            continue
        reason = f"no heartbeat for {quiet:.0f} s while {job.status}: the worker running it is gone"
        _fail(job, reason, now, result)
    pending_cutoff = now - timedelta(seconds=settings.REAPER_PENDING_TIMEOUT_S)
    for job in ReplicationJob.objects.filter(status=JobStatus.PENDING, created_at__lt=pending_cutoff):
        _fail(job, f"never started: pending for more than {settings.REAPER_PENDING_TIMEOUT_S:.0f} s", now, result)
    # Copies whose job already ended and whose task died before noticing.
    stale = now - timedelta(seconds=timeout)
    for disk in VMDisk.objects.filter(status=DiskStatus.COPYING, job__status__in=JOB_TERMINAL):
        if disk.heartbeat_at is None or disk.heartbeat_at < stale:
            if disk.fail("copy task lost after its job ended"):
                result.disks_failed.append(disk.pk)
    return result


def _fail(job: ReplicationJob, reason: str, now: datetime, result: Reaped) -> None:
    log.warning("job %s reaped: %s", job.id, reason)
    job_service.fail_job(job.id, reason)
    stale = now - timedelta(seconds=settings.HEARTBEAT_TIMEOUT_S)
    for disk in job.disks.filter(status=DiskStatus.COPYING):
        if (disk.heartbeat_at is None or disk.heartbeat_at < stale) and disk.fail(reason):
            result.disks_failed.append(disk.pk)
    result.failed.append(job.id)

"""The one source of the rates and ETAs an operator reads: the job and disk
pages, the dashboard, /api/jobs/ and `manage.py jobs` all take them from
here, so no two of them can disagree.

The rules:
- a copying disk's rate is its agent's measured rate, never above the limit
  in force (a rate window that still holds bytes from before a new limit
  would read above it);
- its ETA is its remaining bytes at that rate: remaining / min(rate, limit);
- a disk that no longer copies shows no rate and no ETA, at once: a copying
  disk of a cancelled or failed job is "stopping" until its agent confirms;
- a running job's rate is the sum of its copying disks' rates, and its ETA
  the slowest disk's (unknown while a disk still waiting has no rate);
- a completed job or disk shows its average: bytes / duration.

The admin's job list takes job_figures too; /metrics sums over thousands of
disks in the database with shown_rate_sum(), the same rule as an
aggregate."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from replication.choices import JOB_TERMINAL, DiskStatus, JobStatus


@dataclass(frozen=True)
class DiskFigures:
    disk: object
    state: str  # what the disk is doing as an operator reads it: its status, or "stopping"
    rate_bps: int
    eta_seconds: int | None
    average: bool = False  # rate_bps is bytes / duration of a finished copy


@dataclass(frozen=True)
class JobFigures:
    rate_bps: int
    eta_seconds: int | None
    average: bool = False  # rate_bps is bytes / duration of the completed job
    duration_s: float | None = None
    disks: list[DiskFigures] = field(default_factory=list)


def capped(rate_bps: int, limit_bps: int | None) -> int:
    """A measured rate as shown: never above the limit in force."""
    rate = max(int(rate_bps or 0), 0)
    return min(rate, int(limit_bps)) if limit_bps else rate


def shown_rate_sum(prefix: str = ""):
    """An aggregate over VMDisk rows (`prefix` reaches them from another
    model, e.g. "disks__") summing the rates disk_figures shows: a copying
    disk of a job that still runs counts its measured rate, never above its
    job's limit; a stopping, waiting or finished disk counts nothing."""
    from django.db.models import Case, F, Q, Sum, Value, When
    from django.db.models.functions import Greatest, Least

    rate, limit = F(f"{prefix}throughput_bps"), F(f"{prefix}job__bandwidth_limit_bps")
    copying = Q(**{f"{prefix}status": DiskStatus.COPYING}) & ~Q(**{f"{prefix}job__status__in": JOB_TERMINAL})
    return Sum(Case(When(copying & Q(**{f"{prefix}job__bandwidth_limit_bps__gt": 0}),
                         then=Greatest(Least(rate, limit), Value(0))),
                    When(copying, then=Greatest(rate, Value(0))),
                    default=Value(0)), default=0)


def average_rate(nbytes: int, start: datetime | None, end: datetime | None) -> int:
    seconds = (end - start).total_seconds() if start and end else 0.0
    return int(nbytes / seconds) if seconds > 0 else 0


def remaining_bytes(bytes_done: int, bytes_total: int, capacity: int) -> int:
    """What is left to copy; a disk not measured yet counts with its capacity."""
    return max(bytes_total - bytes_done, 0) if bytes_total else capacity


def eta_of(remaining: int, rate_bps: int) -> int | None:
    if remaining <= 0:
        return 0
    return None if rate_bps <= 0 else int(remaining / rate_bps)


def disk_figures(disk, job) -> DiskFigures:
    """`disk`: a VMDisk; `job`: its ReplicationJob (its limit and status)."""
    stopped = job.status in JOB_TERMINAL
    if disk.status == DiskStatus.COPYING and not stopped:
        rate = capped(disk.throughput_bps, job.bandwidth_limit_bps)
        eta = eta_of(remaining_bytes(disk.bytes_done, disk.bytes_total, disk.capacity_bytes), rate)
        return DiskFigures(disk, str(disk.status), rate, eta)
    if disk.status == DiskStatus.COPYING:
        return DiskFigures(disk, "stopping", 0, None)
    if disk.status == DiskStatus.COMPLETED:
        return DiskFigures(disk, str(disk.status), average_rate(disk.bytes_done, disk.started_at, disk.completed_at),
                           None, average=True)
    return DiskFigures(disk, str(disk.status), 0, None)


def job_figures(job, disks: list | None = None) -> JobFigures:
    """`disks`: the job's VMDisks (job.disks.all() when not given)."""
    disks = list(job.disks.all()) if disks is None else disks
    per_disk = [disk_figures(disk, job) for disk in disks]
    if job.status == JobStatus.COMPLETED:
        start = job.started_at or job.created_at
        duration = (job.completed_at - start).total_seconds() if job.completed_at else None
        return JobFigures(average_rate(job.bytes_transferred, start, job.completed_at), None, average=True,
                          duration_s=duration, disks=per_disk)
    if job.status in JOB_TERMINAL:
        return JobFigures(0, None, disks=per_disk)
    rate = sum(f.rate_bps for f in per_disk if f.disk.status == DiskStatus.COPYING)
    eta = job_eta(job.status, [(f.disk.status, f.eta_seconds) for f in per_disk])
    return JobFigures(rate, eta, disks=per_disk)


def job_eta(job_status: str, disks: list[tuple[str, int | None]]) -> int | None:
    """The slowest unfinished disk's ETA while the job copies; None while
    unknown (not copying yet, or a disk still to copy has no rate)."""
    if job_status != JobStatus.REPLICATING:
        return None
    etas = [eta for status, eta in disks if status in (DiskStatus.PENDING, DiskStatus.COPYING)]
    if any(eta is None for status, eta in disks if status in (DiskStatus.PENDING, DiskStatus.COPYING)):
        return None
    return max(etas, default=0)

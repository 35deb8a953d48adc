"""The OMA's Celery tasks (queue oma): thin wrappers that take ids, or an
agent's outcome, and call one service. The agent's tasks are in
vma_agent.tasks; it answers through the *_prepared / *_copied / *_removed
tasks here. A database outage is retried with backoff and jitter.
Nothing imports this module but Celery's autodiscovery: the services queue
tasks by name (replication.dispatch, vma_agent.task_names)."""

from celery import shared_task
from django.conf import settings
from django.db import DatabaseError

from replication.services import (
    checksums,
    drills,
    enrolment,
    failover,
    jobs,
    points,
    progress,
    reaper,
    scheduler,
    sweeper,
)
from vma_agent import task_names
from vma_agent.contract import DiskCopied, SnapshotRemoved, SourcePowered, SourcePrepared

# An outcome must not be lost to a database restart: the agent's work is done.
OUTCOME_RETRY = {"autoretry_for": (DatabaseError,), "max_retries": settings.COPY_TASK_MAX_RETRIES,
                 "retry_backoff": settings.COPY_RETRY_BACKOFF_S, "retry_backoff_max": settings.COPY_RETRY_BACKOFF_MAX_S,
                 "retry_jitter": True}


@shared_task(name=task_names.PREPARE_JOB, **OUTCOME_RETRY)
def prepare_job(job_id: str) -> None:
    jobs.prepare_job(job_id)


@shared_task(name=task_names.SOURCE_PREPARED, **OUTCOME_RETRY)
def source_prepared(job_id: str, outcome: dict, identity: dict | None = None) -> None:
    parsed = SourcePrepared.from_dict(outcome)  # a malformed outcome is refused before anything else
    if enrolment.accepts_for_job(task_names.SOURCE_PREPARED, [job_id, outcome], identity, job_id):
        jobs.source_prepared(job_id, parsed)


@shared_task(name=task_names.DISK_COPIED, **OUTCOME_RETRY)
def disk_copied(job_id: str, disk_key: str, attempt: int, outcome: dict, identity: dict | None = None) -> None:
    parsed = DiskCopied.from_dict(outcome)
    if enrolment.accepts_for_job(task_names.DISK_COPIED, [job_id, disk_key, attempt, outcome], identity, job_id):
        jobs.disk_copied(job_id, disk_key, attempt, parsed)


@shared_task(name=task_names.FINALIZE_JOB, **OUTCOME_RETRY)
def finalize_job(job_id: str) -> None:
    jobs.finalize_job(job_id)


@shared_task(name=task_names.SNAPSHOT_REMOVED, **OUTCOME_RETRY)
def snapshot_removed(job_id: str, snapshot_moref: str, finalize: bool, outcome: dict,
                     identity: dict | None = None) -> None:
    parsed = SnapshotRemoved.from_dict(outcome)
    args = [job_id, snapshot_moref, finalize, outcome]
    if enrolment.accepts_for_job(task_names.SNAPSHOT_REMOVED, args, identity, job_id):
        jobs.snapshot_removed(job_id, snapshot_moref, finalize, parsed)


@shared_task(name=task_names.RUN_FAILOVER)
def run_failover(failover_id: int) -> None:
    failover.run_failover(failover_id)


@shared_task(name=task_names.CONTINUE_FAILOVER, **OUTCOME_RETRY)
def continue_failover(failover_id: int) -> None:
    failover.continue_failover(failover_id)


@shared_task(name=task_names.SOURCE_POWERED, **OUTCOME_RETRY)
def source_powered(failover_id: int, action: str, outcome: dict, identity: dict | None = None) -> None:
    parsed = SourcePowered.from_dict(outcome)
    args = [failover_id, action, outcome]
    if enrolment.accepts_for_failover(task_names.SOURCE_POWERED, args, identity, failover_id):
        failover.source_powered(failover_id, action, parsed)


@shared_task(name=task_names.POLL_PROGRESS)
def poll_progress() -> None:
    progress.poll_once_locked()


@shared_task(name=task_names.SWEEP_SNAPSHOTS)
def sweep_snapshots() -> None:
    sweeper.sweep_snapshots()


@shared_task(name=task_names.REAP_STALE)
def reap_stale() -> None:
    reaper.reap()


@shared_task(name=task_names.CLOUD_DRIFT)
def cloud_drift() -> None:
    """Log how the volume records and the active cloud's volumes differ."""
    from replication.models import CloudStackConfig
    from replication.platforms.cloudstack.drift import drift

    if CloudStackConfig.objects.filter(is_active=True).exists():
        drift()


@shared_task(name=task_names.GROUP_DUE)
def group_due(group_id: int) -> None:
    scheduler.group_due(group_id)


@shared_task(name=task_names.JOB_ENDED, **OUTCOME_RETRY)
def job_ended(job_id: str) -> None:
    scheduler.job_ended(job_id)


@shared_task(name=task_names.RETAIN_POINTS, **OUTCOME_RETRY)
def retain_points(vm_id: int) -> None:
    points.retain(vm_id)


@shared_task(name=task_names.DRILL_DUE)
def drill_due(group_id: int) -> None:
    drills.drill_due(group_id)


@shared_task(name=task_names.DRILL_CONTINUE, **OUTCOME_RETRY)
def drill_continue(failover_id: int) -> None:
    drills.drill_continue(failover_id)


@shared_task(name=task_names.COMPARE_CHECKSUMS)
def compare_checksums(run_id: int) -> None:
    checksums.run(run_id)

"""Thin Celery wrappers: take ids, call one service, route the next step."""

from celery import shared_task
from django.conf import settings
from django.db import DatabaseError

from replication.models import VMDisk
from replication.services import jobs, progress, reaper, sweeper
from replication.services.task_events import TaskProgressPublisher


@shared_task(name="replication.prepare_job")
def prepare_job(job_id: str) -> None:
    if not jobs.begin_job(job_id):
        return
    if jobs.needs_snapshot(job_id):
        jobs.enqueue_job_step("prepare_source", job_id)
    else:
        _copy_disks(jobs.prepare_targets(job_id))


@shared_task(name="replication.prepare_source")
def prepare_source(job_id: str) -> None:
    if jobs.prepare_source(job_id):
        jobs.enqueue_job_step("prepare_targets", job_id)


@shared_task(name="replication.prepare_targets")
def prepare_targets(job_id: str) -> None:
    _copy_disks(jobs.prepare_targets(job_id))


def _copy_disks(disk_ids: list[int]) -> None:
    for disk in VMDisk.objects.filter(pk__in=disk_ids).select_related("job__vm"):
        jobs.enqueue_copy(disk)


# A database outage (MariaDB restarting) is retried with exponential backoff
# and jitter, a bounded number of times; the retried run resumes from the
# disk's checkpoint. Other errors end the disk in copy_disk itself.
@shared_task(name="replication.copy_disk", bind=True,
             autoretry_for=(jobs.DatabaseUnreachable, DatabaseError), max_retries=settings.COPY_TASK_MAX_RETRIES,
             retry_backoff=settings.COPY_RETRY_BACKOFF_S, retry_backoff_max=settings.COPY_RETRY_BACKOFF_MAX_S,
             retry_jitter=True)
def copy_disk(self, disk_id: int) -> None:
    publisher = TaskProgressPublisher(self, disk_id, settings.TASK_EVENT_INTERVAL_S)
    try:
        last_disk = jobs.copy_disk(disk_id, task_id=self.request.id or "", on_progress=publisher)
    finally:
        publisher.close()
    if last_disk:
        jobs.enqueue_job_step("finalize_job", VMDisk.objects.values_list("job_id", flat=True).get(pk=disk_id))


@shared_task(name="replication.finalize_job")
def finalize_job(job_id: str) -> None:
    jobs.finalize_job(job_id)


@shared_task(name="replication.remove_job_snapshot")
def remove_job_snapshot(job_id: str) -> None:
    jobs.remove_job_snapshot(job_id)


@shared_task(name="replication.poll_progress")
def poll_progress() -> None:
    progress.poll_once_locked()


@shared_task(name="replication.sweep_snapshots")
def sweep_snapshots() -> None:
    sweeper.sweep_snapshots()


@shared_task(name="replication.reap_stale")
def reap_stale() -> None:
    reaper.reap()


"""Thin Celery wrappers: take ids, call one service, route the next step."""

from celery import shared_task
from django.conf import settings

from replication.models import VMDisk
from replication.routing import agent_queue
from replication.services import jobs, progress, reaper
from replication.services.task_events import TaskProgressPublisher


@shared_task(name="replication.prepare_job")
def prepare_job(job_id: str) -> None:
    for disk in VMDisk.objects.filter(pk__in=jobs.prepare_job(job_id)).select_related("job__vm"):
        copy_disk.apply_async(args=[disk.id], queue=agent_queue(disk.job.vm.agent))


@shared_task(name="replication.copy_disk", bind=True)
def copy_disk(self, disk_id: int) -> None:
    publisher = TaskProgressPublisher(self, disk_id, settings.TASK_EVENT_INTERVAL_S)
    try:
        last_disk = jobs.copy_disk(disk_id, task_id=self.request.id or "", on_progress=publisher)
    finally:
        publisher.close()
    if last_disk:
        finalize_job.delay(VMDisk.objects.values_list("job_id", flat=True).get(pk=disk_id))


@shared_task(name="replication.finalize_job")
def finalize_job(job_id: str) -> None:
    jobs.finalize_job(job_id)


@shared_task(name="replication.clean_up_job")
def clean_up_job(job_id: str) -> None:
    jobs.clean_up_job(job_id)


@shared_task(name="replication.poll_progress")
def poll_progress() -> None:
    progress.poll_once_locked()


@shared_task(name="replication.reap_stale")
def reap_stale() -> None:
    reaper.reap()

"""The replication workflow: start -> prepare -> copy every disk -> finalize,
with every error path ending the job in a terminal status with the reason."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from django.conf import settings
from django.db import transaction

from replication.choices import DiskStatus, JobStatus, SourceKind, Stage, SyncType
from replication.models import JobEvent, ReplicationJob, VirtualMachine, VMDisk
from replication.services import volumes
from replication.services.inventory import is_nbd_uri
from vma_agent import nbdkit
from vma_agent.copy import copy_image
from vma_agent.progress import CopyProgress

log = logging.getLogger(__name__)


class ReplicationError(Exception):
    """A replication cannot start; the message is the reason."""


class CopyAborted(Exception):
    """The job ended (failed or cancelled) while this disk was copying."""


def start_replication(vm: VirtualMachine, sync_type: str = SyncType.FULL) -> ReplicationJob:
    """Create the job, its disks and their target volumes in one transaction;
    the prepare task is enqueued only once that commits."""
    if sync_type == SyncType.INCREMENTAL and vm.source_kind == SourceKind.IMAGE:
        raise ReplicationError(
            f"VM {vm.name} is an image source without changed-block tracking; only a full copy is possible"
        )
    with transaction.atomic():
        # Lock the VM row so two starts for one VM cannot both pass the check.
        vm = VirtualMachine.objects.select_for_update().get(pk=vm.pk)
        active = vm.active_job()
        if active is not None:
            raise ReplicationError(f"VM {vm.name} already has an active job {active.id} ({active.status})")
        source_disks = list(vm.disks.all())
        if not source_disks:
            raise ReplicationError(f"VM {vm.name} has no disks")
        job = ReplicationJob.objects.create(vm=vm, sync_type=sync_type)
        JobEvent.objects.create(job=job, status=job.status, stage=job.current_operation)
        for source_disk in source_disks:
            VMDisk.objects.create(
                job=job, source_disk=source_disk, target_volume=volumes.volume_for(source_disk),
                disk_key=source_disk.disk_key, capacity_bytes=source_disk.capacity_bytes,
                source_locator=source_disk.locator, previous_change_id=source_disk.change_id,
            )
        transaction.on_commit(lambda: _enqueue("prepare_job", job.id))
    log.info("replication %s of VM %s started", job.id, vm.name)
    return job


def prepare_job(job_id: str) -> list[int]:
    """Provision and export every target volume; returns the ids of the disks
    to copy (empty when the job did not get to the copy stage)."""
    job = ReplicationJob.objects.get(pk=job_id)
    if not job.enter_stage(Stage.INITIALIZING, JobStatus.PREPARING):
        log.warning("prepare skipped: job %s is %s", job_id, job.status)
        return []
    try:
        job.set_stage(Stage.SETTING_UP_NBD)
        disks = list(job.disks.select_related("target_volume__source_disk__vm"))
        for disk in disks:
            volumes.provision(disk.target_volume, disk.capacity_bytes)
        job.set_stage(Stage.PREPARING_MIGRATION)
        if not job.enter_stage(Stage.TRANSFER, JobStatus.REPLICATING):
            return []
    except Exception as exc:
        log.exception("prepare of job %s failed", job_id)
        fail_job(job_id, f"prepare failed: {exc}")
        return []
    return [disk.id for disk in disks]


@contextlib.contextmanager
def source_export(disk: VMDisk) -> Iterator[str]:
    """The NBD URI to read the disk from: an NBD source as it is, an image
    file through a read-only nbdkit that lives as long as the copy."""
    if is_nbd_uri(disk.source_locator):
        yield disk.source_locator
    else:
        with nbdkit.serve_file_readonly(disk.source_locator) as uri:
            yield uri


class DiskProgressWriter:
    """Copy-loop progress -> database (the engine already throttles calls).
    Stops the copy when the job has ended meanwhile."""

    def __init__(self, disk: VMDisk):
        self.disk = disk

    def __call__(self, progress: CopyProgress) -> None:
        self.disk.record_progress(progress.bytes_done, progress.bytes_total, progress.throughput_bps)
        job = self.disk.job
        job.refresh_from_db(fields=["status"])
        if job.is_terminal:
            raise CopyAborted(f"job {job.id} is {job.status}")
        job.refresh_totals()


def copy_disk(disk_id: int, task_id: str = "") -> bool:
    """Copy one disk to its target volume. Returns True when this was the
    job's last disk to finish, so the caller enqueues finalize."""
    disk = VMDisk.objects.select_related("job", "target_volume").get(pk=disk_id)
    if not disk.claim(task_id):
        log.warning("copy of %s skipped: disk is %s", disk, disk.status)
        return False
    job = disk.job
    if job.status != JobStatus.REPLICATING:
        disk.cancel()
        return False
    try:
        with source_export(disk) as src_uri:
            result = copy_image(
                src_uri, volumes.export_uri(disk.target_volume),
                chunk_bytes=settings.COPY_CHUNK_BYTES, progress=DiskProgressWriter(disk),
                progress_interval_s=settings.PROGRESS_DB_INTERVAL_S,
            )
    except CopyAborted as exc:
        disk.cancel()
        log.info("copy of %s stopped: %s", disk, exc)
        return False
    except Exception as exc:
        log.exception("copy of %s failed", disk)
        disk.fail(str(exc))
        fail_job(job.id, f"{disk.disk_key}: {exc}")
        return False
    disk.complete(bytes_total=result.bytes_allocated, bytes_zeroed=result.bytes_zeroed,
                  throughput_bps=result.throughput_bps)
    log.info("copied %s: %s", disk, result.as_dict())
    job.refresh_totals()
    return job.all_disks_completed() and job.transition(JobStatus.FINALIZING, current_operation=Stage.FINALIZING)


def finalize_job(job_id: str) -> None:
    """Commit what the copies produced and complete the job."""
    job = ReplicationJob.objects.get(pk=job_id)
    try:
        for disk in job.disks.select_related("source_disk"):
            if disk.change_id:
                # Advance the changeId only now that the data it covers is written.
                disk.source_disk.change_id = disk.change_id
                disk.source_disk.save(update_fields=["change_id"])
        if not job.complete():
            log.warning("finalize of %s found it %s", job_id, job.status)
    except Exception as exc:
        log.exception("finalize of job %s failed", job_id)
        fail_job(job_id, f"finalize failed: {exc}")


def fail_job(job_id: str, reason: str) -> None:
    """End the job as failed (if it is not already terminal) and clean up:
    disks not yet finished end too, so nothing stays running."""
    job = ReplicationJob.objects.get(pk=job_id)
    job.fail(reason)
    _end_unfinished_disks(job)


def cancel_job(job_id: str, reason: str = "cancelled by the operator") -> bool:
    job = ReplicationJob.objects.get(pk=job_id)
    cancelled = job.cancel(reason)
    _end_unfinished_disks(job)
    return cancelled


def _end_unfinished_disks(job: ReplicationJob) -> None:
    # Running copies notice the job's end at their next progress write and
    # stop themselves; pending ones never start.
    for disk in job.disks.filter(status=DiskStatus.PENDING):
        disk.cancel()


def retry_job(job_id: str) -> ReplicationJob:
    """Start the same replication again after a job failed or was cancelled."""
    job = ReplicationJob.objects.select_related("vm").get(pk=job_id)
    if job.status not in (JobStatus.FAILED, JobStatus.CANCELLED):
        raise ReplicationError(f"job {job.id} is {job.status}; only failed or cancelled jobs can be retried")
    return start_replication(job.vm, job.sync_type)


def _enqueue(task_name: str, job_id: str) -> None:
    """Queue the job's first task; if the broker cannot take it, the job
    fails with the reason instead of waiting forever as pending."""
    from replication import tasks  # tasks import this module

    try:
        getattr(tasks, task_name).delay(job_id)
    except Exception as exc:
        log.exception("could not queue %s for job %s", task_name, job_id)
        fail_job(job_id, f"could not queue the job (is Redis running?): {exc}")

"""The replication workflow: start -> prepare -> copy every disk -> finalize,
with every error path ending the job in a terminal status with the reason."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import TypeVar

from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.db import DatabaseError, connection, transaction
from django.utils import timezone
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_exponential_jitter

from replication.choices import STAGE_PERCENT, DiskStatus, JobStatus, SourceKind, Stage, SyncType
from replication.models import CopyAttempt, JobEvent, ReplicationJob, VirtualMachine, VMDisk, worker_id
from replication.services import vmware, volumes
from replication.services.inventory import is_nbd_uri
from vma_agent import nbdkit
from vma_agent.copy import RateLimit, copy_image
from vma_agent.progress import CopyProgress
from vma_agent.reporter import DiskReporter, JobStageReporter, ProgressClient

log = logging.getLogger(__name__)
T = TypeVar("T")


class ReplicationError(Exception):
    """A replication cannot start; the message is the reason."""


class CopyAborted(Exception):
    """The job ended (failed or cancelled) while this disk was copying."""


class CopySuperseded(CopyAborted):
    """This run lost its claim (the reaper handed the disk to a new run, or
    ended it): stop without touching the disk."""


class CopyTimeLimit(Exception):
    """The copy task ran past its soft time limit."""


class DatabaseUnreachable(Exception):
    """The copy could not reach the database for longer than
    DB_OUTAGE_TOLERANCE_S: it stops (its cursor is committed) rather than
    copy on unseen, and its task retries; the next run resumes."""


def start_replication(vm: VirtualMachine, sync_type: str = SyncType.FULL, *, verify: bool = False,
                      overrides: list[str] | tuple[str, ...] = (),
                      bandwidth_limit_bps: int | None = None) -> ReplicationJob:
    """Create the job, its disks and their target volumes in one transaction;
    the prepare task is enqueued only once that commits."""
    if sync_type == SyncType.INCREMENTAL and vm.source_kind == SourceKind.IMAGE:
        raise ReplicationError(
            f"VM {vm.name} is an image source without changed-block tracking; only a full copy is possible"
        )
    if bandwidth_limit_bps is not None and bandwidth_limit_bps <= 0:
        raise ReplicationError(f"bandwidth limit must be a positive number of bytes per second, not "
                               f"{bandwidth_limit_bps}")
    unknown = sorted(set(overrides) - set(vmware.OVERRIDES))
    if unknown:
        raise ReplicationError(f"unknown preflight override {', '.join(unknown)}; known: "
                               f"{', '.join(vmware.OVERRIDES)}")
    with transaction.atomic():
        # Lock the VM row so two starts for one VM cannot both pass the check.
        vm = VirtualMachine.objects.select_for_update().get(pk=vm.pk)
        active = vm.active_job()
        if active is not None:
            raise ReplicationError(f"VM {vm.name} already has an active job {active.id} ({active.status})")
        source_disks = list(vm.disks.all())
        if not source_disks:
            raise ReplicationError(f"VM {vm.name} has no disks")
        job = ReplicationJob.objects.create(vm=vm, sync_type=sync_type, verify=verify, overrides=sorted(overrides),
                                            bandwidth_limit_bps=bandwidth_limit_bps)
        JobEvent.objects.create(job=job, status=job.status, stage=job.current_operation)
        for source_disk in source_disks:
            VMDisk.objects.create(
                job=job, source_disk=source_disk, target_volume=volumes.volume_for(source_disk),
                disk_key=source_disk.disk_key, capacity_bytes=source_disk.capacity_bytes,
                source_locator=source_disk.locator, previous_change_id=source_disk.change_id,
            )
        transaction.on_commit(lambda: enqueue_job_step("prepare_job", job.id))
    log.info("replication %s of VM %s started", job.id, vm.name)
    return job


def begin_job(job_id: str) -> bool:
    """The job's first step (on the OMA): it starts preparing. False when it
    ended meanwhile (cancelled while queued)."""
    job = ReplicationJob.objects.get(pk=job_id)
    # The reporter exists before the first stage is entered, so no stage
    # update is ever sent into the void (a seeds' bug).
    with _stage_reporter(job) as stages:
        if not job.enter_stage(Stage.INITIALIZING, JobStatus.PREPARING):
            log.warning("prepare skipped: job %s is %s", job_id, job.status)
            return False
        job.beat()
        stages.stage(Stage.INITIALIZING, STAGE_PERCENT[Stage.INITIALIZING])
        return True


def needs_snapshot(job_id: str) -> bool:
    return ReplicationJob.objects.filter(pk=job_id, vm__source_kind=SourceKind.VMWARE).exists()


def prepare_source(job_id: str) -> bool:
    """On the VM's agent, which reaches its vCenter: preflight, changed
    block tracking and the job's snapshot. False when the job did not get
    through (failed with the reason, or ended meanwhile)."""
    job = ReplicationJob.objects.select_related("vm__vcenter").get(pk=job_id)
    with _stage_reporter(job) as stages, _failing_the_job_on_error(job, stages):
        if job.status != JobStatus.PREPARING:
            return False
        vmware.prepare_snapshot(job, lambda: _enter_stage(job, stages, Stage.CREATING_SNAPSHOT))
        return True
    return False


def prepare_targets(job_id: str) -> list[int]:
    """On the OMA: provision and export every target volume; returns the
    ids of the disks to copy (empty when the job did not get to the copy
    stage)."""
    job = ReplicationJob.objects.get(pk=job_id)
    with _stage_reporter(job) as stages, _failing_the_job_on_error(job, stages):
        _enter_stage(job, stages, Stage.SETTING_UP_NBD)
        disks = list(job.disks.select_related("target_volume__source_disk__vm"))
        for disk in disks:
            volumes.provision(disk.target_volume, disk.capacity_bytes)
        _enter_stage(job, stages, Stage.PREPARING_MIGRATION)
        if not job.enter_stage(Stage.TRANSFER, JobStatus.REPLICATING):
            # Cancelled meanwhile: the snapshot may have been taken after
            # the cancel looked for one.
            _queue_snapshot_removal(job)
            return []
        job.beat()
        return [disk.id for disk in disks]
    return []


@contextlib.contextmanager
def _stage_reporter(job: ReplicationJob) -> Iterator[JobStageReporter]:
    stages = JobStageReporter(progress_client(), job.id, job.sync_type)
    try:
        yield stages
    finally:
        stages.close(timeout_s=2.0)


@contextlib.contextmanager
def _failing_the_job_on_error(job: ReplicationJob, stages: JobStageReporter) -> Iterator[None]:
    """A preparation step under a heartbeat; any error fails the job with
    the reason (and so cleans up what the step left, its snapshot)."""
    try:
        with Heartbeat(job, settings.HEARTBEAT_INTERVAL_S):
            yield
    except Exception as exc:
        log.exception("prepare of job %s failed", job.id)
        stages.stage(Stage.FAILED, 0, status="failed", error_message=f"prepare failed: {exc}")
        fail_job(job.id, f"prepare failed: {exc}")


def _enter_stage(job: ReplicationJob, stages: JobStageReporter, stage: Stage) -> None:
    job.set_stage(stage)
    stages.stage(stage, STAGE_PERCENT[stage])


@contextlib.contextmanager
def source_export(disk: VMDisk) -> Iterator[str]:
    """The NBD URI to read the disk from: a VMware disk as its job's snapshot
    froze it, an NBD source as it is, an image file through a read-only
    nbdkit that lives as long as the copy."""
    if disk.job.vm.source_kind == SourceKind.VMWARE:
        with vmware.snapshot_export(disk) as uri:
            yield uri
    elif is_nbd_uri(disk.source_locator):
        yield disk.source_locator
    else:
        with nbdkit.serve_file_readonly(disk.source_locator) as uri:
            yield uri


def progress_client() -> ProgressClient:
    return ProgressClient(settings.VMA_URL, settings.VMA_TOKEN, timeout_s=settings.VMA_REQUEST_TIMEOUT_S,
                          keep_alive=settings.VMA_HTTP_KEEPALIVE)


class CopyMonitor:
    """The copy loop's progress and checkpoint callbacks. Hands every update
    to the reporter (a mailbox drop: never waits on the network); at most
    every HEARTBEAT_INTERVAL_S stamps the disk's heartbeat in the database,
    which also tells whether the job ended or another run took the disk
    over: then the copy stops. Persists the engine's committed cursor, so a
    later run resumes there. A database outage shorter than
    DB_OUTAGE_TOLERANCE_S is ridden out: the data plane does not need it."""

    def __init__(self, disk: VMDisk, reporter: DiskReporter,
                 on_progress: Callable[[CopyProgress], None] | None = None):
        self.disk = disk
        self.reporter = reporter
        self.on_progress = on_progress
        self.interval_s = settings.HEARTBEAT_INTERVAL_S
        self.last_beat = time.monotonic()
        self.first_done: int | None = None  # bytes_done at this run's start (what earlier runs copied)
        self.bytes_done = 0
        self.unreachable_since: float | None = None

    @property
    def bytes_read(self) -> int:
        """Source data this run has read so far."""
        return self.bytes_done - (self.first_done or 0)

    def __call__(self, progress: CopyProgress) -> None:
        if self.first_done is None:
            self.first_done = progress.bytes_done
        self.bytes_done = progress.bytes_done
        self.reporter(progress)
        if self.on_progress is not None:
            self.on_progress(progress)
        now = time.monotonic()
        if now - self.last_beat >= self.interval_s:
            self.last_beat = now
            self.check()

    def check(self) -> None:
        try:
            alive = self.disk.beat()
            if not alive and not self.disk.holds_claim():
                raise CopySuperseded(f"{self.disk.disk_key}: this run (attempt {self.disk.attempts}) lost its claim")
            job_status = None if alive else ReplicationJob.objects.only("status").get(pk=self.disk.job_id).status
        except DatabaseError as exc:
            self._unreachable(exc)
            return
        self.unreachable_since = None
        if not alive:
            raise CopyAborted(f"job {self.disk.job_id} is {job_status}")

    def checkpoint(self, cursor: int) -> None:
        try:
            self.disk.commit_checkpoint(cursor, self.bytes_read)
        except DatabaseError as exc:
            # The previous checkpoint stays valid; only more is copied again.
            self._unreachable(exc)

    def _unreachable(self, exc: Exception) -> None:
        connection.close()  # the next query reconnects
        now = time.monotonic()
        if self.unreachable_since is None:
            self.unreachable_since = now
            log.warning("copy of %s: database unreachable (%s); copying on", self.disk, exc)
        elif now - self.unreachable_since > settings.DB_OUTAGE_TOLERANCE_S:
            raise DatabaseUnreachable(f"database unreachable for {now - self.unreachable_since:.0f} s: {exc}")


class Heartbeat:
    """Stamps a job's or disk's heartbeat from a thread while its task lives,
    so long phases without progress (provisioning volumes, starting a source
    export, mapping the extents of a large disk) never look like a lost task."""

    def __init__(self, owner: ReplicationJob | VMDisk, interval_s: float):
        self.owner = owner
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{owner}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        missed = 0  # in a row: logged when it starts and when it ends, not every beat
        try:
            while not self._stop.wait(self.interval_s):
                try:
                    self.owner.beat()
                except Exception as exc:  # a missed beat is not worth a copy
                    if not missed:
                        log.warning("heartbeat of %s not written: %s", self.owner, exc)
                    missed += 1
                    if isinstance(exc, DatabaseError):
                        connection.close()  # reconnect on the next beat
                    continue
                if missed:
                    log.warning("heartbeat of %s written again after %d missed", self.owner, missed)
                    missed = 0
        finally:
            connection.close()


def copy_disk(disk_id: int, task_id: str = "",
              on_progress: Callable[[CopyProgress], None] | None = None) -> bool:
    """Copy one disk to its target volume, reporting progress to the agent's
    progress API. A second run of the same disk (a redelivered, retried or
    requeued task) resumes from the disk's committed checkpoint. Returns True
    when this was the job's last disk to finish, so the caller enqueues
    finalize. Raises DatabaseUnreachable (or a DatabaseError) when the
    database was gone for too long: the caller retries later."""
    disk = VMDisk.objects.select_related("job__vm__vcenter", "target_volume", "source_disk").get(pk=disk_id)
    if not disk.claim(task_id, worker_id()):
        log.warning("copy of %s skipped: disk is %s (attempt %s on %s)", disk, disk.status, disk.attempts,
                    disk.worker or "no worker")
        return False
    attempt = disk.attempts
    job = disk.job
    if job.status != JobStatus.REPLICATING:
        disk.cancel(attempt=attempt)
        disk.end_attempt(CopyAttempt.Outcome.CANCELLED, reason=f"job is {job.status}")
        return False
    resume_from = disk.checkpoint_bytes
    if attempt > 1:
        log.info("copy of %s: attempt %d resumes from offset %d", disk, attempt, resume_from)
    reporter = DiskReporter(progress_client(), job.id, disk.disk_key, export_name=disk.target_volume.export_name,
                            sync_type=job.sync_type)
    monitor = CopyMonitor(disk, reporter, on_progress)
    try:
        try:
            reporter.stage(Stage.SETTING_UP_NBD)
            with Heartbeat(disk, settings.HEARTBEAT_INTERVAL_S), source_export(disk) as src_uri:
                monitor.check()
                reporter.stage(Stage.PREPARING_MIGRATION)
                areas = vmware.areas_to_copy(disk) if job.vm.source_kind == SourceKind.VMWARE else None
                result = copy_image(
                    src_uri, volumes.export_uri(disk.target_volume), extents=areas, resume_from=resume_from,
                    zero_unlisted=areas is not None and disk.sync_type == SyncType.FULL, verify=job.verify,
                    limit=RateLimit(_bandwidth_limit(job)),
                    chunk_bytes=settings.COPY_CHUNK_BYTES, connections=settings.COPY_CONNECTIONS, progress=monitor,
                    progress_interval_s=settings.PROGRESS_REPORT_INTERVAL_S,
                    checkpoint=monitor.checkpoint, checkpoint_interval_s=settings.COPY_CHECKPOINT_INTERVAL_S,
                )
        except CopySuperseded as exc:
            log.warning("copy of %s stopped: %s", disk, exc)
            disk.end_attempt(CopyAttempt.Outcome.SUPERSEDED, monitor.bytes_read, str(exc))
            return False
        except CopyAborted as exc:
            disk.cancel(attempt=attempt)
            disk.end_attempt(CopyAttempt.Outcome.CANCELLED, monitor.bytes_read, str(exc))
            reporter.finish("cancelled", error_message=str(exc))
            log.info("copy of %s stopped: %s", disk, exc)
            return False
        except (DatabaseUnreachable, DatabaseError) as exc:
            # Transient: the checkpoint is committed as far as the database
            # let us; the task retries and the next run resumes from it.
            log.warning("copy of %s interrupted, will retry: %s", disk, exc)
            connection.close()
            with contextlib.suppress(DatabaseError):
                disk.end_attempt(CopyAttempt.Outcome.RETRY, monitor.bytes_read, str(exc))
                disk.release_for_retry()
            raise
        except Exception as exc:
            if isinstance(exc, SoftTimeLimitExceeded):
                exc = CopyTimeLimit(f"copy exceeded its time limit ({copy_time_limits(disk.capacity_bytes)[0]} s)")
            log.exception("copy of %s failed", disk)
            reporter.finish("failed", error_message=str(exc))
            if disk.fail(str(exc), attempt=attempt):
                disk.end_attempt(CopyAttempt.Outcome.FAILED, monitor.bytes_read, str(exc))
                fail_job(job.id, f"{disk.disk_key}: {exc}")
            return False
        # The data is written: a database outage now is waited out rather
        # than have a retry copy the disk again.
        if not riding_out_the_database(lambda: _record_completion(disk, attempt, result)):
            # Taken over or ended meanwhile: the newer run or the job's end decides.
            riding_out_the_database(lambda: disk.end_attempt(
                CopyAttempt.Outcome.SUPERSEDED, result.bytes_read, "finished after losing its claim"))
            return False
        riding_out_the_database(lambda: disk.end_attempt(CopyAttempt.Outcome.COMPLETED, result.bytes_read))
        reporter.finish("completed", bytes_total=result.bytes_allocated, throughput_bps=result.throughput_bps)
    finally:
        reporter.close()
    log.info("copied %s: %s", disk, result.as_dict())
    return riding_out_the_database(lambda: _refresh_and_maybe_finalize(job))


def _record_completion(disk: VMDisk, attempt: int, result) -> bool:
    if disk.complete(bytes_total=result.bytes_allocated, bytes_zeroed=result.bytes_zeroed,
                     throughput_bps=result.throughput_bps, attempt=attempt):
        return True
    # A retry after an outage may find its own completion already stored
    # (the server committed it, the reply was lost).
    disk.refresh_from_db()
    return disk.status == DiskStatus.COMPLETED and disk.attempts == attempt


def _refresh_and_maybe_finalize(job: ReplicationJob) -> bool:
    job.refresh_totals()
    return job.all_disks_completed() and job.transition(JobStatus.FINALIZING, current_operation=Stage.FINALIZING)


def riding_out_the_database(step: Callable[[], T]) -> T:
    """Run a database step, retried with backoff and jitter while the
    database is unreachable, for up to DB_OUTAGE_TOLERANCE_S."""

    def reconnect(state) -> None:
        connection.close()
        log.warning("database unreachable (%s); retrying", state.outcome.exception())

    return Retrying(retry=retry_if_exception_type(DatabaseError), reraise=True, before_sleep=reconnect,
                    stop=stop_after_delay(settings.DB_OUTAGE_TOLERANCE_S),
                    wait=wait_exponential_jitter(initial=0.2, max=5))(step)


def _bandwidth_limit(job: ReplicationJob) -> int | None:
    """The tighter of the job's limit and the agent's (COPY_LIMIT_BPS)."""
    limits = [limit for limit in (job.bandwidth_limit_bps, settings.COPY_LIMIT_BPS) if limit]
    return min(limits) if limits else None


def finalize_job(job_id: str) -> None:
    """Commit what the copies produced and complete the job."""
    job = ReplicationJob.objects.select_related("vm__vcenter").get(pk=job_id)
    job.beat()
    try:
        if job.vm.source_kind == SourceKind.VMWARE:
            # Removed before anything is committed: if it cannot be, the job
            # fails and the next cycle copies these changes again.
            vmware.remove_job_snapshot(job)
        for disk in job.disks.all():
            # The changeId advances only now that the data it covers is written.
            disk.commit_change_id()
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
    cleanup_job(job)


def cancel_job(job_id: str, reason: str = "cancelled by the operator") -> bool:
    job = ReplicationJob.objects.get(pk=job_id)
    cancelled = job.cancel(reason)
    cleanup_job(job)
    return cancelled


def cleanup_job(job: ReplicationJob) -> None:
    """Release what a failed or cancelled job holds; runs on every failure and
    cancel path (fail_job, cancel_job, and so the reaper and the poller).
    Running copies notice the job's end at their next heartbeat and stop
    themselves, closing their source export (the copy's own `finally`); a
    copy whose worker died leaves an nbdkit the sweeper removes. A VMware
    job's snapshot is removed by a queued task once its copies stopped (also
    when no copy ever started)."""
    _end_unfinished_disks(job)
    _queue_snapshot_removal(job)


def _queue_snapshot_removal(job: ReplicationJob) -> None:
    """Queue the removal of the job's snapshot, once its copies have stopped
    reading it. The snapshot sweeper catches what this misses."""
    job.refresh_from_db(fields=["snapshot_moref"])
    if job.snapshot_moref:
        transaction.on_commit(lambda: enqueue_job_step("remove_job_snapshot", job.id, fail_on_error=False))


def remove_job_snapshot(job_id: str) -> None:
    """Remove an ended job's snapshot once no copy reads from it any more."""
    job = ReplicationJob.objects.select_related("vm__vcenter").get(pk=job_id)
    if not job.is_terminal:
        log.warning("snapshot removal for %s skipped: it is %s", job_id, job.status)
        return
    deadline = time.monotonic() + settings.CLEANUP_WAIT_S
    while time.monotonic() < deadline and job.disks.filter(
            status=DiskStatus.COPYING,  # a copy still alive (a dead one's heartbeat went quiet)
            heartbeat_at__gt=timezone.now() - timedelta(seconds=settings.HEARTBEAT_TIMEOUT_S)).exists():
        time.sleep(0.5)
    if job.vm.source_kind == SourceKind.VMWARE:
        vmware.remove_job_snapshot(job)


def _end_unfinished_disks(job: ReplicationJob) -> None:
    # Pending ones never start.
    for disk in job.disks.filter(status=DiskStatus.PENDING):
        disk.cancel()


def copy_time_limits(capacity_bytes: int) -> tuple[int, int]:
    """Soft and hard time limits of one disk's copy task, sized from the
    disk: a base plus its capacity at the slowest throughput still worth
    waiting for. The soft limit ends the disk cleanly with the reason."""
    soft = int(settings.COPY_TIME_LIMIT_BASE_S + capacity_bytes / settings.COPY_MIN_THROUGHPUT_BPS)
    return soft, soft + int(settings.COPY_TIME_LIMIT_GRACE_S)


def enqueue_copy(disk: VMDisk, task_id: str | None = None) -> str:
    """Queue the copy task of a disk on its agent's queue; returns the task id."""
    from replication import tasks
    from replication.routing import agent_queue

    soft, hard = copy_time_limits(disk.capacity_bytes)
    result = tasks.copy_disk.apply_async(args=[disk.pk], queue=agent_queue(disk.job.vm.agent), task_id=task_id,
                                         soft_time_limit=soft, time_limit=hard)
    return result.id


def retry_job(job_id: str) -> ReplicationJob:
    """Start the same replication again after a job failed or was cancelled."""
    job = ReplicationJob.objects.select_related("vm").get(pk=job_id)
    if job.status not in (JobStatus.FAILED, JobStatus.CANCELLED):
        raise ReplicationError(f"job {job.id} is {job.status}; only failed or cancelled jobs can be retried")
    return start_replication(job.vm, job.sync_type)


# The queue of each step of a job: its source's (prepare_source talks to
# vCenter, finalize and the snapshot's removal too) or the OMA's.
SOURCE_STEPS = {"prepare_source", "finalize_job", "remove_job_snapshot"}


def enqueue_job_step(task_name: str, job_id: str, fail_on_error: bool = True) -> None:
    """Queue a step of the job on the queue where it must run; if the broker
    cannot take it, the job fails with the reason instead of waiting forever."""
    from replication import tasks  # tasks import this module
    from replication.routing import OMA_QUEUE, source_queue

    try:
        queue = OMA_QUEUE
        if task_name in SOURCE_STEPS:
            queue = source_queue(ReplicationJob.objects.select_related("vm").get(pk=job_id).vm)
        getattr(tasks, task_name).apply_async(args=[job_id], queue=queue)
    except Exception as exc:
        log.exception("could not queue %s for job %s", task_name, job_id)
        if fail_on_error:
            fail_job(job_id, f"could not queue the job's {task_name} (is Redis running?): {exc}")



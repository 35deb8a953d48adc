"""The replication workflow on the OMA: start -> prepare (the agent takes the
snapshot of a VMware source; the OMA provisions the targets) -> every disk's
copy on the agent -> finalize (the agent removes the snapshot; the OMA
commits the changeIds). The agent reports each step's outcome by queueing
an OMA task, handled here: this module decides what happens next, the
models write and guard each status, and every error path ends the job in a
terminal status with the reason."""

from __future__ import annotations

import logging
import uuid

from django.db import transaction
from django.utils import timezone

from replication import dispatch, signals
from replication.choices import FAILOVER_OPEN, DiskStatus, FailoverKind, JobStatus, SourceKind, Stage, SyncType, VMState
from replication.models import (
    Agent,
    CopyAttempt,
    FailoverJob,
    IllegalMove,
    JobEvent,
    RecoveryPoint,
    ReplicationJob,
    VirtualMachine,
    VMContext,
    VMDisk,
)
from replication.platforms import on_cloudstack
from replication.services import agents, diagnosis, orders, points, vmware, volumes
from vma_agent import task_names
from vma_agent import vmware as vsphere
from vma_agent.contract import DiskCopied, FrozenDisk, SnapshotRemoved, SourcePrepared
from vma_agent.units import iec

log = logging.getLogger(__name__)


class ReplicationError(Exception):
    """A replication cannot start; the message is the reason."""


def _check_agent(vm: VirtualMachine, for_failover) -> None:
    """A cycle needs an agent that takes work; a live failover's own last cycle goes on."""
    if for_failover is not None:
        return
    agent = Agent.objects.filter(name=vm.agent).first()  # none recorded: as before agents were records
    if agent is not None and (refusal := agents.work_refusal(agent)):
        raise ReplicationError(f"VM {vm.name}: {refusal}")


AUTO = "auto"  # the sync type an operator asks for by default: see choose_sync_type
SYNC_CHOICES = (AUTO, SyncType.FULL.value, SyncType.INCREMENTAL.value)
# For forms: auto is incremental when a committed changeId holds, full otherwise.
SYNC_TYPE_CHOICES = [(AUTO, "Auto"), *SyncType.choices]


def _image_refusal(vm: VirtualMachine) -> str:
    return (f"VM {vm.name} is a raw image source without change tracking; only a full copy is possible "
            "(qcow2 images are copied incrementally from dirty bitmaps)")


def choose_sync_type(vm: VirtualMachine, requested: str = AUTO) -> str:
    """What an operator's request means: "auto" is incremental when every
    disk of the VM holds a committed changeId (a completed cycle's), full
    otherwise; "full" and "incremental" force it, and an incremental with
    nothing committed to start from is refused with the reason."""
    if requested not in SYNC_CHOICES:
        raise ReplicationError(f"Unknown replication type {requested!r}; use {', '.join(SYNC_CHOICES)}")
    if requested == SyncType.FULL:
        return SyncType.FULL
    tracked = vm.source_kind != SourceKind.IMAGE
    missing = [disk.disk_key for disk in vm.disks.all() if not disk.change_id]
    if requested == AUTO:
        return SyncType.INCREMENTAL if tracked and vm.disks.exists() and not missing else SyncType.FULL
    if not tracked:
        raise ReplicationError(_image_refusal(vm))
    if missing:
        raise ReplicationError(
            f"VM {vm.name} has no committed changeId for {', '.join(missing)}: an incremental copy needs a "
            "completed replication to start from; run a full one (or choose auto)")
    return SyncType.INCREMENTAL


def start_replication(vm: VirtualMachine, sync_type: str = SyncType.FULL, *, verify: bool = False,
                      overrides: list[str] | tuple[str, ...] = (),
                      bandwidth_limit_bps: int | None = None, actor: str = "operator",
                      for_failover=None) -> ReplicationJob:
    """Create the job, its disks and their target volumes in one transaction;
    the prepare task is enqueued only once that commits. The VM's lifecycle
    must allow a cycle (not under a failover); only a live failover's own
    final cycle (for_failover) runs while that failover is open."""
    if sync_type == SyncType.INCREMENTAL and vm.source_kind == SourceKind.IMAGE:
        raise ReplicationError(_image_refusal(vm))
    if bandwidth_limit_bps is not None and bandwidth_limit_bps <= 0:
        raise ReplicationError(f"bandwidth limit must be a positive number of bytes per second, not "
                               f"{bandwidth_limit_bps}")
    unknown = sorted(set(overrides) - set(vmware.OVERRIDES))
    if unknown:
        raise ReplicationError(f"unknown preflight override {', '.join(unknown)}; known: "
                               f"{', '.join(vmware.OVERRIDES)}")
    _check_agent(vm, for_failover)
    with transaction.atomic():
        # Lock the VM row so two starts for one VM cannot both pass the check.
        vm = VirtualMachine.objects.select_for_update().get(pk=vm.pk)
        active = vm.active_job()
        if active is not None:
            raise ReplicationError(f"VM {vm.name} already has an active job {active.id} ({active.status})")
        live = vm.failovers.filter(kind=FailoverKind.LIVE, status__in=FAILOVER_OPEN)
        if for_failover is not None:
            live = live.exclude(pk=for_failover.pk)
        if (failover := live.first()) is not None:
            raise ReplicationError(f"VM {vm.name} is under live failover {failover.pk} ({failover.status}); "
                                   "roll back first")
        if on_cloudstack(vm) and (test := FailoverJob.open(vm).filter(kind=FailoverKind.TEST).first()):
            raise ReplicationError(f"VM {vm.name} is paused: test failover {test.pk} boots its CloudStack volumes "
                                   "themselves; end it first")
        source_disks = list(vm.disks.all())
        if not source_disks:
            raise ReplicationError(f"VM {vm.name} has no disks")
        job = ReplicationJob.objects.create(vm=vm, sync_type=sync_type, verify=verify, overrides=sorted(overrides),
                                            bandwidth_limit_bps=bandwidth_limit_bps, vm_shape=vm.shape())
        try:
            # A cycle writes into the replica: never under a failover.
            VMContext.of(vm).move(VMState.REPLICATING, actor=actor, reason=f"replication {job.id}")
        except IllegalMove as exc:
            raise ReplicationError(str(exc)) from None
        if for_failover is not None:
            FailoverJob.objects.filter(pk=for_failover.pk).update(final_cycle=job)
        JobEvent.objects.create(job=job, status=job.status, stage=job.current_operation,
                                message=f"{sync_type} replication started by {actor}")
        for source_disk in source_disks:
            VMDisk.objects.create(
                job=job, source_disk=source_disk, target_volume=volumes.volume_for(source_disk),
                disk_key=source_disk.disk_key, capacity_bytes=source_disk.capacity_bytes,
                source_locator=source_disk.locator, previous_change_id=source_disk.change_id,
            )
        transaction.on_commit(lambda: enqueue_prepare(job.id))
    log.info("replication %s of VM %s started", job.id, vm.name)
    return job


def begin_job(job_id: str) -> bool:
    """The job's first step: it starts preparing. False when it ended
    meanwhile (cancelled while queued)."""
    job = ReplicationJob.objects.select_related("vm").get(pk=job_id)
    if not job.enter_stage(Stage.INITIALIZING, JobStatus.PREPARING):
        log.warning("prepare skipped: job %s is %s", job_id, job.status)
        return False
    job.beat()
    return True


def prepare_job(job_id: str) -> None:
    """A VMware source first needs its snapshot, which only the agent can
    take; any other source goes straight to the targets and the copies."""
    if not begin_job(job_id):
        return
    job = ReplicationJob.objects.select_related("vm__vcenter").get(pk=job_id)
    if job.vm.source_kind == SourceKind.VMWARE:
        job.set_stage(Stage.CREATING_SNAPSHOT)
        _sending(job, "the agent's prepare_source", lambda: orders.send_source_order(job))
    else:
        start_copies(job)


def source_prepared(job_id: str, outcome: SourcePrepared) -> None:
    """The agent's answer to prepare_source: the snapshot it took (recorded
    first, so every path after this removes it), per disk the changeId and
    backing file the snapshot froze; or why it failed."""
    job = ReplicationJob.objects.select_related("vm__vcenter").get(pk=job_id)
    if outcome.removed_orphans:
        ReplicationJob.snapshots_removed(outcome.removed_orphans)
    if outcome.snapshot_moref:
        # The snapshot froze the source just now: the cycle's recovery point.
        ReplicationJob.objects.filter(pk=job.pk).update(snapshot_name=outcome.snapshot_name,
                                                        snapshot_moref=outcome.snapshot_moref,
                                                        recovery_point_at=timezone.now())
        job.refresh_from_db()
    if outcome.cbt_enabled:
        VirtualMachine.objects.filter(pk=job.vm_id).update(cbt_enabled=True)
    if outcome.shape:
        # The shape the agent read as it took the snapshot: what this cycle's replica is.
        shape = vmware.with_known_ips(outcome.shape, job.vm.nics)
        ReplicationJob.objects.filter(pk=job.pk).update(vm_shape=shape)
        VirtualMachine.objects.filter(pk=job.vm_id).update(**vmware.hardware_fields(shape))
    for message in outcome.events:
        JobEvent.objects.create(job=job, status=job.status, stage=job.current_operation, message=message)
    if outcome.error:
        fail_job(job.id, outcome.error)
        return
    if job.status != JobStatus.PREPARING:
        # Ended while the snapshot was being taken: remove it. (Not so for a
        # second delivery of this outcome: its job is already copying.)
        if job.is_terminal:
            _queue_snapshot_removal(job)
        return
    try:
        frozen = outcome.disks or {}
        for disk in job.disks.all():
            _plan_disk(job, disk, frozen.get(disk.disk_key))
    except Exception as exc:
        fail_job(job.id, f"prepare failed: {exc}")
        return
    start_copies(job)


def _plan_disk(job: ReplicationJob, disk: VMDisk, frozen: FrozenDisk | None) -> None:
    """Full or incremental, from the committed changeId and the snapshot's."""
    if frozen is None:
        raise vsphere.VSphereError(f"the snapshot has no {disk.disk_key}")
    change_id = frozen.change_id or ""
    if not change_id:
        raise vsphere.VSphereError(f"{disk.disk_key} has no changeId in the snapshot: changed block tracking "
                                   "is not working on it")
    previous = disk.previous_change_id
    sync_type, reason = SyncType.FULL, ""
    if job.sync_type == SyncType.INCREMENTAL:
        if not previous:
            reason = "no committed changeId yet: the first copy is full"
        elif vsphere.change_id_epoch(previous) != vsphere.change_id_epoch(change_id):
            reason = f"changed block tracking was reset (changeId {previous} -> {change_id}): full copy"
        else:
            sync_type = SyncType.INCREMENTAL
    VMDisk.objects.filter(pk=disk.pk).update(change_id=change_id, sync_type=sync_type, full_copy_reason=reason,
                                             source_locator=frozen.backing_file or disk.source_locator)
    if reason:
        JobEvent.objects.create(job=job, status=job.status, stage=job.current_operation,
                                message=f"{disk.disk_key}: {reason}")


def _plan_bitmap_disk(job: ReplicationJob, disk: VMDisk) -> None:
    """A qcow2 disk: this cycle's dirty bitmap (its change id once
    committed) and, for an incremental, the committed one it copies."""
    sync_type, reason = SyncType.FULL, ""
    if job.sync_type == SyncType.INCREMENTAL:
        if disk.previous_change_id:
            sync_type = SyncType.INCREMENTAL
        else:
            reason = "no committed dirty bitmap yet: the first copy is full"
    disk.change_id, disk.sync_type, disk.full_copy_reason = f"oma-{job.id}", sync_type, reason
    VMDisk.objects.filter(pk=disk.pk).update(change_id=disk.change_id, sync_type=sync_type, full_copy_reason=reason)
    if reason:
        JobEvent.objects.create(job=job, status=job.status, stage=job.current_operation,
                                message=f"{disk.disk_key}: {reason}")


def start_copies(job: ReplicationJob) -> None:
    """Provision and export every target volume, enter Transfer, and hand
    every disk's copy to the agent."""
    try:
        job.set_stage(Stage.SETTING_UP_NBD)
        disks = list(job.disks.select_related("target_volume__source_disk__vm"))
        for disk in disks:
            volumes.provision(disk.target_volume, disk.capacity_bytes)
            job.beat()  # a cloud's volume calls take their time: still alive
        job.set_stage(Stage.PREPARING_MIGRATION)
    except Exception as exc:
        log.exception("prepare of job %s failed", job.id)
        fail_job(job.id, f"prepare failed: {exc}")
        return
    if not job.enter_stage(Stage.TRANSFER, JobStatus.REPLICATING):
        if job.is_terminal:
            _queue_snapshot_removal(job)  # ended meanwhile
        return
    if job.vm.source_kind == SourceKind.QCOW2:
        for disk in disks:
            _plan_bitmap_disk(job, disk)
    # A source without a snapshot (an image) is read as it is from now on.
    ReplicationJob.objects.filter(pk=job.pk, recovery_point_at__isnull=True).update(recovery_point_at=timezone.now())
    job.beat()
    for disk in disks:
        dispatch_copy(disk)


def dispatch_copy(disk: VMDisk, *, taking_over: bool = False) -> bool:
    """Number a new copy run of the disk and send its work order to the
    agent; False when the disk was not in the state read (someone else
    moved it meanwhile)."""
    if not disk.start_attempt(str(uuid.uuid4()), taking_over=taking_over):
        return False
    try:
        # The cycle's own layer of the volume (served again after an OMA restart).
        uri = points.open_layer(disk)
    except Exception as exc:
        log.exception("the layer of %s could not be opened", disk)
        fail_job(disk.job_id, f"{disk.disk_key}: its layer of the target volume cannot be opened: {exc}")
        return False
    VMDisk.objects.filter(pk=disk.pk).update(target_uri=uri)
    disk = VMDisk.objects.select_related("job__vm__vcenter", "target_volume", "source_disk").get(pk=disk.pk)
    if disk.job.is_terminal:
        points.discard(disk.job)  # it ended while the layer opened: fenced again
        return False
    return _sending(disk.job, f"the copy of {disk.disk_key}", lambda: orders.send_copy(disk))


def disk_copied(job_id: str, disk_key: str, attempt: int, outcome: DiskCopied) -> None:
    """The agent's outcome of one copy run. Only the disk's newest run may
    end it; an older run's outcome closes that run's record and nothing else."""
    disk = VMDisk.objects.select_related("job").get(job_id=job_id, disk_key=disk_key)
    status = outcome.status
    run = {"worker": outcome.worker, "bytes_read": outcome.bytes_read or 0,
           "checkpoint_bytes": outcome.checkpoint_bytes or 0, "last_seen_at": timezone.now()}
    if outcome.resume_from is not None:
        run["resumed_from"] = outcome.resume_from  # the agent may know a later cursor than the order did
    reason = outcome.reason or ""
    if status == "duplicate":
        log.warning("copy of %s: a duplicate delivery of attempt %d did nothing (%s)", disk, attempt, reason)
        return
    if resumed := resume_note(disk_key, attempt, outcome):
        job = disk.job
        JobEvent.objects.create(job=job, status=job.status, stage=job.current_operation, message=resumed)
        log.info("job %s: %s", job_id, resumed)
    if status == "completed":
        done = disk.complete(bytes_total=outcome.bytes_total, bytes_zeroed=outcome.bytes_zeroed,
                             throughput_bps=outcome.throughput_bps, attempt=attempt)
        disk.end_attempt(attempt, CopyAttempt.Outcome.COMPLETED if done else CopyAttempt.Outcome.SUPERSEDED,
                         reason="" if done else "finished after losing its claim", **run)
        if done or (disk.status == DiskStatus.COMPLETED and disk.attempts == attempt):
            _maybe_finalize(disk.job)
        return
    if status == "failed":
        if disk.fail(diagnosis.operator_text(reason), attempt=attempt):
            disk.end_attempt(attempt, CopyAttempt.Outcome.FAILED, reason=reason, **run)
            fail_job(job_id, f"{disk_key}: {reason}")
        else:
            disk.end_attempt(attempt, CopyAttempt.Outcome.SUPERSEDED, reason=reason, **run)
        return
    if status == "cancelled":
        disk.cancel(attempt=attempt)
        disk.end_attempt(attempt, CopyAttempt.Outcome.CANCELLED, reason=reason, **run)
        return
    disk.end_attempt(attempt, CopyAttempt.Outcome.SUPERSEDED, reason=reason, **run)


def resume_note(disk_key: str, attempt: int, outcome: DiskCopied) -> str:
    """The timeline's line for a run that resumed: from which offset and why
    (the agent's own recorded checkpoint), and what comparing the data below
    it with the source found; "" for a run that started at 0."""
    checkpoint = outcome.checkpoint_resumed
    if not checkpoint:
        return ""
    why = outcome.resume_reason or "a recorded checkpoint"
    differed = outcome.resume_differed_at
    if differed is not None:
        return (f"{disk_key}: attempt {attempt} found the checkpoint at offset {checkpoint} ({iec(checkpoint)}; "
                f"{why}), but the target differed from the source at offset {differed} ({iec(differed)}): copied "
                "again from there")
    note = f"{disk_key}: attempt {attempt} resumed from offset {checkpoint} ({iec(checkpoint)}): {why}"
    if outcome.resume_compared is not None:
        note += f"; the {iec(outcome.resume_compared)} of data below it compared equal with the source"
    return note


def _maybe_finalize(job: ReplicationJob) -> None:
    job.refresh_totals()
    if job.all_disks_completed() and job.transition(JobStatus.FINALIZING, current_operation=Stage.FINALIZING):
        finalize_job(job.id)


def finalize_job(job_id: str) -> None:
    """Every disk is written. A VMware job's snapshot is removed first (by
    its agent), and only then are the changeIds committed: if it cannot be
    removed, the job fails and the next cycle copies these changes again."""
    job = ReplicationJob.objects.select_related("vm__vcenter").get(pk=job_id)
    job.beat()
    if job.vm.source_kind == SourceKind.VMWARE and job.snapshot_moref:
        _sending(job, "the agent's snapshot removal", lambda: orders.send_snapshot_removal(job, finalize=True))
    else:
        commit_and_complete(job)


def snapshot_removed(job_id: str, snapshot_moref: str, finalize: bool, outcome: SnapshotRemoved) -> None:
    job = ReplicationJob.objects.get(pk=job_id)
    if outcome.removed:
        ReplicationJob.snapshots_removed([snapshot_moref], job_id=job.pk)
    if not finalize:
        return
    if outcome.error:
        fail_job(job_id, f"finalize failed: {outcome.error}")
    else:
        commit_and_complete(job)


def commit_and_complete(job: ReplicationJob) -> None:
    """Seal the cycle's layers, then commit the changeIds, record the
    recovery point, complete the job and move the VM's state in one
    transaction: nobody sees a completed job without its point, or whose VM
    still replicates. A seal that fails fails the job (its layers are
    discarded, the changeIds stay, the next cycle copies these changes again)."""
    if job.status != JobStatus.FINALIZING:
        log.warning("finalize of %s skipped: it is %s", job.id, job.status)  # a second delivery
        return
    try:
        sealed = points.seal_layers(job)
        with transaction.atomic():
            for disk in job.disks.all():
                # The changeId advances only now that the data it covers is written.
                disk.commit_change_id()
            completed = job.complete()
            if completed:
                point = points.record(job, sealed)
                VMContext.of(job.vm).move(VMState.READY_FOR_FAILOVER, actor="system",
                                          reason=f"replication {job.id} completed: recovery point {point.pk}",
                                          only_from={VMState.REPLICATING})
                signals.cycle_ended.send(sender=ReplicationJob, cycle=job)
                transaction.on_commit(lambda: enqueue_job_ended(job.id))
                points.enqueue_retention(job.vm)
        if not completed:
            log.warning("finalize of %s found it %s", job.id, job.status)
    except Exception as exc:
        log.exception("finalize of job %s failed", job.id)
        fail_job(job.id, f"finalize failed: {exc}")


def fail_job(job_id: str, reason: str) -> bool:
    """End the job as failed (if it is not already terminal) and clean up;
    the job's end and the VM's state move together. Whether this call
    failed it (False: it had already ended)."""
    reason = diagnosis.operator_text(reason, f"job {job_id}")
    with transaction.atomic():
        job = ReplicationJob.objects.get(pk=job_id)
        failed = job.fail(reason)
        cleanup_job(job, reason)
    return failed


def cancel_job(job_id: str, reason: str = "", *, actor: str | None = None) -> bool:
    """Cancel the job for `actor` (a user or os:NAME): the reason recorded
    on its timeline and the VM's history say who."""
    reason = reason or (f"cancelled by {actor}" if actor else "cancelled by the operator")
    with transaction.atomic():
        job = ReplicationJob.objects.get(pk=job_id)
        cancelled = job.cancel(reason)
        cleanup_job(job, reason, actor=actor or "system")
    return cancelled


def cleanup_job(job: ReplicationJob, reason: str = "", *, actor: str = "system") -> None:
    """Release what a failed or cancelled job holds; runs on every failure and
    cancel path (fail_job, cancel_job, and so the reaper). Pending disks end;
    the agent is asked to stop the job's copies, which close their source
    exports and report "cancelled"; a VMware job's snapshot is removed by
    the agent once no copy reads it (also when no copy ever started)."""
    for disk in job.disks.filter(status=DiskStatus.PENDING):
        disk.cancel()
    # The fence: the cycle's exports close and its layers go, so a copy that
    # goes on writing (an agent cut off from us) lands nowhere.
    transaction.on_commit(lambda: _discard_layers(job))
    _settle_vm_state(job, reason, actor)
    signals.cycle_ended.send(sender=ReplicationJob, cycle=job)
    transaction.on_commit(lambda: enqueue_job_ended(job.id))
    if job.disks.filter(status=DiskStatus.COPYING).exists():
        transaction.on_commit(lambda: orders.request_stop(job, reason or f"job {job.status}"))
    _queue_snapshot_removal(job)


def _discard_layers(job: ReplicationJob) -> None:
    for line in points.discard(job):
        log.info("job %s: %s", job.id, line)


def _settle_vm_state(job: ReplicationJob, reason: str, actor: str = "system") -> None:
    """A cycle that ended without completing left every recovery point as it
    was: a VM with one is ready for failover. Without one (the first cycle
    writes its volumes in place), once any disk started copying the volumes
    hold part of a copy and are no point in time (failed, until a cycle
    completes); before that the VM's state is as it was. A late clean-up of
    an old job never touches the state of the VM's next cycle."""
    if job.vm.active_job() is not None:
        return
    context = VMContext.of(job.vm)
    if RecoveryPoint.newest(job.vm) is not None:
        to = VMState.READY_FOR_FAILOVER
    elif job.disks.filter(attempts__gt=0).exists():
        to = VMState.FAILED
    else:
        to = context.state_before_replicating()
    try:
        context.move(to, actor=actor, reason=f"replication {job.id} {job.status}: {reason}"[:2000],
                     only_from={VMState.REPLICATING})
    except IllegalMove as exc:
        log.info("VM state of %s left as it is: %s", job.vm, exc)


def _queue_snapshot_removal(job: ReplicationJob) -> None:
    """The snapshot sweeper catches what this misses."""
    job = ReplicationJob.objects.select_related("vm__vcenter").get(pk=job.pk)
    if job.snapshot_moref and job.vm.source_kind == SourceKind.VMWARE:
        # Only logged if it cannot be sent: the job has ended already.
        transaction.on_commit(lambda: dispatch.attempt("the agent's snapshot removal",
                                                       lambda: orders.send_snapshot_removal(job, finalize=False),
                                                       subject=f"job {job.id}"))


def retry_job(job_id: str, actor: str = "system") -> ReplicationJob:
    """Start the same replication again after a job failed or was cancelled."""
    job = ReplicationJob.objects.select_related("vm").get(pk=job_id)
    if job.status not in (JobStatus.FAILED, JobStatus.CANCELLED):
        raise ReplicationError(f"job {job.id} is {job.status}; only failed or cancelled jobs can be retried")
    return start_replication(job.vm, job.sync_type, actor=actor)


def enqueue_job_ended(job_id: str) -> None:
    """Scheduled protection hears of every cycle's end (retries, its freed
    slot). Only logged if it cannot be sent: the next schedule tick admits anyway."""
    dispatch.enqueue(task_names.JOB_ENDED, [job_id], what=f"the end of job {job_id}", subject="the scheduler")


def enqueue_prepare(job_id: str) -> None:
    """Queue the job's first step on the OMA; if the broker cannot take it,
    the job fails with the reason instead of waiting forever."""
    dispatch.enqueue(task_names.PREPARE_JOB, [job_id], what="the job's prepare_job", subject=f"job {job_id}",
                     on_failure=lambda reason: fail_job(job_id, reason))


def _sending(job: ReplicationJob, what: str, send) -> bool:
    """Send the agent an order for the job; if it is refused or cannot be
    queued, the job fails with the reason (nobody would ever answer it)."""
    return dispatch.attempt(what, send, subject=f"job {job.id}", on_failure=lambda reason: fail_job(job.id, reason))

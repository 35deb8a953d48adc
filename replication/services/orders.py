"""Work orders for the agents, built from the OMA's rows, and how they reach
an agent: its Celery queue for work (by task name: the OMA never imports the
agent's tasks), its progress API to stop a job. The agent never reads the
database; everything it needs is in the order."""

from __future__ import annotations

import logging

from django.conf import settings

from replication import dispatch
from replication.choices import SourceKind, SyncType
from replication.models import ReplicationJob, VCenter, VMDisk
from replication.services import agents, allowlist, volumes
from vma_agent import task_names
from vma_agent.client import ProgressClient
from vma_agent.contract import CopyOrder, PowerOrder, SnapshotRef, SnapshotRemovalOrder, SourceOrder, VCenterRef
from vma_agent.task_names import agent_queue

log = logging.getLogger(__name__)


def vcenter_ref(vcenter: VCenter) -> VCenterRef:
    """The vCenter as orders carry it; a password reference outside what the
    settings allow (a record edited behind the checks) raises NotAllowed."""
    allowlist.check_password_ref(vcenter.password_file, vcenter.password_env)
    return VCenterRef(name=vcenter.name, host=vcenter.host, port=vcenter.port, username=vcenter.username,
                      thumbprint=vcenter.thumbprint, password_file=vcenter.password_file,
                      password_env=vcenter.password_env)


def source_order(job: ReplicationJob) -> SourceOrder:
    vm = job.vm
    return SourceOrder(job_id=job.id, sync_type=job.sync_type, vcenter=vcenter_ref(vm.vcenter), vm_moref=vm.moref,
                       vm_name=vm.name, overrides=list(job.overrides),
                       disks=[{"disk_key": d.disk_key, "capacity_bytes": d.capacity_bytes} for d in job.disks.all()])


def copy_order(disk: VMDisk) -> CopyOrder:
    """The order of the disk's current attempt (start_attempt numbered it)."""
    job = disk.job
    snapshot = None
    if job.vm.source_kind == SourceKind.VMWARE:
        snapshot = SnapshotRef(
            vcenter=vcenter_ref(job.vm.vcenter), vm_moref=job.vm.moref, snapshot_moref=job.snapshot_moref,
            device_key=disk.source_disk.device_key,
            # The backing file as the snapshot records it: what VDDK opens.
            backing_file=disk.source_locator,
            against_change_id=disk.previous_change_id if disk.sync_type == SyncType.INCREMENTAL else "*",
        )
    source_locator = ""
    if snapshot is None:
        # Checked again now: the path allowed at registration may lead
        # elsewhere today (a file swapped for a symlink). The agent opens
        # the real path found here. A missing file is the copy's to report.
        source_locator = allowlist.check_source(disk.source_locator, must_exist=False)
    bitmaps = {}
    if job.vm.source_kind == SourceKind.QCOW2:
        bitmaps = {"bitmap_new": disk.change_id,
                   "bitmap_base": disk.previous_change_id if disk.sync_type == SyncType.INCREMENTAL else ""}
    return CopyOrder(
        job_id=job.id, disk_key=disk.disk_key, attempt=disk.attempts, export_name=disk.target_volume.export_name,
        source_locator=source_locator, target_uri=disk.target_uri or volumes.export_uri(disk.target_volume),
        capacity_bytes=disk.capacity_bytes, sync_type=disk.sync_type, resume_from=disk.checkpoint_bytes,
        verify=job.verify, limit_bps=job.bandwidth_limit_bps, snapshot=snapshot, **bitmaps,
    )


def snapshot_removal_order(job: ReplicationJob, finalize: bool) -> SnapshotRemovalOrder:
    return SnapshotRemovalOrder(job_id=job.id, vcenter=vcenter_ref(job.vm.vcenter),
                                snapshot_moref=job.snapshot_moref, finalize=finalize)


def readable(job: ReplicationJob, *what: str) -> str:
    """How Flower and the worker logs show an order: job, VM and what it is
    about, instead of the whole order."""
    return "(" + ", ".join([f"job {job.id}", f"VM {job.vm.name}", *what]) + ")"


def copy_time_limits(capacity_bytes: int) -> tuple[int, int]:
    """Soft and hard time limits of one disk's copy task, sized from the
    disk: a base plus its capacity at the slowest throughput still worth
    waiting for. The soft limit ends the disk cleanly with the reason."""
    soft = int(settings.COPY_TIME_LIMIT_BASE_S + capacity_bytes / settings.COPY_MIN_THROUGHPUT_BPS)
    return soft, soft + int(settings.COPY_TIME_LIMIT_GRACE_S)


def send_copy(disk: VMDisk) -> None:
    soft, hard = copy_time_limits(disk.capacity_bytes)
    job = disk.job
    dispatch.publish(task_names.COPY_DISK, [copy_order(disk).as_dict()], queue=agent_queue(job.vm.agent),
                     task_id=disk.celery_task_id or None, soft_time_limit=soft, time_limit=hard,
                     argsrepr=readable(job, disk.disk_key, f"attempt {disk.attempts}"))


def send_source_order(job: ReplicationJob) -> None:
    dispatch.publish(task_names.PREPARE_SOURCE, [source_order(job).as_dict()], queue=agent_queue(job.vm.agent),
                     argsrepr=readable(job, job.sync_type))


def send_snapshot_removal(job: ReplicationJob, finalize: bool) -> None:
    dispatch.publish(task_names.REMOVE_SNAPSHOT, [snapshot_removal_order(job, finalize).as_dict()],
                     queue=agent_queue(job.vm.agent), argsrepr=readable(job, f"snapshot {job.snapshot_moref}"))


def power_order(failover, action: str, timeout_s: float) -> PowerOrder:
    vm = failover.vm
    return PowerOrder(failover_id=failover.pk, action=action, vcenter=vcenter_ref(vm.vcenter), vm_moref=vm.moref,
                      vm_name=vm.name, timeout_s=timeout_s)


def send_power(failover, action: str, timeout_s: float) -> None:
    """A failover's power order for its source, to the VM's agent."""
    dispatch.publish(task_names.POWER_SOURCE, [power_order(failover, action, timeout_s).as_dict()],
                     queue=agent_queue(failover.vm.agent),
                     argsrepr=f"({failover.kind} failover {failover.pk}, VM {failover.vm.name}, {action})")


def agent_client(job: ReplicationJob) -> ProgressClient:
    """The client of the API of the agent that copies the job's VM."""
    return agents.client(agents.of_vm(job.vm))


def request_stop(job: ReplicationJob, reason: str) -> bool:
    """Ask the job's agent to stop its copies (they stop at their next check,
    within a heartbeat interval). An agent that cannot be asked finishes its
    copies; their outcomes are refused, as the job has ended."""
    try:
        agent_client(job).stop(job.id, reason)
    except Exception as exc:  # noqa: BLE001 - the job has ended either way
        log.warning("could not ask the agent to stop job %s: %s", job.id, exc)
        return False
    return True

"""VMware sources: vCenter records, discovery, preflight, CBT, the job's
snapshot and its changed areas, and the orphan-snapshot sweeper."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.utils import timezone
from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

from replication.choices import JOB_ACTIVE, SourceKind, SyncType
from replication.models import JobEvent, ReplicationJob, SourceDisk, VCenter, VirtualMachine, VMDisk
from vma_agent import vmware
from vma_agent.snapshot_sources import ImageDirSource, SnapshotDisk, VddkSource, password_file
from vma_agent.vmware import VCenterConnection, VSphereClient, VSphereError

log = logging.getLogger(__name__)

OVERRIDES = vmware.OVERRIDES


class VCenterConfigError(Exception):
    """A vCenter record cannot be used; the message says why."""


class PreflightError(Exception):
    """The VM cannot be replicated as it is; the message lists the blockers."""


# vCenter records ------------------------------------------------------------

def read_password(vcenter: VCenter) -> str:
    if vcenter.password_file:
        try:
            return Path(vcenter.password_file).read_text().rstrip("\r\n")
        except OSError as exc:
            raise VCenterConfigError(f"cannot read the password of vCenter {vcenter.name} from "
                                     f"{vcenter.password_file}: {exc.strerror}") from None
    if vcenter.password_env:
        value = os.environ.get(vcenter.password_env)
        if value is None:
            raise VCenterConfigError(f"the password of vCenter {vcenter.name} is expected in the environment "
                                     f"variable {vcenter.password_env}, which is not set")
        return value
    raise VCenterConfigError(f"vCenter {vcenter.name} has neither a password file nor a password variable")


def connection_for(vcenter: VCenter) -> VCenterConnection:
    return VCenterConnection(host=vcenter.host, port=vcenter.port, username=vcenter.username,
                             password=read_password(vcenter), thumbprint=vcenter.thumbprint)


def client_for(vcenter: VCenter) -> VSphereClient:
    return VSphereClient(connection_for(vcenter), timeout_s=settings.VCENTER_TIMEOUT_S)


def register_vcenter(name: str, host: str, username: str, thumbprint: str, *, port: int = 443,
                     password_file: str = "", password_env: str = "", check: bool = True) -> VCenter:
    """Record a vCenter; with `check`, log in first so a wrong password or
    thumbprint is refused now rather than in the middle of a job."""
    name = name.strip()
    if not name:
        raise VCenterConfigError("the vCenter needs a name")
    if bool(password_file) == bool(password_env):
        raise VCenterConfigError("give exactly one of a password file or a password environment variable")
    if password_file and not Path(password_file).is_absolute():
        raise VCenterConfigError(f"the password file must be an absolute path: {password_file}")
    digits = thumbprint.replace(":", "")
    if len(digits) != 40 or any(c not in "0123456789abcdefABCDEF" for c in digits):
        raise VCenterConfigError(f"thumbprint {thumbprint!r} is not a SHA-1 thumbprint (40 hex digits)")
    vcenter = VCenter(name=name, host=host, port=port, username=username, password_file=password_file,
                      password_env=password_env, thumbprint=vmware.normalize_thumbprint(thumbprint))
    if VCenter.objects.filter(name=name).exists():
        raise VCenterConfigError(f"a vCenter named {name!r} already exists")
    if check:
        with client_for(vcenter):
            pass
    vcenter.save()
    return vcenter


# Discovery ------------------------------------------------------------------

def discover(vcenter: VCenter, names: list[str] | None = None, agent: str = "local") -> list[VirtualMachine]:
    """Record the vCenter's VMs (or the named ones) with their disks, NICs,
    firmware, guest OS, power state, CBT state and snapshots."""
    with client_for(vcenter) as client:
        found = client.inventory(names)
    return [_record_vm(vcenter, info, agent) for info in found]


@transaction.atomic
def _record_vm(vcenter: VCenter, info: vmware.VMInfo, agent: str) -> VirtualMachine:
    clash = VirtualMachine.objects.filter(name=info.name).exclude(vcenter=vcenter, moref=info.moref).first()
    if clash is not None:
        raise VCenterConfigError(f"VM {info.name} ({info.moref}) clashes with the recorded VM {clash.name} "
                                 f"({clash.source_kind} {clash.moref or ''}); rename one of them")
    found = dict(name=info.name, source_kind=SourceKind.VMWARE, vm_uuid=info.uuid, cbt_enabled=info.cbt_enabled,
                 power_state=info.power_state, firmware=info.firmware, guest_os=info.guest_os, nics=info.nics,
                 snapshots=[{"name": s.name, "moref": s.moref} for s in info.snapshots],
                 discovered_at=timezone.now())
    # A rediscovery keeps the agent the operator chose.
    vm, created = VirtualMachine.objects.update_or_create(
        vcenter=vcenter, moref=info.moref, defaults=found, create_defaults={**found, "agent": agent})
    for disk in info.disks:
        SourceDisk.objects.update_or_create(
            vm=vm, disk_key=disk.disk_key,
            defaults=dict(locator=disk.backing_file, capacity_bytes=disk.capacity_bytes, device_key=disk.key,
                          unit_number=disk.unit_number, backing_file=disk.backing_file, disk_mode=disk.disk_mode,
                          sharing=disk.sharing, is_rdm=disk.is_rdm, discovered_change_id=disk.change_id),
        )
    # Disks removed on vCenter: forget those no job ever copied; the others
    # stay for their history and make the next job's preflight say so.
    vm.disks.exclude(disk_key__in=[d.disk_key for d in info.disks]).filter(job_disks__isnull=True).delete()
    log.info("%s VM %s (%s) with %d disks", "discovered" if created else "updated", vm.name, vm.moref,
             len(info.disks))
    return vm


# The job's snapshot ---------------------------------------------------------

def prepare_snapshot(job: ReplicationJob, on_snapshot_stage: Callable[[], None]) -> str:
    """Preflight, CBT, then the job's snapshot; decides per disk between a
    full and an incremental copy from the changeIds. The snapshot's moref is
    stored on the job as soon as it exists, so every failure path after
    that removes it. Returns the snapshot's moref."""
    vm = job.vm
    with client_for(vm.vcenter) as client:
        info = client.vm_info(vm.moref)
        _remove_orphans(client, vm, info)
        blockers = vmware.preflight_blockers(info, set(job.overrides))
        missing = client.missing_privileges(vm.moref)
        if missing:
            blockers.append(f"the vCenter user lacks privileges {', '.join(missing)}")
        disks = {d.disk_key: d for d in info.disks}
        for disk in job.disks.all():
            live = disks.get(disk.disk_key)
            if live is None:
                blockers.append(f"{disk.disk_key} is no longer on the VM; run discover again")
            elif live.capacity_bytes != disk.capacity_bytes:
                blockers.append(f"{disk.disk_key} is now {live.capacity_bytes} bytes, not {disk.capacity_bytes}; "
                                "run discover again")
        if blockers:
            raise PreflightError("preflight: " + "; ".join(blockers))
        if not info.cbt_enabled or any(not d.change_id for d in info.disks):
            client.enable_change_tracking(vm.moref)
            VirtualMachine.objects.filter(pk=vm.pk).update(cbt_enabled=True)
            JobEvent.objects.create(job=job, status=job.status, stage=job.current_operation,
                                    message="changed block tracking enabled on the VM")
        on_snapshot_stage()
        name = vmware.snapshot_name(job.id)
        moref = client.create_snapshot(vm.moref, name, f"Replication job {job.id}")
        ReplicationJob.objects.filter(pk=job.pk).update(snapshot_name=name, snapshot_moref=moref)
        frozen = {d.disk_key: d for d in client.snapshot_disks(moref)}
    for disk in job.disks.all():
        _plan_disk(job, disk, frozen.get(disk.disk_key))
    return moref


def _plan_disk(job: ReplicationJob, disk: VMDisk, frozen: vmware.DiskInfo | None) -> None:
    if frozen is None:
        raise VSphereError(f"the snapshot has no {disk.disk_key}")
    if not frozen.change_id:
        raise VSphereError(f"{disk.disk_key} has no changeId in the snapshot: changed block tracking is not "
                           "working on it")
    previous = disk.previous_change_id
    sync_type, reason = SyncType.FULL, ""
    if job.sync_type == SyncType.INCREMENTAL:
        if not previous:
            reason = "no committed changeId yet: the first copy is full"
        elif vmware.change_id_epoch(previous) != vmware.change_id_epoch(frozen.change_id):
            reason = (f"changed block tracking was reset (changeId {previous} -> {frozen.change_id}): "
                      "full copy")
        else:
            sync_type = SyncType.INCREMENTAL
    VMDisk.objects.filter(pk=disk.pk).update(change_id=frozen.change_id, sync_type=sync_type,
                                             full_copy_reason=reason, source_locator=frozen.backing_file)
    if reason:
        JobEvent.objects.create(job=job, status=job.status, stage=job.current_operation,
                                message=f"{disk.disk_key}: {reason}")


def areas_to_copy(disk: VMDisk) -> list[tuple[int, int]]:
    """The areas of the snapshot's disk to copy: changed since the committed
    changeId, or every allocated area for a full copy."""
    job, vm = disk.job, disk.job.vm
    against = disk.previous_change_id if disk.sync_type == SyncType.INCREMENTAL else "*"
    with client_for(vm.vcenter) as client:
        return client.changed_areas(vm.moref, job.snapshot_moref, disk.source_disk.device_key, disk.capacity_bytes,
                                    against)


@contextlib.contextmanager
def snapshot_export(disk: VMDisk) -> Iterator[str]:
    """An NBD export of the disk as the job's snapshot froze it."""
    job, vm = disk.job, disk.job.vm
    # The backing file as the snapshot records it (prepare stored it as the
    # disk's locator): what VDDK opens together with the snapshot's moref.
    snapshot_disk = SnapshotDisk(vcenter=vm.vcenter.name, vm_moref=vm.moref, snapshot_moref=job.snapshot_moref,
                                 device_key=disk.source_disk.device_key, backing_file=disk.source_locator)
    if settings.VMA_SNAPSHOT_SOURCE == "image-dir":
        with ImageDirSource(settings.VMA_SNAPSHOT_IMAGE_DIR).serve(snapshot_disk) as uri:
            yield uri
        return
    with _password_file_of(vm.vcenter) as secret:
        source = vddk_source(vm.vcenter, secret)
        with source.serve(snapshot_disk) as uri:
            yield uri


def vddk_source(vcenter: VCenter, secret_file: str) -> VddkSource:
    return VddkSource(libdir=settings.VMA_VDDK_LIBDIR, server=vcenter.host, port=vcenter.port,
                      username=vcenter.username, thumbprint=vcenter.thumbprint, password_file=secret_file,
                      transports=settings.VMA_VDDK_TRANSPORTS)


@contextlib.contextmanager
def _password_file_of(vcenter: VCenter) -> Iterator[str]:
    if vcenter.password_file:
        yield vcenter.password_file
    else:
        with password_file(read_password(vcenter)) as path:
            yield path


@retry(retry=retry_if_exception_type(VSphereError), stop=stop_after_attempt(3),
       wait=wait_exponential_jitter(initial=1, max=10), reraise=True)
def remove_job_snapshot(job: ReplicationJob) -> bool:
    """Remove the job's snapshot if it still exists; True if one was removed."""
    job.refresh_from_db(fields=["snapshot_moref"])
    if not job.snapshot_moref:
        return False
    with client_for(job.vm.vcenter) as client:
        client.remove_snapshot(job.snapshot_moref)
    ReplicationJob.objects.filter(pk=job.pk).update(snapshot_moref="")
    log.info("job %s: snapshot %s removed", job.id, job.snapshot_moref)
    return True


# Orphans --------------------------------------------------------------------

def _remove_orphans(client: VSphereClient, vm: VirtualMachine, info: vmware.VMInfo) -> list[str]:
    """Our snapshots on the VM whose job is no longer running."""
    ours = {s.name: s for s in info.snapshots if vmware.job_of_snapshot(s.name) is not None}
    active = set()
    if vm.pk is not None:
        active = set(ReplicationJob.objects.filter(vm=vm, status__in=JOB_ACTIVE)
                     .values_list("snapshot_moref", flat=True))
    removed = []
    for name, snapshot in ours.items():
        if snapshot.moref in active:
            continue
        client.remove_snapshot(snapshot.moref)
        ReplicationJob.objects.filter(snapshot_moref=snapshot.moref).update(snapshot_moref="")
        log.warning("removed orphaned snapshot %s (%s) of VM %s", name, snapshot.moref, vm.name)
        removed.append(f"{vm.name}/{name}")
    info.snapshots = [s for s in info.snapshots if s.name not in ours or s.moref in active]
    return removed


def sweep_snapshots(vcenter: VCenter) -> list[str]:
    """Remove every snapshot of ours on the vCenter whose job is not running
    (its name says which job made it); returns "vm/snapshot" for each."""
    removed = []
    with client_for(vcenter) as client:
        for info in client.inventory():
            vm = VirtualMachine.objects.filter(vcenter=vcenter, moref=info.moref).first()
            if vm is None:
                vm = VirtualMachine(name=info.name)  # unknown here: nothing of it is active
            removed += _remove_orphans(client, vm, info)
    return removed

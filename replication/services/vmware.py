"""VMware sources on the OMA: vCenter records, discovery and the
orphan-snapshot sweeper. A job's snapshot, changed areas and copies are the
agent's (vma_agent.steps), from work orders."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from replication import names
from replication.choices import JOB_ACTIVE, SourceKind
from replication.models import ReplicationJob, SourceDisk, VCenter, VirtualMachine
from replication.services import agents, diagnosis
from replication.services.allowlist import NotAllowed, check_password_ref
from replication.services.orders import vcenter_ref
from vma_agent import vmware
from vma_agent.contract import OrderError
from vma_agent.vmware import VCenterConnection, VSphereClient, VSphereError  # noqa: F401 - callers catch it here

log = logging.getLogger(__name__)

OVERRIDES = vmware.OVERRIDES


class VCenterConfigError(Exception):
    """A vCenter record cannot be used; the message says why."""


# vCenter records ------------------------------------------------------------

def read_password(vcenter: VCenter) -> str:
    """The password from where the record says (read here on the OMA, for
    discovery; the agent reads it the same way from its own work order)."""
    try:
        return vcenter_ref(vcenter).password()
    except (OrderError, NotAllowed) as exc:
        raise VCenterConfigError(str(exc)) from None


def connection_for(vcenter: VCenter) -> VCenterConnection:
    return VCenterConnection(host=vcenter.host, port=vcenter.port, username=vcenter.username,
                             password=read_password(vcenter), thumbprint=vcenter.thumbprint)


def client_for(vcenter: VCenter, *, long_waits: bool = False) -> VSphereClient:
    """A session whose login and calls give up after VCENTER_TIMEOUT_S (the
    web process must not hang on a vCenter that stopped answering); with
    long_waits, calls that wait for a task's end may take as long as it."""
    return VSphereClient(connection_for(vcenter), timeout_s=settings.VCENTER_TIMEOUT_S,
                         request_timeout_s=None if long_waits else settings.VCENTER_TIMEOUT_S)


@contextmanager
def session(vcenter: VCenter, *, long_waits: bool = False) -> Iterator[VSphereClient]:
    """client_for as a context whose calls that time out raise VSphereError
    naming the vCenter and the limit."""
    try:
        with client_for(vcenter, long_waits=long_waits) as client:
            yield client
    except TimeoutError:
        raise VSphereError(diagnosis.operator_text(
            f"vCenter {vcenter.host}:{vcenter.port} did not answer within {settings.VCENTER_TIMEOUT_S:g} s "
            "(VCENTER_TIMEOUT_S)")) from None
    except VSphereError as exc:
        raise VSphereError(diagnosis.operator_text(str(exc), f"vCenter {vcenter.name}")) from None


def register_vcenter(name: str, host: str, username: str, thumbprint: str, *, port: int = 443,
                     password_file: str = "", password_env: str = "", check: bool = True,
                     agent: str = "local") -> VCenter:
    """Record a vCenter, reached through `agent` (its discovery, and the
    agent of the VMs discovered on it); with `check`, log in first so a
    wrong password or thumbprint is refused now rather than in the middle
    of a job."""
    name = names.checked(name, VCenter, error=VCenterConfigError, what="vCenter name")
    try:
        agent = agents.get(agent).name
    except agents.AgentError as exc:
        raise VCenterConfigError(str(exc)) from None
    if not 0 < port < 65536:
        raise VCenterConfigError(f"the port must be 1..65535, not {port}")
    if bool(password_file) == bool(password_env):
        raise VCenterConfigError("give exactly one of a password file or a password environment variable")
    if password_file and not Path(password_file).is_absolute():
        raise VCenterConfigError(f"the password file must be an absolute path: {password_file}")
    digits = thumbprint.replace(":", "")
    if len(digits) != 40 or any(c not in "0123456789abcdefABCDEF" for c in digits):
        raise VCenterConfigError(f"thumbprint {thumbprint!r} is not a SHA-1 thumbprint (40 hex digits)")
    try:
        check_password_ref(password_file, password_env)
    except NotAllowed as exc:
        raise VCenterConfigError(str(exc)) from None
    vcenter = VCenter(name=name, host=host, port=port, username=username, password_file=password_file,
                      password_env=password_env, thumbprint=vmware.normalize_thumbprint(thumbprint), agent=agent)
    if VCenter.objects.filter(name=name).exists():
        raise VCenterConfigError(f"a vCenter named {name!r} already exists")
    if check:
        with session(vcenter):
            pass
    vcenter.save()
    return vcenter


# Discovery ------------------------------------------------------------------

# The VirtualMachine fields that are facts about the source's hardware, as
# VMInfo.shape() names them.
HARDWARE_FIELDS = ("cpus", "memory_mib", "firmware", "secure_boot", "tpm", "disk_bus", "scsi_model", "nic_model",
                   "guest_os", "nics")


def hardware_fields(shape: dict) -> dict:
    """The VirtualMachine fields a shape the agent read from vCenter sets
    (VMInfo.shape(): at discovery, and with each cycle's snapshot): the one
    mapping of the source's hardware onto the VM's record. Only the facts
    the shape carries (an older agent's lacks some)."""
    fields = {name: shape[name] for name in HARDWARE_FIELDS if name in shape}
    for name in ("cpus", "memory_mib"):
        if name in fields:
            fields[name] = fields[name] or None  # 0: unknown
    if "firmware" in fields:
        fields["firmware"] = fields["firmware"] or ""
    return fields


def with_known_ips(shape: dict, recorded_nics: list[dict]) -> dict:
    """The shape with each NIC that has no guest address now (VMware Tools
    reports them only while it runs) given the one recorded for its MAC."""
    known = {(n.get("mac") or "").lower(): n.get("ip") for n in recorded_nics or [] if n.get("ip")}
    if "nics" not in shape or not known:
        return shape
    nics = [{**n, "ip": n.get("ip") or known.get((n.get("mac") or "").lower(), "")} for n in shape["nics"]]
    return {**shape, "nics": nics}


def discover(vcenter: VCenter, names: list[str] | None = None, agent: str | None = None, *,
             actor: str = "system") -> list[VirtualMachine]:
    """Record the vCenter's VMs (or the named ones) with their disks, NICs
    (and the guest's addresses on them), hardware (firmware, Secure Boot,
    vTPM, boot disk bus, NIC model), guest OS, power state, CBT state and
    snapshots; a VM new to the records starts its history with who
    registered it (`actor`) and is copied by `agent` (none: the vCenter's
    agent; a rediscovered VM keeps the agent it has)."""
    agent = agents.named(agent or vcenter.agent or agents.LOCAL).name
    with session(vcenter) as client:
        found = client.inventory(names)
    return [_record_vm(vcenter, info, agent, actor) for info in found]


def _shape_keeping_ips(vcenter: VCenter, info: vmware.VMInfo) -> dict:
    recorded = VirtualMachine.objects.filter(vcenter=vcenter, moref=info.moref).values_list("nics", flat=True).first()
    return with_known_ips(info.shape(), recorded or [])


@transaction.atomic
def _record_vm(vcenter: VCenter, info: vmware.VMInfo, agent: str, actor: str = "system") -> VirtualMachine:
    clash = VirtualMachine.objects.filter(name=info.name).exclude(vcenter=vcenter, moref=info.moref).first()
    if clash is not None:
        raise VCenterConfigError(f"VM {info.name} ({info.moref}) clashes with the recorded VM {clash.name} "
                                 f"({clash.source_kind} {clash.moref or ''}); rename one of them")
    found = dict(name=info.name, source_kind=SourceKind.VMWARE, vm_uuid=info.uuid, cbt_enabled=info.cbt_enabled,
                 power_state=info.power_state, esxi_host=info.esxi_host,
                 **hardware_fields(_shape_keeping_ips(vcenter, info)),
                 snapshots=[{"name": s.name, "moref": s.moref} for s in info.snapshots],
                 discovered_at=timezone.now())
    # A rediscovery keeps the agent the operator chose.
    vm, created = VirtualMachine.objects.update_or_create(
        vcenter=vcenter, moref=info.moref, defaults=found, create_defaults={**found, "agent": agent})
    for disk in info.disks:
        SourceDisk.objects.update_or_create(
            vm=vm, disk_key=disk.disk_key,
            defaults=dict(label=disk.label[:80], locator=disk.backing_file, capacity_bytes=disk.capacity_bytes,
                          device_key=disk.key, unit_number=disk.unit_number, backing_file=disk.backing_file,
                          disk_mode=disk.disk_mode, sharing=disk.sharing, is_rdm=disk.is_rdm,
                          discovered_change_id=disk.change_id),
        )
    # Disks removed on vCenter: forget those no job ever copied; the others
    # stay for their history and make the next job's preflight say so.
    vm.disks.exclude(disk_key__in=[d.disk_key for d in info.disks]).filter(job_disks__isnull=True).delete()
    log.info("%s VM %s (%s) with %d disks", "discovered" if created else "updated", vm.name, vm.moref,
             len(info.disks))
    if created:
        from replication.models import VMContext

        VMContext.registered(vm, actor, f"from vCenter {vcenter.name} ({info.moref})")
    return vm


# Orphans --------------------------------------------------------------------

def _remove_orphans(client: VSphereClient, vm: VirtualMachine, info: vmware.VMInfo) -> list[str]:
    """Our snapshots on the VM whose job is no longer running."""
    running = set()
    if vm.pk is not None:
        running = set(ReplicationJob.objects.filter(vm=vm, status__in=JOB_ACTIVE).values_list("id", flat=True))
    removed = client.remove_orphan_snapshots(
        info, running, on_removed=lambda snapshot: ReplicationJob.snapshots_removed([snapshot.moref]))
    return [f"{vm.name}/{snapshot.name}" for snapshot in removed]


def sweep_snapshots(vcenter: VCenter) -> list[str]:
    """Remove every snapshot of ours on the vCenter whose job is not running
    (its name says which job made it); returns "vm/snapshot" for each."""
    removed = []
    # A snapshot's removal (a disk consolidation) may take many minutes.
    with session(vcenter, long_waits=True) as client:
        for info in client.inventory():
            vm = VirtualMachine.objects.filter(vcenter=vcenter, moref=info.moref).first()
            if vm is None:
                vm = VirtualMachine(name=info.name)  # unknown here: nothing of it is active
            removed += _remove_orphans(client, vm, info)
    return removed

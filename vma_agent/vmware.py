"""vSphere through pyvmomi: inventory, changed-block tracking, snapshots and
changed areas. No Django here: the agent's copy tasks and the control plane
both use it.

Properties are read through the PropertyCollector with explicit paths: one
round trip for a whole inventory, and no reads of unset properties (which
some servers answer with faults)."""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import socket
import ssl
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field

from pyVim.connect import Connect, Disconnect
from pyVim.task import WaitForTask
from pyVmomi import vim, vmodl

log = logging.getLogger(__name__)

SNAPSHOT_PREFIX = "oma-repl-"
API_VERSION = "vim.version.v7_0"
VM_PROPERTIES = [
    "name", "config.uuid", "config.hardware.device", "config.changeTrackingEnabled", "config.firmware",
    "config.guestId", "config.guestFullName", "runtime.powerState", "snapshot", "config.hardware.numCPU",
    "config.hardware.memoryMB", "config.bootOptions", "guest.toolsRunningStatus", "guest.toolsStatus",
    "guest.toolsVersionStatus2", "guest.net", "runtime.host",
]
# What replication does to a VM: CBT, snapshots, and reading its disks (VDDK).
REQUIRED_PRIVILEGES = (
    "VirtualMachine.Config.ChangeTracking", "VirtualMachine.State.CreateSnapshot",
    "VirtualMachine.State.RemoveSnapshot", "VirtualMachine.Provisioning.DiskRandomRead",
    "VirtualMachine.Provisioning.DiskRandomAccess",
)
UNSUPPORTED_DISK_MODES = {"independent_persistent", "independent_nonpersistent", "nonpersistent"}


class VSphereError(RuntimeError):
    """A vCenter operation failed; the message says which and why."""


@dataclass(frozen=True)
class VCenterConnection:
    host: str
    username: str
    password: str = field(repr=False)
    thumbprint: str
    port: int = 443


@dataclass
class DiskInfo:
    key: int
    label: str
    unit_number: int | None
    capacity_bytes: int
    backing_file: str
    disk_mode: str
    sharing: str
    is_rdm: bool
    change_id: str

    @property
    def disk_key(self) -> str:
        return f"disk-{self.key}"


@dataclass
class SnapshotInfo:
    name: str
    moref: str


# The boot disk's controller -> (disk bus, SCSI controller model) as QEMU
# emulates them (replication.platforms.base.DISK_BUSES / SCSI_MODELS).
# BusLogic -> LSI Logic: QEMU emulates no BusLogic controller, and LSI Logic
# parallel is the controller vSphere itself offers in its place and whose
# driver the guests that had BusLogic carry (Linux mptspi, Windows' symmpi).
# NVMe -> unknown (""): the destinations have no NVMe bus; the conversion's
# or the operator's choice decides, as for any unknown bus.
DISK_CONTROLLERS = (
    (vim.vm.device.VirtualAHCIController, "sata", ""),
    (vim.vm.device.ParaVirtualSCSIController, "scsi", "vmpvscsi"),
    (vim.vm.device.VirtualLsiLogicSASController, "scsi", "lsisas1068"),
    (vim.vm.device.VirtualLsiLogicController, "scsi", "lsilogic"),
    (vim.vm.device.VirtualBusLogicController, "scsi", "lsilogic"),
    (vim.vm.device.VirtualIDEController, "ide", ""),
    (vim.vm.device.VirtualNVMEController, "", ""),
)
# The first NIC's model -> the NIC model QEMU emulates (NIC_MODELS). Any
# other (vmxnet/vmxnet2, PCnet32 "Flexible", SR-IOV): e1000, the emulated
# NIC the most guests carry a driver for (Linux e1000, Windows inbox).
NIC_MODELS = (
    (vim.vm.device.VirtualE1000e, "e1000e"),
    (vim.vm.device.VirtualE1000, "e1000"),
    (vim.vm.device.VirtualVmxnet3, "vmxnet3"),
)
OTHER_NIC_MODEL = "e1000"
TOOLS_RUNNING = "guestToolsRunning"


@dataclass
class VMInfo:
    moref: str
    name: str
    uuid: str
    power_state: str
    firmware: str
    guest_os: str
    cbt_enabled: bool
    disks: list[DiskInfo]
    nics: list[dict]
    snapshots: list[SnapshotInfo]
    cpus: int = 0
    memory_mib: int = 0
    guest_id: str = ""
    secure_boot: bool = False
    tpm: bool = False
    disk_bus: str = ""  # the boot disk's bus; "": unknown
    scsi_model: str = ""  # its SCSI controller when disk_bus is scsi
    nic_model: str = ""  # the first NIC's; "": no NIC
    boot_disk_key: int | None = None  # the disk the VM's boot order names first, if it names one
    tools_running_status: str = ""  # guest.toolsRunningStatus
    tools_installed: bool = True  # False when vCenter says VMware Tools is not installed
    esxi_host: str = ""  # the name of the ESXi host it runs on (runtime.host); "": unknown

    def boot_order(self) -> list[DiskInfo]:
        """The disks in boot order: the one the boot options name first,
        then by unit number."""
        disks = sorted(self.disks, key=lambda d: (d.unit_number is None, d.unit_number or 0, d.key))
        return sorted(disks, key=lambda d: d.key != self.boot_disk_key)

    def shape(self) -> dict:
        """What a failed-over copy of the VM needs: CPUs, memory, firmware
        (Secure Boot, vTPM), the buses the guest found its boot disk and NIC
        on, guest OS, NICs (with the guest's IPv4 address on each), and the
        disks in boot order."""
        return {"cpus": self.cpus, "memory_mib": self.memory_mib, "firmware": self.firmware or "bios",
                "secure_boot": self.secure_boot, "tpm": self.tpm, "disk_bus": self.disk_bus,
                "scsi_model": self.scsi_model, "nic_model": self.nic_model,
                "guest_id": self.guest_id, "guest_os": self.guest_os, "nics": self.nics,
                "disks": [d.disk_key for d in self.boot_order()]}

    def quiesce_refusal(self) -> str:
        """Why a snapshot of the VM cannot be quiesced ("" when VMware Tools
        runs in the guest and can)."""
        if self.power_state == "poweredOff":
            return "the VM is powered off (its disks are at rest)"
        if self.tools_running_status == TOOLS_RUNNING:
            return ""
        if not self.tools_installed:
            return "VMware Tools is not installed in the guest"
        if self.tools_running_status == "guestToolsExecutingScripts":
            return "VMware Tools is starting or stopping in the guest (guestToolsExecutingScripts)"
        return f"VMware Tools is not running in the guest ({self.tools_running_status or 'state unknown'})"


@dataclass
class SnapshotTaken:
    moref: str
    quiesced: bool
    note: str  # for the job's timeline: how consistent the snapshot is, and why


def normalize_thumbprint(value: str) -> str:
    digits = value.replace(":", "").strip().upper()
    return ":".join(digits[i:i + 2] for i in range(0, len(digits), 2))


def server_thumbprint(host: str, port: int, timeout_s: float = 10.0) -> str:
    """The SHA-1 thumbprint of the certificate the server presents."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection((host, port), timeout=timeout_s) as sock:
        with context.wrap_socket(sock, server_hostname=host) as tls:
            der = tls.getpeercert(binary_form=True)
    return normalize_thumbprint(hashlib.sha1(der).hexdigest())


def change_id_epoch(change_id: str) -> str:
    """The tracking epoch of a changeId ("<uuid>/<sequence>"): it changes
    when changed-block tracking is reset, and then old changeIds are void."""
    return change_id.rsplit("/", 1)[0] if "/" in change_id else ""


def snapshot_name(job_id: str) -> str:
    """The deterministic name of a job's snapshot, for the orphan sweeper."""
    return f"{SNAPSHOT_PREFIX}{job_id}"


def job_of_snapshot(name: str) -> str | None:
    return name[len(SNAPSHOT_PREFIX):] if name.startswith(SNAPSHOT_PREFIX) else None


def orphan_snapshots(info: VMInfo, running_jobs: Collection[str]) -> list[SnapshotInfo]:
    """The one rule for orphans, the agent's and the OMA's sweeper's: a
    snapshot of ours (its name says which job made it) whose job is not
    running. A job removes its own snapshot as it ends; one left behind
    belongs to a job that ended without it."""
    return [s for s in info.snapshots if (job := job_of_snapshot(s.name)) is not None and job not in running_jobs]


def _fault_text(exc: Exception) -> str:
    msg = getattr(exc, "msg", "") or ""
    if not msg and getattr(exc, "faultMessage", None):
        msg = "; ".join(m.message for m in exc.faultMessage if getattr(m, "message", ""))
    name = type(exc).__name__
    return f"{name}: {msg}" if msg else (str(exc) or name)


class VSphereClient:
    """One logged-in session; use as a context manager."""

    def __init__(self, connection: VCenterConnection, timeout_s: float = 60.0,
                 request_timeout_s: float | None = None):
        self.connection = connection
        self.timeout_s = timeout_s
        # The socket timeout of the login and of every call after it; None
        # (the agent's way) lets a task's wait for its end last as long as the task.
        self.request_timeout_s = request_timeout_s
        self.si = None

    def __enter__(self) -> VSphereClient:
        self.connect()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def connect(self) -> None:
        c = self.connection
        expected = normalize_thumbprint(c.thumbprint)
        try:
            # A verifying context: pyvmomi compares the pinned thumbprint only
            # when normal verification fails (a self-signed or VMCA-issued
            # certificate), and skips both for localhost without one.
            self.si = Connect(host=c.host, port=c.port, user=c.username, pwd=c.password, thumbprint=expected,
                              sslContext=ssl.create_default_context(), version=API_VERSION,
                              connectionPoolTimeout=self.timeout_s, httpConnectionTimeout=self.request_timeout_s)
        except vim.fault.InvalidLogin:
            raise VSphereError(f"vCenter {c.host}:{c.port} refused the login of {c.username}: "
                               "wrong user name or password") from None
        except (ssl.SSLError, vim.fault.SSLVerifyFault, vim.fault.HostConnectFault, OSError) as exc:
            raise VSphereError(self._connect_failure(exc)) from None
        except vmodl.MethodFault as exc:
            raise VSphereError(f"cannot log in to vCenter {c.host}:{c.port}: {_fault_text(exc)}") from None
        except Exception as exc:  # pyvmomi raises plain Exception for thumbprint mismatches
            raise VSphereError(self._connect_failure(exc)) from None

    def _connect_failure(self, exc: Exception) -> str:
        c = self.connection
        limit = self.request_timeout_s or 10.0
        if isinstance(exc, TimeoutError):
            return f"vCenter {c.host}:{c.port} did not answer the login within {limit:g} s"
        try:
            seen = server_thumbprint(c.host, c.port, timeout_s=limit)
        except TimeoutError:
            return f"vCenter {c.host}:{c.port} did not present its certificate within {limit:g} s"
        except OSError as conn_exc:
            return f"cannot reach vCenter {c.host}:{c.port}: {conn_exc}"
        if seen != normalize_thumbprint(c.thumbprint):
            return (f"vCenter {c.host}:{c.port} presented certificate thumbprint {seen}, not the pinned "
                    f"{normalize_thumbprint(c.thumbprint)}; refusing to connect (update the pinned thumbprint "
                    "only if you trust this certificate)")
        return f"cannot connect to vCenter {c.host}:{c.port}: {exc}"

    def close(self) -> None:
        if self.si is not None:
            try:
                Disconnect(self.si)
            except Exception as exc:  # the session ends with the server anyway
                log.debug("logout failed: %s", exc)
            self.si = None

    # Reading -------------------------------------------------------------

    def _retrieve(self, obj_specs, obj_type, paths: list[str]) -> Iterator[tuple[object, dict]]:
        collector = self.si.content.propertyCollector
        spec = vmodl.query.PropertyCollector.FilterSpec(
            objectSet=obj_specs,
            propSet=[vmodl.query.PropertyCollector.PropertySpec(type=obj_type, pathSet=paths, all=False)],
        )
        result = collector.RetrievePropertiesEx([spec], vmodl.query.PropertyCollector.RetrieveOptions())
        while result is not None:
            for content in result.objects:
                yield content.obj, {prop.name: prop.val for prop in content.propSet or []}
            if not result.token:
                break
            result = collector.ContinueRetrievePropertiesEx(result.token)

    def _all_vms(self, paths: list[str]) -> Iterator[tuple[object, dict]]:
        view = self.si.content.viewManager.CreateContainerView(self.si.content.rootFolder, [vim.VirtualMachine], True)
        try:
            traversal = vmodl.query.PropertyCollector.TraversalSpec(
                name="view", path="view", skip=False, type=vim.view.ContainerView)
            yield from self._retrieve(
                [vmodl.query.PropertyCollector.ObjectSpec(obj=view, skip=True, selectSet=[traversal])],
                vim.VirtualMachine, paths)
        finally:
            view.Destroy()

    def _props_of(self, obj, obj_type, paths: list[str]) -> dict:
        for _, props in self._retrieve([vmodl.query.PropertyCollector.ObjectSpec(obj=obj, skip=False)],
                                       obj_type, paths):
            return props
        raise VSphereError(f"{obj_type.__name__} {obj._moId} not found")

    def vm_ref(self, moref: str):
        return vim.VirtualMachine(moref, self.si._stub)

    def snapshot_ref(self, moref: str):
        return vim.vm.Snapshot(moref, self.si._stub)

    def inventory(self, names: list[str] | None = None) -> list[VMInfo]:
        """Every VM (or the named ones), each with its disks, NICs and snapshots."""
        try:
            wanted = [(obj, props) for obj, props in self._all_vms(VM_PROPERTIES)
                      if names is None or props.get("name") in names]
            hosts = self._host_names([props.get("runtime.host") for _, props in wanted])
            found = [self._vm_info(obj, props, hosts) for obj, props in wanted]
        except vmodl.MethodFault as exc:
            raise VSphereError(f"reading the inventory failed: {_fault_text(exc)}") from None
        if names is not None:
            missing = sorted(set(names) - {vm.name for vm in found})
            if missing:
                raise VSphereError(f"no VM named {', '.join(missing)} on vCenter {self.connection.host}")
        return sorted(found, key=lambda vm: vm.name)

    def vm_info(self, moref: str) -> VMInfo:
        try:
            props = self._props_of(self.vm_ref(moref), vim.VirtualMachine, VM_PROPERTIES)
            return self._vm_info(self.vm_ref(moref), props, self._host_names([props.get("runtime.host")]))
        except vmodl.fault.ManagedObjectNotFound:
            raise VSphereError(f"VM {moref} no longer exists on vCenter {self.connection.host}") from None
        except vmodl.MethodFault as exc:
            raise VSphereError(f"reading VM {moref} failed: {_fault_text(exc)}") from None

    def _host_names(self, refs: list) -> dict[str, str]:
        """The names of these HostSystems by moref, in one round trip."""
        unique = {ref._moId: ref for ref in refs if ref is not None}
        if not unique:
            return {}
        specs = [vmodl.query.PropertyCollector.ObjectSpec(obj=ref, skip=False) for ref in unique.values()]
        return {obj._moId: props.get("name", "") for obj, props in self._retrieve(specs, vim.HostSystem, ["name"])}

    @staticmethod
    def _vm_info(obj, props: dict, hosts: dict[str, str] | None = None) -> VMInfo:
        devices = props.get("config.hardware.device") or []
        snapshots: list[SnapshotInfo] = []
        tree = props.get("snapshot")
        pending = list(tree.rootSnapshotList) if tree is not None and tree.rootSnapshotList else []
        while pending:
            node = pending.pop(0)
            snapshots.append(SnapshotInfo(node.name, node.snapshot._moId))
            pending.extend(node.childSnapshotList or [])
        firmware = props.get("config.firmware", "") or ""
        boot = props.get("config.bootOptions")
        addresses = guest_ipv4_by_mac(props.get("guest.net") or [])
        nics = [d for d in devices if isinstance(d, vim.vm.device.VirtualEthernetCard)]
        info = VMInfo(
            moref=obj._moId, name=props.get("name", ""), uuid=props.get("config.uuid", "") or "",
            power_state=str(props.get("runtime.powerState", "") or ""),
            firmware=firmware,
            guest_os=props.get("config.guestFullName") or props.get("config.guestId") or "",
            cbt_enabled=bool(props.get("config.changeTrackingEnabled")),
            disks=disks_of(devices),
            nics=[{"label": d.deviceInfo.label if d.deviceInfo else "", "mac": d.macAddress or "",
                   "network": d.deviceInfo.summary if d.deviceInfo else "",
                   "ip": addresses.get((d.macAddress or "").lower(), "")}
                  for d in nics],
            snapshots=snapshots,
            cpus=int(props.get("config.hardware.numCPU") or 0),
            memory_mib=int(props.get("config.hardware.memoryMB") or 0),
            guest_id=props.get("config.guestId") or "",
            secure_boot=firmware == "efi" and bool(boot is not None and boot.efiSecureBootEnabled),
            tpm=any(isinstance(d, vim.vm.device.VirtualTPM) for d in devices),
            nic_model=nic_model_of(nics[0]) if nics else "",
            boot_disk_key=boot_disk_key(boot),
            tools_running_status=str(props.get("guest.toolsRunningStatus") or ""),
            tools_installed="NotInstalled" not in (f"{props.get('guest.toolsStatus') or ''} "
                                                   f"{props.get('guest.toolsVersionStatus2') or ''}"),
            esxi_host=(hosts or {}).get(getattr(props.get("runtime.host"), "_moId", None), ""),
        )
        boot_disks = info.boot_order()
        if boot_disks:
            info.disk_bus, info.scsi_model = bus_of(devices, boot_disks[0].key)
        return info

    def snapshot_disks(self, snapshot_moref: str) -> list[DiskInfo]:
        """The disks as the snapshot froze them, with their changeIds."""
        try:
            props = self._props_of(self.snapshot_ref(snapshot_moref), vim.vm.Snapshot, ["config.hardware.device"])
        except vmodl.MethodFault as exc:
            raise VSphereError(f"reading snapshot {snapshot_moref} failed: {_fault_text(exc)}") from None
        return disks_of(props.get("config.hardware.device") or [])

    def missing_privileges(self, vm_moref: str) -> list[str]:
        """The privileges replication needs on the VM that this session lacks."""
        try:
            session = self.si.content.sessionManager.currentSession.key
            # The per-privilege form: a list of booleans may come back with
            # the false ones left out (govmomi's encoder does so).
            (answer,) = self.si.content.authorizationManager.HasPrivilegeOnEntities(
                entity=[self.vm_ref(vm_moref)], sessionId=session, privId=list(REQUIRED_PRIVILEGES))
        except vmodl.MethodFault as exc:
            raise VSphereError(f"checking privileges on {vm_moref} failed: {_fault_text(exc)}") from None
        granted = {p.privId for p in answer.privAvailability if p.isGranted}
        return [priv for priv in REQUIRED_PRIVILEGES if priv not in granted]

    # Changing ------------------------------------------------------------

    def _wait(self, task, what: str):
        try:
            WaitForTask(task)
        except vmodl.MethodFault as exc:
            raise VSphereError(f"{what} failed: {_fault_text(exc)}") from None
        return task.info.result

    def set_change_tracking(self, vm_moref: str, enabled: bool) -> None:
        spec = vim.vm.ConfigSpec(changeTrackingEnabled=enabled)
        self._wait(self.vm_ref(vm_moref).ReconfigVM_Task(spec=spec),
                   f"{'enabling' if enabled else 'disabling'} changed block tracking on {vm_moref}")

    def enable_change_tracking(self, vm_moref: str) -> list[DiskInfo]:
        """Turn CBT on and make it start on every disk: tracking begins at the
        next stun/unstun, so a short snapshot is created and removed. Returns
        the disks, each with a changeId, or raises if one has none."""
        self.set_change_tracking(vm_moref, True)
        snapshot = self.create_snapshot(vm_moref, f"{SNAPSHOT_PREFIX}cbt-start",
                                        "Starts changed block tracking; removed at once")
        self.remove_snapshot(snapshot)
        disks = self.vm_info(vm_moref).disks
        without = [d.disk_key for d in disks if not d.change_id]
        if without:
            raise VSphereError(f"changed block tracking was enabled on {vm_moref} but disks {', '.join(without)} "
                               "report no changeId")
        return disks

    def create_snapshot(self, vm_moref: str, name: str, description: str = "", *, quiesce: bool = False) -> str:
        task = self.vm_ref(vm_moref).CreateSnapshot_Task(name=name, description=description, memory=False,
                                                          quiesce=quiesce)
        snapshot = self._wait(task, f"creating {'quiesced ' if quiesce else ''}snapshot {name} of {vm_moref}")
        return snapshot._moId

    def take_snapshot(self, info: VMInfo, name: str, description: str = "") -> SnapshotTaken:
        """The job's snapshot: quiesced when VMware Tools runs in the guest
        (its file systems, and on Windows its VSS writers, flushed and held
        still), crash-consistent otherwise or when quiescing fails; the
        answer says which and why."""
        refusal = info.quiesce_refusal()
        if not refusal:
            try:
                moref = self.create_snapshot(info.moref, name, description, quiesce=True)
            except VSphereError as exc:
                refusal = f"the quiesced snapshot failed ({exc})"
                self._remove_named(info.moref, name)
            else:
                return SnapshotTaken(moref, True, "quiesced snapshot: VMware Tools quiesced the guest")
        try:
            moref = self.create_snapshot(info.moref, name, description)
        except VSphereError as exc:
            raise VSphereError(f"{exc} (after not quiescing: {refusal})") from None
        note = ("snapshot of a powered-off VM: its disks are at rest" if info.power_state == "poweredOff"
                else f"crash-consistent snapshot: {refusal}")
        return SnapshotTaken(moref, False, note)

    def _remove_named(self, vm_moref: str, name: str) -> None:
        """Remove what a failed snapshot left behind under the job's name (a
        vCenter normally leaves nothing; one that stays is the orphan
        sweeper's once the job ends)."""
        try:
            for snapshot in self.vm_info(vm_moref).snapshots:
                if snapshot.name == name:
                    self.remove_snapshot(snapshot.moref)
        except VSphereError as exc:
            log.warning("what the failed snapshot %s of %s left was not removed: %s", name, vm_moref, exc)

    def remove_snapshot(self, snapshot_moref: str) -> None:
        try:
            task = self.snapshot_ref(snapshot_moref).RemoveSnapshot_Task(removeChildren=False, consolidate=True)
        except vmodl.fault.ManagedObjectNotFound:
            return  # already gone: removing is idempotent
        self._wait(task, f"removing snapshot {snapshot_moref}")

    def remove_orphan_snapshots(self, info: VMInfo, running_jobs: Collection[str],
                                on_removed: Callable[[SnapshotInfo], None] | None = None) -> list[SnapshotInfo]:
        """Remove the VM's orphan_snapshots, one at a time (`on_removed` hears
        of each as it goes); `info` keeps the others."""
        removed = []
        for snapshot in orphan_snapshots(info, running_jobs):
            self.remove_snapshot(snapshot.moref)
            log.warning("removed orphaned snapshot %s (%s) of VM %s", snapshot.name, snapshot.moref, info.name)
            removed.append(snapshot)
            if on_removed is not None:
                on_removed(snapshot)
        info.snapshots = [s for s in info.snapshots if s not in removed]
        return removed

    def power_state(self, vm_moref: str) -> str:
        return str(self._props_of(self.vm_ref(vm_moref), vim.VirtualMachine, ["runtime.powerState"])
                   .get("runtime.powerState", ""))

    def shut_down(self, vm_moref: str, timeout_s: float, poll_s: float = 0.5) -> str:
        """Shut the guest down through VMware Tools and wait until the VM is
        off; power it off when the guest cannot be asked or is not off within
        timeout_s. Returns how it went off."""
        vm = self.vm_ref(vm_moref)
        if self.power_state(vm_moref) == "poweredOff":
            return "already powered off"
        try:
            vm.ShutdownGuest()
        except vmodl.MethodFault as exc:
            how = f"powered off (the guest could not be asked to shut down: {_fault_text(exc)})"
        else:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                if self.power_state(vm_moref) == "poweredOff":
                    return "guest shutdown"
                time.sleep(poll_s)
            how = f"powered off (the guest was not off {timeout_s:.0f} s after its shutdown)"
        if self.power_state(vm_moref) != "poweredOff":
            self._wait(vm.PowerOffVM_Task(), f"powering off {vm_moref}")
        return how

    def power_on(self, vm_moref: str) -> str:
        if self.power_state(vm_moref) == "poweredOn":
            return "already powered on"
        self._wait(self.vm_ref(vm_moref).PowerOnVM_Task(), f"powering on {vm_moref}")
        return "powered on"

    def changed_areas(self, vm_moref: str, snapshot_moref: str, device_key: int, capacity_bytes: int,
                      change_id: str) -> list[tuple[int, int]]:
        """QueryChangedDiskAreas paged over the whole disk: the areas changed
        since `change_id`, or with "*" every allocated area. Any failure is an
        error: never a silent full copy."""
        vm, snapshot = self.vm_ref(vm_moref), self.snapshot_ref(snapshot_moref)
        areas: list[tuple[int, int]] = []
        offset = 0
        while offset < capacity_bytes:
            try:
                info = vm.QueryChangedDiskAreas(snapshot=snapshot, deviceKey=device_key, startOffset=offset,
                                                changeId=change_id)
            except vmodl.MethodFault as exc:
                raise VSphereError(f"QueryChangedDiskAreas of disk {device_key} of {vm_moref} against changeId "
                                   f"{change_id} at offset {offset} failed: {_fault_text(exc)}") from None
            for area in info.changedArea or []:
                areas.append((area.start, area.length))
            if info.length <= 0:
                raise VSphereError(f"QueryChangedDiskAreas of disk {device_key} of {vm_moref} made no progress "
                                   f"at offset {offset}")
            offset = info.startOffset + info.length
        return areas


def guest_ipv4_by_mac(guest_net) -> dict[str, str]:
    """Per NIC MAC (lower case) the first IPv4 address VMware Tools reports
    the guest has on it (guest.net; empty without Tools)."""
    found: dict[str, str] = {}
    for nic in guest_net:
        mac = (nic.macAddress or "").lower()
        for address in nic.ipAddress or []:
            try:
                if mac and mac not in found and ipaddress.ip_address(address).version == 4:
                    found[mac] = address
            except ValueError:
                continue
    return found


def nic_model_of(nic) -> str:
    for device_type, model in NIC_MODELS:
        if isinstance(nic, device_type):
            return model
    return OTHER_NIC_MODEL


def boot_disk_key(boot) -> int | None:
    """The disk the boot options name first (bootOrder), if they name one."""
    for device in (boot.bootOrder or []) if boot is not None else []:
        if isinstance(device, vim.vm.BootOptions.BootableDiskDevice):
            return device.deviceKey
    return None


def bus_of(devices, disk_key: int) -> tuple[str, str]:
    """(disk bus, SCSI model) of the disk's controller; ("", "") unknown."""
    by_key = {d.key: d for d in devices}
    controller = by_key.get(getattr(by_key.get(disk_key), "controllerKey", None))
    for controller_type, bus, model in DISK_CONTROLLERS:
        if isinstance(controller, controller_type):
            return bus, model
    return "", ""


def disks_of(devices) -> list[DiskInfo]:
    disks = []
    for device in devices:
        if not isinstance(device, vim.vm.device.VirtualDisk):
            continue
        backing = device.backing
        capacity = device.capacityInBytes or (device.capacityInKB or 0) * 1024
        disks.append(DiskInfo(
            key=device.key, label=device.deviceInfo.label if device.deviceInfo else "",
            unit_number=device.unitNumber, capacity_bytes=capacity,
            backing_file=getattr(backing, "fileName", "") or "",
            disk_mode=getattr(backing, "diskMode", "") or "",
            sharing=getattr(backing, "sharing", "") or "",
            is_rdm=isinstance(backing, vim.vm.device.VirtualDisk.RawDiskMappingVer1BackingInfo),
            change_id=getattr(backing, "changeId", "") or "",
        ))
    return sorted(disks, key=lambda d: d.key)


OVERRIDE_EXISTING_SNAPSHOTS = "existing-snapshots"
OVERRIDES = (OVERRIDE_EXISTING_SNAPSHOTS,)


def preflight_blockers(vm: VMInfo, overrides: frozenset[str] | set[str] = frozenset()) -> list[str]:
    """What stops a VM from being replicated by snapshot, each with its reason.
    CBT off is not a blocker: it is enabled automatically. Snapshots of the
    operator's (not ours) block unless overridden: a snapshot chain slows
    the VM and consolidating it later is the operator's call."""
    blockers = []
    foreign = [s.name for s in vm.snapshots if job_of_snapshot(s.name) is None]
    if foreign and OVERRIDE_EXISTING_SNAPSHOTS not in overrides:
        blockers.append(f"the VM has snapshots ({', '.join(foreign)}); remove them or override with "
                        f"{OVERRIDE_EXISTING_SNAPSHOTS}")
    for disk in vm.disks:
        if disk.is_rdm:
            blockers.append(f"{disk.disk_key} is a raw device mapping, which snapshots do not cover")
        elif disk.disk_mode in UNSUPPORTED_DISK_MODES:
            blockers.append(f"{disk.disk_key} is {disk.disk_mode}, which snapshots do not cover")
        if disk.sharing and disk.sharing not in ("sharingNone", ""):
            blockers.append(f"{disk.disk_key} is shared ({disk.sharing}) and cannot be snapshotted")
    return blockers

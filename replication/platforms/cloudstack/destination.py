"""CloudStack as the failover destination: the replica volumes themselves
boot, as MigrateKit OSSEA's OMA does it. Their point-in-time protection is a CloudStack
snapshot of each volume (the rollback point); the VM is deployed stopped
from the config's template and service offering, the template's root
volume is replaced by the boot disk's volume (device 0) and the other
volumes follow in disk order; destroying the VM first takes its volumes off
it (CloudStack deletes a destroyed VM's root volume); discarding a
protection reverts the volume to its snapshot, deletes the snapshot and
attaches the volume to the OMA again.

What the deploy carries (deployVirtualMachine, as CloudStack's source defines
it): one NIC per source NIC in `iptonetworklist` with its MAC and, on a live
failover's mapped networks, its IP (CloudStack keys that map by network and
refuses a second NIC on a network: a VM whose NICs map to one network is
refused on a live failover; on a test failover's single network only its
first NIC joins, and the others are recorded as left off); a service
offering chosen for the VM's CPUs and memory (a custom offering sized to
them, else the closest fixed one that fits, else the largest), with the
choice and why (hardware_choices); `boottype`/`bootmode` from the firmware
(UEFI, Secure Boot) and the root and data disk controller
(details rootDiskController, dataDiskController) from the disk bus.

Guest conversion runs virt-v2v-in-place on the volumes while they are still
attached to the OMA, through their devices there, by the same code as the
local destination's (LibvirtDestination.convert_guest), before define_vm
takes them off the OMA.

CloudStack has no API for a guest's console: a VM counts as booted once it
has run for CLOUDSTACK_BOOT_SETTLE_S, and the step says so."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from replication.models import CloudError, CloudStackConfig, TargetVolume
from replication.platforms.base import (
    BootEvidence,
    Destination,
    DestinationError,
    DiskSpec,
    GuestNotConverted,
    VMShape,
)
from replication.platforms.cloudstack.client import CloudClient
from replication.platforms.cloudstack.volumes import device_name

# CloudStack's VM states as the destination interface names them.
STATES = {"Running": "running", "Starting": "running", "Stopped": "shutoff", "Stopping": "shutdown",
          "Error": "crashed", "Destroyed": "absent", "Expunging": "absent", "Migrating": "running"}
# The disk controller CloudStack's KVM agent gives the root (and data) disks,
# by the details rootDiskController/dataDiskController (its DiskDef.DiskBus
# names); its "scsi" is a virtio-scsi controller.
DISK_CONTROLLERS = {"virtio": "virtio", "sata": "sata", "scsi": "scsi", "ide": "ide"}
# A custom offering needs a CPU speed too (MHz); KVM uses it for CPU shares only.
CUSTOM_CPU_SPEED_MHZ = 1000



def _chosen(value, why: str, **extra) -> dict:
    """A choice the cloud made, as FailoverJob.hardware records it."""
    return {"value": value, **extra, "origin": "destination", "why": why}

class CloudStackDestination(Destination):
    name = "cloudstack"
    replica_boots_in_place = True

    def __init__(self, config: CloudStackConfig, *, job_timeout_s: float, settle_s: float,
                 work_dir: Path | str = "var/run/failover/cloudstack", domain_type: str | None = None):
        self.config = config
        self.job_timeout_s = job_timeout_s
        self.settle_s = settle_s
        self.work_dir = Path(work_dir).absolute()
        # The conversion's appliance: TCG unless told KVM runs guests here
        # (LIBVIRT_DOMAIN_TYPE=kvm): a /dev/kvm that opens may still not run one.
        self.domain_type = domain_type or "qemu"
        self._choices: dict[str, dict] = {}

    def _client(self) -> CloudClient:
        try:
            return CloudClient(self.config, job_timeout_s=self.job_timeout_s)
        except CloudError as exc:
            raise DestinationError(str(exc)) from None

    def _call(self, command: str, **params) -> dict:
        try:
            return self._client().call(command, **params)
        except CloudError as exc:
            raise DestinationError(str(exc)) from None

    def _vm(self, name: str) -> dict | None:
        rows = self._call("listVirtualMachines", name=name).get("virtualmachine") or []
        return rows[0] if rows else None

    def _volume(self, volume_id: str) -> dict:
        rows = self._call("listVolumes", id=volume_id).get("volume") or []
        if not rows:
            raise DestinationError(f"CloudStack volume {volume_id} does not exist")
        return rows[0]

    def close(self) -> None:
        """Nothing held open: every call makes its own client."""

    def replica_handle(self, volume: TargetVolume) -> str:
        if not volume.cloud_volume_id:
            raise DestinationError(f"replica {volume.export_name} is not a CloudStack volume")
        return volume.cloud_volume_id

    # -- protection ----------------------------------------------------------

    def protect(self, volumes: Sequence[str], point_name: str) -> list[str]:
        handles = []
        for index, volume_id in enumerate(volumes):
            name = f"{point_name}-{index:02d}"[:255]
            existing = self._call("listSnapshots", volumeid=volume_id, name=name).get("snapshot") or []
            snapshot = existing[0] if existing else self._call("createSnapshot", volumeid=volume_id,
                                                                name=name)["snapshot"]
            handles.append(snapshot["id"])
        return handles

    def discard_protection(self, handles: Sequence[str]) -> None:
        for snapshot_id in handles or ():
            rows = self._call("listSnapshots", id=snapshot_id).get("snapshot") or []
            if not rows:
                continue  # already discarded
            volume = self._volume(rows[0]["volumeid"])
            if volume.get("virtualmachineid") and volume["virtualmachineid"] != self.config.oma_vm_id:
                raise DestinationError(f"volume {volume['id']} is still attached to VM "
                                       f"{volume.get('vmname', volume['virtualmachineid'])}; destroy the VM first")
            if volume.get("virtualmachineid") == self.config.oma_vm_id:
                self._call("detachVolume", id=volume["id"])  # a revert needs it detached
            self._call("revertSnapshot", id=snapshot_id)
            self._call("deleteSnapshot", id=snapshot_id)
            self._call("attachVolume", id=volume["id"], virtualmachineid=self.config.oma_vm_id)

    def commit_vm(self, vm: str, protection: Sequence[str], heartbeat: Callable[[], None]) -> str:
        """The volumes already are the VM's: only the rollback point (their
        snapshots) goes."""
        for snapshot_id in protection or ():
            if self._call("listSnapshots", id=snapshot_id).get("snapshot"):
                self._call("deleteSnapshot", id=snapshot_id)
            heartbeat()
        return f"{vm} keeps its {len(protection or ())} volume(s); the rollback snapshots are deleted"

    def _volume_of(self, snapshot_id: str) -> str:
        rows = self._call("listSnapshots", id=snapshot_id).get("snapshot") or []
        if not rows:
            raise DestinationError(f"CloudStack snapshot {snapshot_id} does not exist")
        return rows[0]["volumeid"]

    # -- VMs -----------------------------------------------------------------

    def define_vm(self, name: str, shape: VMShape, disks: Sequence[DiskSpec | str],
                  network: str | Mapping[str, str] | None = None) -> str:
        """Deploy the VM (stopped) with its NICs, offering, boot type and disk
        controller, then give it the volumes: everything that can refuse is
        asked before a volume leaves the OMA."""
        if self._vm(name) is not None:
            raise DestinationError(f"a VM named {name} already exists in CloudStack; destroy it first")
        specs = [(d, "") if isinstance(d, str) else d for d in disks]
        if shape.disks:
            order = {key: i for i, key in enumerate(shape.disks)}
            specs.sort(key=lambda spec: order.get(spec[1], len(order)))
        volume_ids = [self._volume_of(handle) for handle, _ in specs]
        nics, nic_choice = self._nics(name, shape, network)
        offering, sizing, offering_choice = self._offering(shape)
        boot, boot_choices = self._boot_params(shape)
        for volume_id in volume_ids:
            if self._volume(volume_id).get("virtualmachineid"):
                self._call("detachVolume", id=volume_id)
        deployed = self._call("deployVirtualMachine", name=name, displayname=name, zoneid=self.config.zone_id,
                              serviceofferingid=offering["id"], templateid=self.config.template_id,
                              startvm=False, details={**sizing, **boot.pop("details")}, **boot,
                              **({"iptonetworklist": nics} if nics else {}))
        vm = deployed["virtualmachine"]
        template_root = [v for v in self._call("listVolumes", virtualmachineid=vm["id"]).get("volume") or []
                         if v.get("type") == "ROOT"]
        for volume in template_root:  # the boot disk's volume takes its place
            self._call("detachVolume", id=volume["id"])
            self._call("deleteVolume", id=volume["id"])
        for device, volume_id in enumerate(volume_ids):
            self._call("attachVolume", id=volume_id, virtualmachineid=vm["id"], deviceid=device)
        self._choices[name] = {"service_offering": offering_choice, "nics": nic_choice, **boot_choices}
        return name

    def hardware_choices(self, vm: str) -> dict:
        return dict(self._choices.get(vm, {}))

    def check_nics(self, name: str, shape: VMShape, network: Mapping[str, str]) -> None:
        self._nics(name, shape, network)

    def _nics(self, name: str, shape: VMShape, network: str | Mapping[str, str] | None) -> tuple[list[dict], dict]:
        """iptonetworklist: one entry per source NIC, on its network, with its
        MAC and (mapped networks: a live failover) its IP. CloudStack keys the
        list by network and gives a VM one NIC per network."""
        source_nics = list(shape.nics) or [None]
        if isinstance(network, Mapping) and not shape.nics:
            return [], _chosen([], "the source has no NICs")
        if isinstance(network, Mapping) and network:
            targets = [network.get(nic.source_network if nic else "", "") for nic in source_nics]
            unmapped = [nic.mac or "?" for nic, target in zip(source_nics, targets, strict=True) if not target]
            if unmapped:
                raise DestinationError(f"VM {name}: NIC(s) {', '.join(unmapped)} map to no CloudStack network")
            seen: dict[str, str] = {}
            for nic, target in zip(source_nics, targets, strict=True):
                if target in seen:
                    raise DestinationError(
                        f"VM {name}: NICs {seen[target]} and {nic.mac or '?'} both map to CloudStack network "
                        f"{target}, and CloudStack gives a VM one NIC per network: map their source networks to "
                        "different networks (manage.py network_map)")
                seen[target] = nic.mac or "?" if nic else "?"
            entries = []
            for nic, target in zip(source_nics, targets, strict=True):
                entry = {"networkid": target}
                if nic and nic.mac:
                    entry["mac"] = nic.mac.lower()
                if nic and nic.ip:
                    entry["ip"] = nic.ip
                entries.append(entry)
            return entries, _chosen([{k: e.get(k) for k in ("networkid", "mac", "ip")} for e in entries],
                                    "the source's NICs on the mapped networks, each with its MAC and IP")
        target = network if isinstance(network, str) and network else self.config.network_id
        if not target:
            return [], _chosen([], "no network given and the cloud config names none")
        first = source_nics[0]
        entry = {"networkid": target, **({"mac": first.mac.lower()} if first and first.mac else {})}
        left_off = [nic.mac or "?" for nic in source_nics[1:]]
        why = "the source's first NIC, with its MAC, on the test network (its IP is the test network's)"
        if left_off:
            why += (f"; NIC(s) {', '.join(left_off)} left off: CloudStack gives a VM one NIC per network and a "
                    "test failover has one")
        return [entry], _chosen([{"networkid": target, "mac": entry.get("mac"), "ip": None}], why)

    def _offering(self, shape: VMShape) -> tuple[dict, dict, dict]:
        """The service offering for the VM's CPUs and memory: a custom one
        sized to them where the cloud has one that allows them, else the
        smallest fixed one that fits, else the largest; with details for a
        custom one, and the choice and why."""
        rows = self._call("listServiceOfferings", zoneid=self.config.zone_id).get("serviceoffering") or []
        need = f"{shape.cpus} CPU(s), {shape.memory_mib} MiB"
        for row in rows:
            if not row.get("iscustomized"):
                continue
            limits = row.get("serviceofferingdetails") or {}
            if (int(limits.get("mincpunumber", 1)) <= shape.cpus <= int(limits.get("maxcpunumber", 2**31))
                    and int(limits.get("minmemory", 0)) <= shape.memory_mib <= int(limits.get("maxmemory", 2**31))):
                details = {"cpuNumber": shape.cpus, "memory": shape.memory_mib}
                if not row.get("cpuspeed"):
                    details["cpuSpeed"] = CUSTOM_CPU_SPEED_MHZ
                return row, details, _chosen(f"{row['name']} ({need})", f"custom offering sized to the source's "
                                             f"{need}", id=row["id"])
        fixed = [r for r in rows if not r.get("iscustomized") and r.get("cpunumber") and r.get("memory")]
        if not fixed:
            raise DestinationError(f"CloudStack offers no service offering for {need}: no custom offering allows "
                                   "it and there is no fixed one")

        def label(row):
            return f"{row['name']} ({row['cpunumber']} CPU(s), {row['memory']} MiB)"

        fits = [r for r in fixed if r["cpunumber"] >= shape.cpus and r["memory"] >= shape.memory_mib]
        if fits:
            row = min(fits, key=lambda r: (r["memory"] - shape.memory_mib, r["cpunumber"] - shape.cpus,
                                           r["id"] != self.config.service_offering_id))
            why = f"the smallest fixed offering that fits the source's {need} (no custom offering allows it)"
        else:
            row = max(fixed, key=lambda r: (r["memory"], r["cpunumber"]))
            why = f"no offering fits the source's {need}: the largest fixed one; the VM gets less than its source"
        return row, {}, _chosen(label(row), why, id=row["id"])

    @staticmethod
    def _boot_params(shape: VMShape) -> tuple[dict, dict]:
        """boottype/bootmode from the firmware, the disk controllers from the
        disk bus (details), and what each came from."""
        boot_type = "UEFI" if shape.firmware == "efi" else "BIOS"
        boot_mode = "SECURE" if shape.secure_boot else "LEGACY"
        controller = DISK_CONTROLLERS[shape.disk_bus]
        choices = {"boottype": _chosen(f"{boot_type} {boot_mode}", "the VM's firmware and Secure Boot"),
                   "rootdiskcontroller": _chosen(controller, f"the VM's disk bus {shape.disk_bus}")}
        if shape.disk_bus == "scsi" and shape.scsi_model != "virtio-scsi":
            choices["rootdiskcontroller"]["why"] += (f"; CloudStack's KVM gives SCSI disks a virtio-scsi "
                                                      f"controller, not the source's {shape.scsi_model}")
        if shape.tpm:
            choices["tpm"] = _chosen(None, "the source has a vTPM; CloudStack's deploy has no vTPM")
        return ({"boottype": boot_type, "bootmode": boot_mode,
                 "details": {"rootDiskController": controller, "dataDiskController": controller}}, choices)

    def convert_guest(self, name: str, shape: VMShape, disks: Sequence[DiskSpec]) -> str:
        """virt-v2v-in-place on the volumes while they are attached to the
        OMA, through their devices there (by the local destination's code:
        the same domain description and the same run), before define_vm
        takes them off the OMA. Refused when a volume is not on the OMA."""
        from replication.platforms.local.libvirt import LibvirtDestination

        devices = []
        for handle, key in disks:
            volume = self._volume(self._volume_of(handle))
            if volume.get("virtualmachineid") != self.config.oma_vm_id:
                raise DestinationError(f"volume {volume['id']} ({key}) is not attached to the OMA: it cannot be "
                                       "converted there")
            device = Path(self.config.device_dir) / device_name(volume["id"])
            if not device.exists():
                raise DestinationError(f"volume {volume['id']} ({key}) is attached to the OMA but {device} is "
                                       "missing")
            devices.append((str(device), key))
        converter = LibvirtDestination(run_dir=self.work_dir, domain_type=self.domain_type)
        where = ", ".join(device for device, _ in devices)
        try:
            return f"{converter.convert_guest(name, shape, devices)} on the OMA's {where}"
        except GuestNotConverted as exc:
            raise GuestNotConverted(f"{exc} (virt-v2v-in-place on the OMA's {where})") from None

    def start(self, vm: str) -> None:
        found = self._vm(vm)
        if found is None:
            raise DestinationError(f"no VM named {vm} in CloudStack")
        if found["state"] != "Running":
            self._call("startVirtualMachine", id=found["id"])

    def destroy(self, vm: str) -> None:
        """Stop it, take the replica volumes off it (a destroyed VM's root
        volume is deleted with it), destroy and expunge it."""
        found = self._vm(vm)
        if found is None:
            return
        if found["state"] not in ("Stopped", "Destroyed", "Expunging"):
            self._call("stopVirtualMachine", id=found["id"], forced=True)
        for volume in self._call("listVolumes", virtualmachineid=found["id"]).get("volume") or []:
            self._call("detachVolume", id=volume["id"])
        self._call("destroyVirtualMachine", id=found["id"], expunge=True)

    def console_text(self, vm: str) -> str:
        return ""

    def state(self, vm: str) -> str:
        found = self._vm(vm)
        return "absent" if found is None else STATES.get(found["state"], "unknown")

    def verify_boot(self, vm: str, probes: Sequence[str], pattern: str, timeout_s: float,
                    heartbeat: Callable[[], None]) -> BootEvidence:
        """CloudStack shows no console, screen, lease or agent to the OMA, so
        whatever ``probes`` ask for (and ``pattern``, ``timeout_s``), its one
        probe is 'running': the VM runs, and is still running
        CLOUDSTACK_BOOT_SETTLE_S later."""
        deadline = time.monotonic() + self.settle_s
        while time.monotonic() < deadline:
            state = self.state(vm)
            if state != "running":
                raise DestinationError(f"VM {vm} is {state} {self.settle_s - (deadline - time.monotonic()):.0f} s "
                                       "after its start")
            time.sleep(min(1.0, self.settle_s / 4))
        return BootEvidence("running", f"CloudStack shows no console: running for {self.settle_s:.0f} s")

    def free_memory_mib(self) -> int | None:
        """The zone's memory not yet allocated (listCapacity, type 0)."""
        rows = self._call("listCapacity", zoneid=self.config.zone_id, type=0).get("capacity") or []
        if not rows:
            return None
        return max(int(rows[0]["capacitytotal"]) - int(rows[0]["capacityused"]), 0) // 2**20

    def check_ready(self) -> str:
        """What a CloudStack VM is made from: a template and a service
        offering, present in the cloud (with the zone, network and OMA VM)."""
        missing = [what for what, value in (("--template", self.config.template_id),
                                            ("--service-offering", self.config.service_offering_id)) if not value]
        if missing:
            raise DestinationError(f"cloud {self.config.name} has no {' and no '.join(missing)} to deploy a "
                                   "failed-over VM from: manage.py add_cloud ... " + " ".join(missing))
        try:
            return ", ".join(self._client().check())
        except CloudError as exc:
            raise DestinationError(str(exc)) from None

    def has_network(self, network: str) -> bool:
        return bool(self._call("listNetworks", id=network).get("network"))

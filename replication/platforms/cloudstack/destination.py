"""CloudStack as the failover destination: the replica volumes themselves
boot, as MigrateKit OSSEA's OMA does it. Their point-in-time protection is a CloudStack
snapshot of each volume (the rollback point); the VM is deployed stopped
from the config's template and service offering, the template's root
volume is replaced by the boot disk's volume (device 0) and the other
volumes follow in disk order; destroying the VM first takes its volumes off
it (CloudStack deletes a destroyed VM's root volume); discarding a
protection reverts the volume to its snapshot, deletes the snapshot and
attaches the volume to the OMA again.

CloudStack has no API for a guest's console: a VM counts as booted once it
has run for CLOUDSTACK_BOOT_SETTLE_S, and the step says so. Guest conversion is not run here."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

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

# CloudStack's VM states as the destination interface names them.
STATES = {"Running": "running", "Starting": "running", "Stopped": "shutoff", "Stopping": "shutdown",
          "Error": "crashed", "Destroyed": "absent", "Expunging": "absent", "Migrating": "running"}


class CloudStackDestination(Destination):
    name = "cloudstack"
    replica_boots_in_place = True

    def __init__(self, config: CloudStackConfig, *, job_timeout_s: float, settle_s: float):
        self.config = config
        self.job_timeout_s = job_timeout_s
        self.settle_s = settle_s

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
        if self._vm(name) is not None:
            raise DestinationError(f"a VM named {name} already exists in CloudStack; destroy it first")
        specs = [(d, "") if isinstance(d, str) else d for d in disks]
        if shape.disks:
            order = {key: i for i, key in enumerate(shape.disks)}
            specs.sort(key=lambda spec: order.get(spec[1], len(order)))
        volume_ids = [self._volume_of(handle) for handle, _ in specs]
        for volume_id in volume_ids:
            if self._volume(volume_id).get("virtualmachineid"):
                self._call("detachVolume", id=volume_id)
        networks = self._networks(shape, network)
        deployed = self._call("deployVirtualMachine", name=name, displayname=name, zoneid=self.config.zone_id,
                              serviceofferingid=self.config.service_offering_id, templateid=self.config.template_id,
                              startvm=False, **({"networkids": ",".join(networks)} if networks else {}))
        vm = deployed["virtualmachine"]
        template_root = [v for v in self._call("listVolumes", virtualmachineid=vm["id"]).get("volume") or []
                         if v.get("type") == "ROOT"]
        for volume in template_root:  # the boot disk's volume takes its place
            self._call("detachVolume", id=volume["id"])
            self._call("deleteVolume", id=volume["id"])
        for device, volume_id in enumerate(volume_ids):
            self._call("attachVolume", id=volume_id, virtualmachineid=vm["id"], deviceid=device)
        return name

    def _networks(self, shape: VMShape, network: str | Mapping[str, str] | None) -> list[str]:
        if isinstance(network, str):
            return [network]
        if network:
            return list(dict.fromkeys(network[nic.source_network] for nic in shape.nics))
        return [self.config.network_id] if self.config.network_id else []

    def convert_guest(self, name: str, shape: VMShape, disks: Sequence[DiskSpec]) -> str:
        raise GuestNotConverted("guest conversion is not run for CloudStack destinations yet")

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

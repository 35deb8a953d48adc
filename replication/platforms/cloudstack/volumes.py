"""CloudStack volumes as target volumes: one CloudStack volume per source
disk, attached to the OMA's own VM, found as a block device by its id (the
virtio serial CloudStack gives it, under /dev/disk/by-id: never by guessing
/dev/vdX order), and exported by the same export server as local volumes
(a link named migration-vol-{uuid} in the volume directory points at the
device). Later cycles reuse the volume.

Its journal: the volumes are written in place (they are what a failed-over
VM boots), and each completed cycle's recovery point is a CloudStack volume
snapshot named point-<cycle>. A cycle cut off is thrown away by reverting
the volume to the last point's snapshot; expiring a point deletes its
snapshot (CloudStack's snapshots do not depend on each other)."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

from replication.models import CloudError, CloudStackConfig, TargetVolume
from replication.platforms.base import TargetProvider, VolumeError
from replication.platforms.cloudstack.client import CloudClient
from replication.platforms.local.volumes import LocalVolumeProvider

GiB = 1024**3
# A snapshot on its way to BackedUp (CloudStack's Snapshot.State), and the
# seconds between two looks at it.
SNAPSHOT_PENDING = ("Allocated", "Creating", "CreatedOnPrimary", "BackingUp", "Copying")
SNAPSHOT_POLL_S = 0.2


def device_name(volume_id: str) -> str:
    """KVM gives a CloudStack volume the serial of its id without dashes,
    20 characters: the guest sees it as /dev/disk/by-id/virtio-<serial>."""
    return f"virtio-{volume_id.replace('-', '')[:20]}"


class CloudStackVolumeProvider(TargetProvider):
    name = "cloudstack"

    def __init__(self, config: CloudStackConfig, exports: LocalVolumeProvider, *, job_timeout_s: float,
                 device_timeout_s: float):
        self.config = config
        self.exports = exports
        self.job_timeout_s = job_timeout_s
        self.device_timeout_s = device_timeout_s

    def client(self) -> CloudClient:
        return CloudClient(self.config, job_timeout_s=self.job_timeout_s)

    def provision(self, volume, size_bytes: int) -> Path:
        """The volume at the source's size (rounded up to whole GiB, the
        disk offering's unit), attached to the OMA, its device exported;
        returns the device path. Each step is skipped when already done."""
        client = self.client()
        cloud = self._volume(client, volume, size_bytes)
        device = self._attach_to_oma(client, cloud, volume.export_name)
        self.exports.ensure_export_server()
        return device

    def _attach_to_oma(self, client: CloudClient, cloud: dict, export_name: str) -> Path:
        """The volume attached to the OMA (unless it is), its device there,
        and the export's link to it; returns the device."""
        attached_to = cloud.get("virtualmachineid")
        if attached_to and attached_to != self.config.oma_vm_id:
            raise CloudError(f"CloudStack volume {cloud['id']} is attached to VM {cloud.get('vmname', attached_to)}, "
                             "not to the OMA: detach it there first")
        if not attached_to:
            client.call("attachVolume", id=cloud["id"], virtualmachineid=self.config.oma_vm_id)
        device = self.wait_for_device(cloud["id"])
        self._link(export_name, device)
        return device

    @staticmethod
    def _cloud_volume(client: CloudClient, volume: TargetVolume) -> dict:
        """The volume as CloudStack shows it now (listVolumes)."""
        if not volume.cloud_volume_id:
            raise VolumeError(f"{volume.export_name} has no CloudStack volume yet (not provisioned)")
        cloud = client.one("listVolumes", "volume", id=volume.cloud_volume_id)
        if cloud is None:
            raise CloudError(f"CloudStack volume {volume.cloud_volume_id} of {volume.export_name} is gone "
                             "(deleted outside the OMA?)")
        return cloud

    def _volume(self, client: CloudClient, volume: TargetVolume, size_bytes: int) -> dict:
        if volume.cloud_volume_id:
            cloud = self._cloud_volume(client, volume)
            if int(cloud["size"]) < size_bytes:
                raise VolumeError(f"CloudStack volume {cloud['id']} is {int(cloud['size'])} bytes, smaller than "
                                  f"its source disk ({size_bytes} bytes); resizing is not supported")
            return cloud
        size_gib = max(1, math.ceil(size_bytes / GiB))
        disk = volume.source_disk
        name = f"{disk.vm.name}-{disk.disk_key}"[:250] if disk else volume.export_name
        created = client.call("createVolume", name=name, zoneid=self.config.zone_id,
                              diskofferingid=self.config.disk_offering_id, size=size_gib)["volume"]
        TargetVolume.objects.filter(pk=volume.pk).update(cloud_volume_id=created["id"], requested_bytes=size_bytes,
                                                         size_bytes=int(created["size"]))
        volume.cloud_volume_id = created["id"]
        return created

    def wait_for_device(self, volume_id: str) -> Path:
        device = Path(self.config.device_dir) / device_name(volume_id)
        deadline = time.monotonic() + self.device_timeout_s
        while not device.exists():
            if time.monotonic() > deadline:
                raise CloudError(f"CloudStack attached volume {volume_id} to the OMA, but no device appeared at "
                                 f"{device} within {self.device_timeout_s:.0f} s")
            time.sleep(0.1)
        return device

    def _link(self, export_name: str, device: Path) -> None:
        self.exports.volume_dir.mkdir(parents=True, exist_ok=True)
        link = self.exports.volume_path(export_name)
        if link.is_symlink() and os.readlink(link) == str(device):
            return
        partial = link.with_name(link.name + ".link")
        partial.unlink(missing_ok=True)
        os.symlink(device, partial)
        os.replace(partial, link)

    def delete(self, volume) -> str:
        """Detach the volume from the OMA and delete it in CloudStack; refused
        while another VM (a failed-over one) has it."""
        client = self.client()
        self.exports.delete(volume)
        if not volume.cloud_volume_id:
            return f"{volume.export_name} had no CloudStack volume"
        cloud = client.one("listVolumes", "volume", id=volume.cloud_volume_id)
        if cloud is None:
            return f"CloudStack volume {volume.cloud_volume_id} was already gone"
        attached_to = cloud.get("virtualmachineid")
        if attached_to and attached_to != self.config.oma_vm_id:
            raise CloudError(f"CloudStack volume {cloud['id']} is attached to VM {cloud.get('vmname', attached_to)}; "
                             "refusing to delete it")
        if attached_to:
            client.call("detachVolume", id=cloud["id"])
        client.call("deleteVolume", id=cloud["id"])
        return f"CloudStack volume {cloud['id']} detached and deleted"

    def export_uri(self, export_name: str) -> str:
        return self.exports.export_uri(export_name)

    def ensure_export_server(self) -> int:
        return self.exports.ensure_export_server()

    def stop_export_server(self) -> None:
        self.exports.stop_export_server()

    # -- the journal -------------------------------------------------------------

    @staticmethod
    def point_name(cycle: str) -> str:
        """The name of the snapshot that is the cycle's recovery point."""
        return f"point-{cycle}"

    def open_layer(self, volume, cycle: str, base: str | None) -> str:
        """The cycle writes the volume itself, whatever `base` is: the
        volume attached to the OMA again if a discard was cut off between
        its detach and its attach, served by the export server."""
        if volume.cloud_volume_id:
            client = self.client()
            self._attach_to_oma(client, self._cloud_volume(client, volume), volume.export_name)
        self.exports.ensure_export_server()
        return self.export_uri(volume.export_name)

    def seal_layer(self, volume, cycle: str, base: str | None) -> str:
        """The cycle's point: a snapshot of the volume named point-<cycle>,
        usable (state BackedUp) before it counts; returns its id. A snapshot
        of that name on the volume already is that point (a seal retried
        after a crash): waited for, not taken twice; one left in state Error
        by a failed job is deleted and taken again."""
        client = self.client()
        cloud = self._cloud_volume(client, volume)
        name = self.point_name(cycle)
        rows = client.call("listSnapshots", volumeid=cloud["id"], name=name).get("snapshot") or []
        snapshot = rows[0] if rows else None
        if snapshot is not None and snapshot.get("state") == "Error":
            client.call("deleteSnapshot", id=snapshot["id"])
            snapshot = None
        if snapshot is None:
            snapshot = self._take_snapshot(client, cloud, name, volume.export_name)
        return self._backed_up(client, snapshot["id"])["id"]

    def _kvm_snapshots_of_running_vms(self, client: CloudClient) -> bool:
        """Whether the cloud snapshots a volume of a running VM (the global
        setting kvm.snapshot.enabled, as listCapabilities shows it)."""
        capability = client.call("listCapabilities").get("capability") or {}
        return bool(capability.get("kvmsnapshotenabled"))

    def _take_snapshot(self, client: CloudClient, cloud: dict, name: str, export_name: str) -> dict:
        """createSnapshot of the volume. The OMA is a running VM: where the
        cloud does not snapshot a running VM's volume, the volume is
        detached from the OMA for it and attached again (the cycle that
        wrote it has completed: no copy has it open)."""
        detach = (cloud.get("virtualmachineid") == self.config.oma_vm_id
                  and not self._kvm_snapshots_of_running_vms(client))
        if detach:
            client.call("detachVolume", id=cloud["id"])
        try:
            return client.call("createSnapshot", volumeid=cloud["id"], name=name)["snapshot"]
        finally:
            if detach:
                self._attach_to_oma(client, client.one("listVolumes", "volume", id=cloud["id"]) or cloud,
                                    export_name)

    def _backed_up(self, client: CloudClient, snapshot_id: str) -> dict:
        """The snapshot once CloudStack reports it BackedUp (ready to be
        used), within the job timeout."""
        deadline = time.monotonic() + self.job_timeout_s
        while True:
            snapshot = client.one("listSnapshots", "snapshot", id=snapshot_id)
            if snapshot is None:
                raise CloudError(f"CloudStack snapshot {snapshot_id} disappeared while it was being taken")
            state = snapshot.get("state")
            if state == "BackedUp":
                return snapshot
            if state not in SNAPSHOT_PENDING:
                raise CloudError(f"CloudStack snapshot {snapshot['name']} ({snapshot_id}) is {state}, not BackedUp")
            if time.monotonic() > deadline:
                raise CloudError(f"CloudStack snapshot {snapshot['name']} ({snapshot_id}) is still {state} after "
                                 f"{self.job_timeout_s:.0f} s (CLOUDSTACK_JOB_TIMEOUT_S)")
            time.sleep(SNAPSHOT_POLL_S)

    def discard_layer(self, volume, cycle: str, base: str | None) -> str:
        """The cycle is thrown away: the volume reverted to the snapshot
        `base` (the last point), so it holds exactly that point again.
        CloudStack reverts a volume only while no running VM has it, and the
        OMA runs: the volume is detached from the OMA for the revert, and
        stays detached with its export's link removed (the fence: a late
        write from the cut-off cycle's agent finds no export) until the next
        cycle's open_layer attaches it again. Doing it twice reverts twice:
        the same result."""
        if base is None:
            return f"{volume.export_name}: nothing to revert, the volume holds no point yet (its first cycle)"
        client = self.client()
        snapshot = client.one("listSnapshots", "snapshot", id=base)
        if snapshot is None:
            raise CloudError(f"cannot revert {volume.export_name} to its last point: CloudStack snapshot {base} is "
                             "gone (deleted outside the OMA?)")
        if snapshot["volumeid"] != volume.cloud_volume_id:
            raise CloudError(f"CloudStack snapshot {base} is of volume {snapshot['volumeid']}, not of "
                             f"{volume.export_name}'s volume {volume.cloud_volume_id}: refusing to revert")
        cloud = self._cloud_volume(client, volume)
        attached_to = cloud.get("virtualmachineid")
        if attached_to and attached_to != self.config.oma_vm_id:
            raise CloudError(f"CloudStack volume {cloud['id']} is attached to VM {cloud.get('vmname', attached_to)}; "
                             "refusing to revert it under that VM")
        self.exports.volume_path(volume.export_name).unlink(missing_ok=True)
        if attached_to:
            client.call("detachVolume", id=cloud["id"])
        client.call("revertSnapshot", id=base)
        return (f"CloudStack volume {cloud['id']} reverted to snapshot {snapshot['name']} ({base}); detached from "
                "the OMA, its export closed until the next cycle")

    def merge_layers(self, older: str, newer: str, above: str | None) -> str:
        """CloudStack's snapshots are independent of each other: the older
        point expires by deleting its snapshot; `newer` stays as it is."""
        self.drop_layer(older)
        return newer

    def drop_layer(self, handle: str) -> None:
        """deleteSnapshot; a snapshot already gone is fine."""
        client = self.client()
        if client.one("listSnapshots", "snapshot", id=handle) is not None:
            client.call("deleteSnapshot", id=handle)

    def layer_bytes(self, handle: str) -> int:
        """The snapshot's physicalsize: what its backup takes on CloudStack's
        storage (on KVM a full copy of the volume's data, not its changes)."""
        snapshot = self.client().one("listSnapshots", "snapshot", id=handle)
        if snapshot is None:
            raise CloudError(f"CloudStack snapshot {handle} is gone (deleted outside the OMA?)")
        return int(snapshot.get("physicalsize") or 0)

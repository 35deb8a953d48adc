"""CloudStack volumes as target volumes: one CloudStack volume per source
disk, attached to the OMA's own VM, found as a block device by its id (the
virtio serial CloudStack gives it, under /dev/disk/by-id: never by guessing
/dev/vdX order), and exported by the same export server as local volumes
(a link named migration-vol-{uuid} in the volume directory points at the
device). Later cycles reuse the volume."""

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
        attached_to = cloud.get("virtualmachineid")
        if attached_to and attached_to != self.config.oma_vm_id:
            raise CloudError(f"CloudStack volume {cloud['id']} is attached to VM {cloud.get('vmname', attached_to)}, "
                             "not to the OMA: detach it there first")
        if not attached_to:
            client.call("attachVolume", id=cloud["id"], virtualmachineid=self.config.oma_vm_id)
        device = self.wait_for_device(cloud["id"])
        self._link(volume.export_name, device)
        self.exports.ensure_export_server()
        return device

    def _volume(self, client: CloudClient, volume: TargetVolume, size_bytes: int) -> dict:
        if volume.cloud_volume_id:
            cloud = client.one("listVolumes", "volume", id=volume.cloud_volume_id)
            if cloud is None:
                raise CloudError(f"CloudStack volume {volume.cloud_volume_id} of {volume.export_name} is gone "
                                 "(deleted outside the OMA?)")
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

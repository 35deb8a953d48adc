"""Target volumes: one per source disk, created once and reused."""

from __future__ import annotations

from replication.models import DeviceMapping, SourceDisk, TargetVolume
from replication.targets import get_provider


def volume_for(source_disk: SourceDisk) -> TargetVolume:
    """The disk's target volume row, created on first use (no I/O here)."""
    volume, _ = TargetVolume.objects.get_or_create(
        source_disk=source_disk, defaults={"size_bytes": source_disk.capacity_bytes}
    )
    return volume


def provision(volume: TargetVolume, size_bytes: int) -> None:
    """Make the volume exist at the source's size on its provider, exported."""
    provider = get_provider(volume.provider)
    path = provider.create_volume(volume.export_name, size_bytes)
    TargetVolume.objects.filter(pk=volume.pk).update(size_bytes=size_bytes, path=str(path))
    DeviceMapping.objects.update_or_create(
        volume=volume, defaults={"vm": volume.source_disk.vm, "device_path": str(path)}
    )
    provider.ensure_export_server()


def export_uri(volume: TargetVolume) -> str:
    return get_provider(volume.provider).export_uri(volume.export_name)

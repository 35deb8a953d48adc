"""Target volumes: one per source disk, created once and reused."""

from __future__ import annotations

from django.conf import settings

from replication.models import DeviceMapping, SourceDisk, TargetVolume
from replication.platforms import get_provider


def volume_for(source_disk: SourceDisk) -> TargetVolume:
    """The disk's target volume row, created on first use (no I/O here) on
    the provider OMA_VOLUME_PROVIDER names; it stays on that provider."""
    volume, _ = TargetVolume.objects.get_or_create(
        source_disk=source_disk, defaults={"size_bytes": source_disk.capacity_bytes,
                                           "provider": settings.OMA_VOLUME_PROVIDER}
    )
    return volume


def provision(volume: TargetVolume, size_bytes: int) -> None:
    """Make the volume exist at the source's size on its provider (a file, or
    a CloudStack volume attached to the OMA), exported by the export server."""
    path = get_provider(volume.provider).provision(volume, size_bytes)
    TargetVolume.objects.filter(pk=volume.pk).update(path=str(path))
    DeviceMapping.objects.update_or_create(
        volume=volume, defaults={"vm": volume.source_disk.vm, "device_path": str(path)}
    )


def export_uri(volume: TargetVolume) -> str:
    return get_provider(volume.provider).export_uri(volume.export_name)

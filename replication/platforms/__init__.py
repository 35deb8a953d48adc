"""Platforms: one package per place a VM lives, each with its target-volume
provider and its failover destination behind the interfaces of
replication.platforms.base. local: files served by the OMA's nbdkit export
server, VMs on local KVM through libvirt (the embedded default).
cloudstack: CloudStack volumes attached to the OMA, VMs booted from them.

The factories here are the one place that picks a platform's class."""

from __future__ import annotations

import atexit
import os
from pathlib import Path

from django.conf import settings

from replication.choices import VolumeProvider
from replication.platforms.base import Destination, DestinationError, TargetProvider, VMShape
from replication.platforms.local.volumes import LocalVolumeProvider

__all__ = ["Destination", "DestinationError", "TargetProvider", "VMShape", "destination_for", "get_destination",
           "get_provider", "local_provider", "on_cloudstack"]

# One destination (and so one libvirt connection) per process and settings:
# a connection must not cross a fork (Celery's prefork pool), hence the pid.
_cache: dict[tuple, Destination] = {}


@atexit.register
def _close_all() -> None:
    # Closed before interpreter shutdown tears down libvirt's module, whose
    # connection finalizer otherwise complains on exit.
    for key, destination in list(_cache.items()):
        if key[0] == os.getpid():
            destination.close()
    _cache.clear()


def local_provider() -> LocalVolumeProvider:
    """The local files and the export server that serves every platform's volumes."""
    return LocalVolumeProvider(settings.OMA_VOLUME_DIR, settings.OMA_RUN_DIR,
                               tls_psk_file=settings.OMA_EXPORT_TLS_PSK_FILE or None,
                               tls_username=settings.OMA_EXPORT_TLS_USERNAME,
                               extra_args=settings.OMA_EXPORT_NBDKIT_ARGS, listen=settings.OMA_EXPORT_LISTEN)


def get_provider(name: str = VolumeProvider.LOCAL) -> TargetProvider:
    if name == VolumeProvider.LOCAL:
        return local_provider()
    if name == VolumeProvider.CLOUDSTACK:
        from replication.models import CloudStackConfig
        from replication.platforms.cloudstack.volumes import CloudStackVolumeProvider

        return CloudStackVolumeProvider(CloudStackConfig.active(), local_provider(),
                                        job_timeout_s=settings.CLOUDSTACK_JOB_TIMEOUT_S,
                                        device_timeout_s=settings.CLOUDSTACK_DEVICE_TIMEOUT_S)
    raise ValueError(f"no target provider named {name!r} is configured")


def get_destination(name: str = "libvirt") -> Destination:
    if name == "cloudstack":
        from replication.models import CloudError, CloudStackConfig
        from replication.platforms.cloudstack.destination import CloudStackDestination

        try:
            config = CloudStackConfig.active()
        except CloudError as exc:
            raise DestinationError(str(exc)) from None
        return CloudStackDestination(config, job_timeout_s=settings.CLOUDSTACK_JOB_TIMEOUT_S,
                                     settle_s=settings.CLOUDSTACK_BOOT_SETTLE_S,
                                     work_dir=Path(settings.FAILOVER_DIR) / "cloudstack",
                                     domain_type=settings.LIBVIRT_DOMAIN_TYPE or None)
    if name != "libvirt":
        raise DestinationError(f"no destination named {name!r} is configured")
    from replication.platforms.local.libvirt import LibvirtDestination

    key = (os.getpid(), name, settings.LIBVIRT_URI, str(settings.FAILOVER_DIR), settings.FAILOVER_TEST_NETWORK,
           settings.LIBVIRT_DOMAIN_TYPE, settings.VIRTIO_WIN)
    if key not in _cache:
        _cache[key] = LibvirtDestination(settings.LIBVIRT_URI, Path(settings.FAILOVER_DIR),
                                         network=settings.FAILOVER_TEST_NETWORK or None,
                                         domain_type=settings.LIBVIRT_DOMAIN_TYPE or None,
                                         virtio_win=settings.VIRTIO_WIN)
    return _cache[key]


def on_cloudstack(vm) -> bool:
    """Whether the VM's replicas are CloudStack volumes: then its failovers
    boot them in place (Destination.replica_boots_in_place)."""
    from replication.models import TargetVolume

    return TargetVolume.objects.filter(source_disk__vm=vm, provider=VolumeProvider.CLOUDSTACK).exists()


def destination_for(vm) -> Destination:
    """Where this VM fails over to: CloudStack when its replicas are CloudStack
    volumes (they boot there), else local KVM through libvirt."""
    return get_destination("cloudstack" if on_cloudstack(vm) else "libvirt")

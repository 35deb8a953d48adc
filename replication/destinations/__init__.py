"""Destinations: where a failed-over VM runs, through one interface
(replication.destinations.base): local KVM through libvirt (the default),
or CloudStack for VMs whose replicas are CloudStack volumes."""

from __future__ import annotations

import atexit
import os
from pathlib import Path

from replication.destinations.base import Destination, DestinationError, VMShape

__all__ = ["Destination", "DestinationError", "VMShape", "destination_for", "get_destination"]

# One destination (and so one libvirt connection) per process and settings:
# a connection must not cross a fork (Celery's prefork pool), hence the pid.
_cache: dict[tuple, Destination] = {}


@atexit.register
def _close_all() -> None:
    # Closed before interpreter shutdown tears down libvirt's module, whose
    # connection finalizer otherwise complains on exit.
    for key, destination in list(_cache.items()):
        if key[0] == os.getpid() and hasattr(destination, "close"):
            destination.close()
    _cache.clear()


def get_destination(name: str = "libvirt") -> Destination:
    from django.conf import settings

    if name == "cloudstack":
        from replication.destinations.cloudstack import CloudStackDestination
        from replication.models import CloudError, CloudStackConfig

        try:
            config = CloudStackConfig.active()
        except CloudError as exc:
            raise DestinationError(str(exc)) from None
        return CloudStackDestination(config, job_timeout_s=settings.CLOUDSTACK_JOB_TIMEOUT_S,
                                     settle_s=settings.CLOUDSTACK_BOOT_SETTLE_S)
    if name != "libvirt":
        raise DestinationError(f"no destination named {name!r} is configured")
    from replication.destinations.libvirt import LibvirtDestination

    key = (os.getpid(), name, settings.LIBVIRT_URI, str(settings.FAILOVER_DIR), settings.FAILOVER_TEST_NETWORK,
           settings.LIBVIRT_DOMAIN_TYPE)
    if key not in _cache:
        _cache[key] = LibvirtDestination(settings.LIBVIRT_URI, Path(settings.FAILOVER_DIR),
                                         network=settings.FAILOVER_TEST_NETWORK or None,
                                         domain_type=settings.LIBVIRT_DOMAIN_TYPE or None)
    return _cache[key]


def destination_for(vm) -> Destination:
    """Where this VM fails over to: CloudStack when its replicas are CloudStack
    volumes (they boot there), else local KVM through libvirt."""
    from replication.choices import VolumeProvider
    from replication.models import TargetVolume

    on_cloud = TargetVolume.objects.filter(source_disk__vm=vm, provider=VolumeProvider.CLOUDSTACK).exists()
    return get_destination("cloudstack" if on_cloud else "libvirt")

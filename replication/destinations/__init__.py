"""Destinations: where a failed-over VM runs (libvirt by default; CloudStack
later through the same interface, replication.destinations.base)."""

from __future__ import annotations

import atexit
import os
from pathlib import Path

from replication.destinations.base import Destination, DestinationError, VMShape

__all__ = ["Destination", "DestinationError", "VMShape", "get_destination"]

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

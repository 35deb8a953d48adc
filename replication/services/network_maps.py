"""The network mapping a live failover follows (a source network's name in
vCenter -> a destination network): one set of rules for `manage.py
network_map` and the pages."""

from __future__ import annotations

from replication.choices import VMState
from replication.models import NetworkMapping, VirtualMachine
from replication.platforms import get_destination
from replication.platforms.base import DestinationError


class NetworkMapError(ValueError):
    """The mapping is refused; field says which input (source or destination) and str() why."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(message)


def map_network(source: str, destination: str) -> NetworkMapping:
    """Map `source` to `destination`, once the destination says it has that network."""
    if not source.strip():
        raise NetworkMapError("source", "give the source network")
    if not destination.strip():
        raise NetworkMapError("destination", "give the source network and the destination network it maps to")
    try:
        known = get_destination().has_network(destination)
    except DestinationError as exc:
        raise NetworkMapError("destination", f"cannot check destination network {destination!r}: {exc}") from exc
    if not known:
        raise NetworkMapError("destination", f"the destination has no network named {destination!r}")
    mapping, _ = NetworkMapping.objects.update_or_create(source_network=source,
                                                         defaults={"destination_network": destination})
    return mapping


def unmapped_reason(source: str) -> str:
    return f"source network {source!r} is not mapped" if source else "give the source network whose mapping goes"


def unmap_network(source: str) -> None:
    """Drop the mapping of `source`; NetworkMapError when there is none."""
    deleted, _ = NetworkMapping.objects.filter(source_network=source).delete()
    if not deleted:
        raise NetworkMapError("source", unmapped_reason(source))


def vms_on(source: str) -> list[str]:
    """The names of the VMs (decommissioned ones aside) with a NIC on source network `source`."""
    if not source:
        return []
    vms = VirtualMachine.objects.exclude(context__state=VMState.DECOMMISSIONED).order_by("name")
    return [vm.name for vm in vms.only("name", "nics")
            if any(nic.get("network") == source for nic in vm.nics or [])]

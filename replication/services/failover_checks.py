"""What a failover needs before it touches anything, checked one by one: the
workflow stops at the first that fails (preflight), and the live failover's
confirmation page shows them all with the reason of each (report)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from django.conf import settings

from replication.choices import VM_STATE_REFUSALS, FailoverKind, VMState
from replication.models import FailoverJob, NetworkMapping, RecoveryPoint, ReplicationJob, VirtualMachine, VMContext
from replication.platforms.base import NIC, Destination, DestinationError, VMShape
from replication.services import hardware as hardware_service
from replication.services.hardware import Hardware


class FailoverError(Exception):
    """A failover cannot start or go on; the message is the reason."""


def volumes_of(point: RecoveryPoint | None, destination: Destination) -> list[tuple[str, str]]:
    """Every disk of the recovery point, in disk order, as the destination
    boots it: (handle, disk key). Locally that is the point's layer of each
    volume (an overlay goes over it); where failovers boot the replica
    volumes themselves, only the newest point can boot."""
    if point is None or point.status != RecoveryPoint.Status.SEALED:
        raise FailoverError("the recovery point to fail over to is gone or expired")
    layers = list(point.layers.select_related("volume").order_by("disk_key"))
    if not layers:
        raise FailoverError(f"recovery point {point.pk} has no disks")
    if destination.replica_boots_in_place:
        newest = RecoveryPoint.newest(point.vm)
        if newest is not None and newest.pk != point.pk:
            raise FailoverError(f"{destination.name} boots the replica volumes themselves: only the newest recovery "
                                f"point ({newest.pk}) can boot there, not {point.pk}")
        return [(destination.replica_handle(layer.volume), layer.disk_key) for layer in layers]
    for layer in layers:
        if not Path(layer.handle).exists():
            raise FailoverError(f"{layer.disk_key}: the layer {layer.handle} of recovery point {point.pk} is missing")
    return [(layer.handle, layer.disk_key) for layer in layers]


def shape_of(cycle: ReplicationJob, disk_keys: list[str], hardware: Hardware | None = None) -> VMShape:
    """The VM as the cycle being booted recorded it (boot order among the
    disks it replicated); what it does not know, the destination's defaults
    (FAILOVER_DEFAULT_CPUS, FAILOVER_DEFAULT_MEMORY_MIB). Its firmware,
    buses and NIC model as services.hardware decides (``hardware``, else
    decided now from the source, the expected conversion and the operator)."""
    shape = cycle.vm_shape or {}
    hardware = hardware or hardware_service.for_vm(cycle.vm, shape)
    return VMShape(cpus=shape.get("cpus") or settings.FAILOVER_DEFAULT_CPUS,
                   memory_mib=shape.get("memory_mib") or settings.FAILOVER_DEFAULT_MEMORY_MIB,
                   **{key: hardware.value(key) for key in hardware_service.KEYS},
                   disks=tuple(key for key in shape.get("disks") or () if key in disk_keys),
                   nics=tuple(NIC(mac=n.get("mac") or None, source_network=n.get("network") or "",
                                  ip=n.get("ip") or None) for n in shape.get("nics") or ()))


def production_network(shape: VMShape, destination: Destination) -> dict[str, str] | None:
    """A live failover's NICs join the networks the mapping names; a NIC
    whose source network is not mapped stops the failover before the source
    is touched."""
    if not shape.nics:
        return None
    mapping = NetworkMapping.as_dict()
    for nic in shape.nics:
        target = mapping.get(nic.source_network)
        if not target:
            raise FailoverError(f"NIC {nic.mac or '?'} is on source network {nic.source_network!r}, which maps to "
                                f"no destination network: manage.py network_map {nic.source_network!r} NETWORK")
        if not destination.has_network(target):
            raise FailoverError(f"source network {nic.source_network!r} maps to {target!r}, which the destination "
                                "does not have")
    try:
        destination.check_nics("the VM", shape, mapping)
    except DestinationError as exc:
        raise FailoverError(str(exc)) from None
    return mapping


def space_for_overlays() -> str:
    run_dir = Path(settings.FAILOVER_DIR)
    run_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(run_dir).free
    if free < settings.FAILOVER_MIN_FREE_BYTES:
        raise FailoverError(f"not enough space for the overlays in {run_dir}: {free // 2**20} MiB free, "
                            f"{settings.FAILOVER_MIN_FREE_BYTES // 2**20} MiB needed (FAILOVER_MIN_FREE_BYTES)")
    return f"{free / 2**30:.1f} GiB free in {run_dir}"


def destination_ready(destination: Destination) -> str:
    """What the destination needs besides the volumes (CloudStack: its template
    and offerings present); DestinationError says what is missing."""
    return destination.check_ready()


def name_free(destination: Destination, name: str) -> str:
    if (state := destination.state(name)) != "absent":
        raise FailoverError(f"the destination already has a VM named {name} ({state})")
    return f"{name} is free"


def memory_for(destination: Destination, shape: VMShape) -> str:
    free_mib = destination.free_memory_mib()
    if free_mib is not None and free_mib < shape.memory_mib:
        raise FailoverError(f"the destination has {free_mib} MiB of memory free; the VM needs {shape.memory_mib} MiB")
    return f"{shape.memory_mib} MiB needed, {'?' if free_mib is None else free_mib} MiB free"


def nothing_running(vm: VirtualMachine) -> str:
    if (active := vm.active_job()) is not None:
        raise FailoverError(f"a replication cycle is running ({active.id}, {active.status}); wait until it ends")
    if (open_failover := FailoverJob.open(vm).first()) is not None:
        raise FailoverError(f"a {open_failover.kind} failover is open ({open_failover.pk}, {open_failover.status})")
    return "no cycle or failover running"


def preflight(job: FailoverJob, destination: Destination) -> list[tuple[str, str]]:
    """The volumes to boot from, once everything a failover needs is there:
    the cycle and its volumes, room for the overlays, a free VM name; for a
    live failover also nothing else running, the memory and a destination
    network for every NIC. Raises FailoverError with the first reason."""
    volumes = volumes_of(job.recovery_point, destination)
    space_for_overlays()
    destination_ready(destination)
    name_free(destination, job.destination_vm)
    if job.kind == FailoverKind.LIVE:
        if not job.source_lost and (active := job.vm.active_job()) is not None:
            raise FailoverError(f"a replication cycle is running ({active.id}); wait until it ends")
        shape = shape_of(job.replication_job, [key for _, key in volumes])
        memory_for(destination, shape)
        production_network(shape, destination)
    return volumes


def report(vm: VirtualMachine, destination_name: str) -> list[dict]:
    """Every check of a live failover of the VM, as it would run now:
    [{"check", "ok", "detail"}] (the confirmation page shows them)."""
    from replication.platforms import destination_for

    checks: list[dict] = []

    def check(name: str, run: Callable[[], str]) -> None:
        try:
            checks.append({"check": name, "ok": True, "detail": run()})
        except (FailoverError, DestinationError) as exc:
            checks.append({"check": name, "ok": False, "detail": str(exc)})

    context = VMContext.of(vm)
    point = RecoveryPoint.newest(vm)
    cycle = point.job if point else None

    def state() -> str:
        if context.state != VMState.READY_FOR_FAILOVER:
            raise FailoverError(VM_STATE_REFUSALS.get(context.state, f"it is {context.state}"))
        return f"ready for failover; newest recovery point {point.pk if point else '?'} ({cycle.id if cycle else '?'})"

    check("state", state)
    check("nothing running", lambda: nothing_running(vm))
    check("space for the overlays", space_for_overlays)
    destination = None
    try:
        destination = destination_for(vm)
        check("recovery point", lambda: f"{len(volumes_of(point, destination))} disk(s) present")
        check("destination", lambda: destination_ready(destination))
        check("destination VM name", lambda: name_free(destination, destination_name))
    except DestinationError as exc:
        checks.append({"check": "destination", "ok": False, "detail": str(exc)})
    if cycle is not None and destination is not None:
        keys = list(cycle.disks.values_list("disk_key", flat=True))
        shape = shape_of(cycle, keys)
        check("memory", lambda: memory_for(destination, shape))
        check("networks", lambda: _networks_text(production_network(shape, destination), shape))
    return checks


def _networks_text(mapping: dict[str, str] | None, shape: VMShape) -> str:
    if not mapping:
        return "the VM has no NICs"
    return ", ".join(f"{n.mac or '?'}: {n.source_network} -> {mapping[n.source_network]}" for n in shape.nics)

"""Taking a VM out of protection: its replicas go (CloudStack volumes
detached from the OMA and deleted, local files removed), and with them the
committed changeIds, so that a later cycle starts with a full copy into new
volumes instead of writing changes into a blank one."""

from __future__ import annotations

import logging

from django.db import transaction
from django.utils import timezone

from replication.choices import VM_STATE_REFUSALS, VMState
from replication.models import (
    DeviceMapping,
    FailoverJob,
    IllegalMove,
    SourceDisk,
    TargetVolume,
    VirtualMachine,
    VMContext,
)
from replication.platforms import get_provider

log = logging.getLogger(__name__)


class ProtectionError(Exception):
    """The VM's replicas cannot be removed now; the message says why."""


def remove_replicas(vm: VirtualMachine, actor: str = "operator") -> list[str]:
    """Delete every replica volume of the VM on its provider; returns what was
    done per volume. Refused while a cycle runs or a failover is open."""
    with transaction.atomic():
        vm = VirtualMachine.objects.select_for_update().get(pk=vm.pk)
        if (active := vm.active_job()) is not None:
            raise ProtectionError(f"VM {vm.name} has a replication cycle running ({active.id}); cancel it first")
        if (failover := FailoverJob.open(vm).first()) is not None:
            raise ProtectionError(f"VM {vm.name} has a {failover.kind} failover open ({failover.pk}); end or roll "
                                  "it back first")
        volumes = list(TargetVolume.objects.filter(source_disk__vm=vm, retired_at__isnull=True))
    done = []
    for volume in volumes:
        done.append(get_provider(volume.provider).delete(volume))
        # The row stays as the history of the jobs that wrote it, tied to no disk any more.
        TargetVolume.objects.filter(pk=volume.pk).update(source_disk=None, path="", retired_at=timezone.now())
        DeviceMapping.objects.filter(volume=volume).delete()
    SourceDisk.objects.filter(vm=vm).update(change_id="")
    try:
        VMContext.of(vm).move(VMState.DISCOVERED, actor=actor, reason=f"replicas removed ({len(volumes)} volume(s))")
    except IllegalMove as exc:
        log.info("state of %s left as it is: %s", vm.name, exc)
    return done


# The states a VM may be decommissioned from: nothing runs on it and its replicas may go.
DECOMMISSION_FROM = (VMState.DISCOVERED, VMState.READY_FOR_FAILOVER, VMState.FAILED)


def decommission_refusal(vm: VirtualMachine) -> str:
    """Why the VM cannot be decommissioned now ("" if it can)."""
    state = vm.lifecycle_state
    if state == VMState.DECOMMISSIONED:
        return f"VM {vm.name} is already decommissioned"
    if state not in DECOMMISSION_FROM:
        why = VM_STATE_REFUSALS.get(state, f"it is {state}")
        return f"VM {vm.name} cannot be decommissioned: {why}"
    if (active := vm.active_job()) is not None:
        return f"VM {vm.name} has a replication cycle running ({active.id}); cancel it first"
    if (failover := FailoverJob.open(vm).first()) is not None:
        return f"VM {vm.name} has a {failover.kind} failover open ({failover.pk}); end or roll it back first"
    return ""


def decommission(vm: VirtualMachine, actor: str = "operator") -> list[str]:
    """Retire the VM for good: its replicas are deleted on their provider,
    it leaves its protection group, and its lifecycle ends in
    decommissioned (hidden from the lists, never replicated again). Its
    jobs, failovers, recovery point rows and history stay. Refused, with
    nothing touched, while a cycle runs, a failover is open or its state
    forbids it. Returns what was done."""
    if why := decommission_refusal(vm):
        raise ProtectionError(why)
    done = remove_replicas(vm, actor=actor)
    VirtualMachine.objects.filter(pk=vm.pk).update(group=None)
    try:
        VMContext.of(vm).move(VMState.DECOMMISSIONED, actor=actor,
                              reason=f"decommissioned by {actor}: {len(done)} replica volume(s) removed")
    except IllegalMove as exc:
        raise ProtectionError(str(exc)) from exc
    return done

"""Taking a VM out of protection: its replicas go (CloudStack volumes
detached from the OMA and deleted, local files removed), and with them the
committed changeIds, so that a later cycle starts with a full copy into new
volumes instead of writing changes into a blank one."""

from __future__ import annotations

import logging

from django.db import transaction
from django.utils import timezone

from replication.choices import VMState
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

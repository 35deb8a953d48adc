"""Drills: a recovery rehearsed, not guessed. A group's drill (on its drill
schedule, or `drill run GROUP`) test-fails-over each of its VMs in turn:
the failover boots the last completed cycle on the destination from
overlays, its boot is verified on the guest's own console, the test is
ended; the VM passes or fails, with the recovery time it took (failover
asked -> boot verified). One VM at a time, so a drill never competes with
itself for the destination; the next starts when the previous has ended.

The failover workflow announces a test failover's end (signals.
test_failover_ended, received by on_test_failover_ended here); everything else
about drills is here."""

from __future__ import annotations

import logging

from django.db import transaction
from django.utils import timezone

from replication import dispatch
from replication.choices import DrillStatus, FailoverKind, FailoverStatus, VMState
from replication.models import DrillRun, ProtectionGroup
from replication.services.failover import FailoverError, end_test_failover, start_failover
from vma_agent import task_names

log = logging.getLogger(__name__)


class DrillError(Exception):
    """A drill cannot start; the message is the reason."""


def drill_due(group_id: int, actor: str = "schedule") -> list[DrillRun]:
    """Queue a drill of every VM of the group (none while its last drill
    still runs) and start the first. A paused group drills nothing.
    `actor`: who asked (the schedule, or a user), kept on each VM's run."""
    group = ProtectionGroup.objects.filter(pk=group_id).first()
    if group is None or group.paused:
        return []
    with transaction.atomic():
        if DrillRun.objects.filter(group=group, status__in=(DrillStatus.QUEUED, DrillStatus.RUNNING)).exists():
            log.info("drill of group %s skipped: the last one still runs", group.name)
            return []
        runs = [DrillRun.objects.create(group=group, vm=vm, requested_by=actor[:100])
                for vm in group.vms.order_by("name")]
    _start_next(group)
    return runs


def start_now(group: ProtectionGroup, actor: str) -> list[DrillRun]:
    if group.paused:
        raise DrillError(f"group {group.name} is paused")
    if not group.vms.exists():
        raise DrillError(f"group {group.name} has no VMs")
    runs = drill_due(group.pk, actor)
    if not runs:
        raise DrillError(f"a drill of group {group.name} is already running")
    return runs


def _start_next(group: ProtectionGroup) -> None:
    """Start the oldest queued VM's test failover; a VM that cannot fail
    over now fails its drill with the reason, and the next goes."""
    while True:
        with transaction.atomic():
            run = (DrillRun.objects.select_for_update().filter(group=group, status=DrillStatus.QUEUED)
                   .select_related("vm").order_by("queued_at", "id").first())
            if run is None:
                return
            now = timezone.now()
            if run.vm.lifecycle_state != VMState.READY_FOR_FAILOVER:
                _end(run, DrillStatus.FAILED, f"not ready for failover: it is {run.vm.lifecycle_label}", now)
                continue
            try:
                failover = start_failover(run.vm, FailoverKind.TEST, actor=_drill_actor(run))
            except FailoverError as exc:
                _end(run, DrillStatus.FAILED, str(exc), now)
                continue
            run.start(failover, now)
            return


def on_test_failover_ended(sender=None, *, failover_id: int, **kwargs) -> None:
    """Receives signals.test_failover_ended (booted, or failed and undone):
    if a drill started that failover, end the test, record the outcome, and
    go on, in a task of its own. A broker that cannot take it raises, to
    whoever ended the failover."""
    if DrillRun.objects.filter(failover_id=failover_id, status=DrillStatus.RUNNING).exists():
        transaction.on_commit(lambda: dispatch.publish(task_names.DRILL_CONTINUE, [failover_id]))


def drill_continue(failover_id: int) -> None:
    run = (DrillRun.objects.select_related("vm", "group", "failover")
           .filter(failover_id=failover_id, status=DrillStatus.RUNNING).first())
    if run is None:
        return
    failover, now = run.failover, timezone.now()
    if failover.status == FailoverStatus.SUCCEEDED:
        rto = (failover.completed_at - failover.created_at).total_seconds()
        try:
            end_test_failover(run.vm, actor=_drill_actor(run))
        except FailoverError as exc:
            _end(run, DrillStatus.FAILED, f"booted ({failover.boot_probe}: {failover.console_match}), but ending "
                                          f"the test failed: {exc}", now, rto)
        else:
            _end(run, DrillStatus.PASSED, f"booted ({failover.boot_probe}): {failover.console_match}", now, rto)
    else:
        _end(run, DrillStatus.FAILED, failover.error_message or f"test failover {failover.status}", now)
    if run.group is not None:
        _start_next(run.group)


def _drill_actor(run: DrillRun) -> str:
    """The VM's history names the drill and who asked for it."""
    return f"drill of group {run.group.name if run.group else '-'} by {run.requested_by}"[:100]


def _end(run: DrillRun, status: str, note: str, now, rto_s: float | None = None) -> None:
    run.end(status, note, now, rto_s)
    log.info("drill of VM %s %s: %s", run.vm.name, status, note)


def last_drills(vm_ids) -> dict[int, DrillRun]:
    """Each VM's last ended drill, by VM id."""
    from django.db.models import OuterRef, Subquery

    from replication.models import VirtualMachine

    last = (DrillRun.objects.filter(vm_id=OuterRef("pk"), status__in=(DrillStatus.PASSED, DrillStatus.FAILED))
            .order_by("-ended_at").values("id")[:1])
    ids = VirtualMachine.objects.filter(pk__in=vm_ids).annotate(drill_id=Subquery(last)).values_list("pk", "drill_id")
    runs = DrillRun.objects.in_bulk([drill_id for _, drill_id in ids if drill_id])
    return {vm_id: runs[drill_id] for vm_id, drill_id in ids if drill_id}

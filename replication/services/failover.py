"""Failover: boot a protected VM from its replica on the destination.

A test failover protects every replica volume of the VM at one point in
time without copying it (the destination's point-in-time protection: qcow2
overlays over the raw replicas for libvirt), boots a VM from the
protections on the isolated test network, verifies the boot on its console
and leaves it running for the operator. The replica is never written: the
guest's writes land in the overlays, and the VM's replication cycles are
paused meanwhile (its state is failed_over_test, which refuses a cycle with
that reason: a cycle writing into an overlay's backing file would change
what the running guest reads). Ending the test destroys the VM and the
overlays; the replica is byte-identical to what it was.

A live failover shuts the source down (through its agent: guest shutdown,
power-off after FAILOVER_SHUTDOWN_TIMEOUT_S), runs a final incremental
cycle, protects the volumes (the rollback point: the replica as the source
was when it went off), boots the VM on the production networks its
network mapping names, verifies it and records the downtime. A rollback
destroys that VM, discards the protections (the replica is back at the
rollback point, so the next cycle is incremental) and powers the source on.

Waiting on the agent or on the final cycle holds no worker: the agent's
answer (source_powered) and the final cycle's end (signals.cycle_ended) queue
the next step. A failed step undoes what the failover made, and a live
failover that shut its source down powers it back on."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from replication import dispatch, signals
from replication.choices import (
    FAILOVER_BOOT_STEPS,
    FAILOVER_OPEN,
    VM_STATE_REFUSALS,
    AgentState,
    FailoverKind,
    FailoverStatus,
    JobStatus,
    SourceKind,
    SyncType,
    VMState,
)
from replication.models import (
    Agent,
    FailoverJob,
    FailoverStep,
    IllegalMove,
    ReplicationJob,
    TargetVolume,
    VirtualMachine,
    VMContext,
)
from replication.platforms import destination_for, get_provider, on_cloudstack
from replication.platforms.base import (
    BootEvidence,
    Destination,
    DestinationError,
    GuestConversion,
    GuestNotConverted,
)
from replication.services import forecast, jobs, orders, points
from replication.services import hardware as hardware_service
from replication.services.failover_checks import FailoverError, preflight, production_network, shape_of
from replication.services.jobs import ReplicationError, start_replication
from vma_agent import task_names
from vma_agent.contract import POWER_ON, SHUT_DOWN, SourcePowered

log = logging.getLogger(__name__)
CONSOLE_TAIL_LINES = 20
STEP_SHUT_DOWN = "shut down source"
STEP_FINAL_CYCLE = "final incremental"
STEP_POWER_ON = "power on source"


# Starting ------------------------------------------------------------------------

_until = {FailoverKind.TEST: "end it", FailoverKind.LIVE: "roll it back", FailoverKind.ROLLBACK: "let it finish"}


def start_failover(vm: VirtualMachine, kind: str = FailoverKind.TEST, actor: str = "operator", *,
                   point_id: int | None = None, source_lost: bool = False) -> FailoverJob:
    """Record the failover from a recovery point (the newest unless one is
    chosen) in one transaction; its steps run in a task queued once that
    commits. A test failover runs beside the VM's cycles (its VM boots an
    overlay over a sealed point; new cycles add new points). A live one with
    the source site lost fences the VM's running cycle first and asks the
    lost site for nothing."""
    if kind not in (FailoverKind.TEST, FailoverKind.LIVE):
        raise FailoverError(f"a failover is test or live, not {kind!r}")
    if source_lost and kind != FailoverKind.LIVE:
        raise FailoverError("only a live failover can be run with the source site lost")
    if kind == FailoverKind.LIVE and not source_lost and point_id is not None:
        raise FailoverError("a live failover with its source alive boots the point its final cycle makes; a point "
                            "is chosen for a test failover, or a live one with the source site lost")
    with transaction.atomic():
        vm = VirtualMachine.objects.select_for_update().get(pk=vm.pk)
        running = FailoverJob.open(vm).first()
        if running is not None:
            raise FailoverError(f"VM {vm.name} already has a {running.kind} failover ({running.status}); "
                                f"{_until[running.kind]} first")
        try:
            point = points.chosen(vm, point_id)
        except points.PointError as exc:
            raise FailoverError(str(exc)) from None
        _check_may_start(vm, kind, source_lost)
        job = FailoverJob.objects.create(
            vm=vm, kind=kind, replication_job=point.job, recovery_point=point, source_lost=source_lost,
            actor=actor[:100], destination_vm=destination_name(vm, kind),
            forecast_downtime_s=forecast.downtime(vm)["total_s"] if kind == FailoverKind.LIVE else None)
        if source_lost and (active := vm.active_job()) is not None:
            # The fence: its exports close and its layers go once this commits,
            # so a late write from an agent cut off from us lands nowhere.
            jobs.cancel_job(active.id, f"fenced: the source site is lost (live failover {job.pk} by {actor})",
                            actor=actor)
        # A live failover moves the VM to failed_over_live once its VM is
        # verified; until then its open job refuses other cycles and failovers.
        _enqueue(job, task_names.RUN_FAILOVER)
    return job


def _check_may_start(vm: VirtualMachine, kind: str, source_lost: bool) -> None:
    """The VM's state and its running cycle allow this failover, or
    FailoverError says why. A VM with a point may fail over while a cycle
    runs (test: beside it; live with the source lost: the cycle is fenced),
    except where failovers boot the replica volumes themselves."""
    context = VMContext.of(vm)
    beside_cycle = kind == FailoverKind.TEST or source_lost
    allowed = {VMState.READY_FOR_FAILOVER} | ({VMState.REPLICATING, VMState.FAILED} if beside_cycle else set())
    if context.state not in allowed:
        why = VM_STATE_REFUSALS.get(context.state, f"it is {context.state}")
        raise FailoverError(f"VM {vm.name} cannot fail over: {why}")
    active = vm.active_job()
    if active is None or source_lost:
        return
    if not beside_cycle or on_cloudstack(vm):
        raise FailoverError(f"VM {vm.name} has a replication cycle running ({active.id}, {active.status}); "
                            "wait until it ends" + (" (its CloudStack volumes boot in place)" if beside_cycle else
                                                    ", or fail over with the source site lost"))


def start_rollback(vm: VirtualMachine, actor: str = "operator") -> FailoverJob:
    """Undo the VM's live failover: its destination VM goes, the volumes go
    back to the rollback point, the source powers on."""
    with transaction.atomic():
        vm = VirtualMachine.objects.select_for_update().get(pk=vm.pk)
        live = vm.failovers.filter(kind=FailoverKind.LIVE, status__in=FAILOVER_OPEN).first()
        if live is None:
            raise FailoverError(f"VM {vm.name} has no live failover to roll back")
        if live.status != FailoverStatus.SUCCEEDED:
            raise FailoverError(f"the live failover of {vm.name} is {live.status}; wait until it has booted or "
                                "failed (a failed one undoes itself)")
        if FailoverJob.open(vm).filter(kind=FailoverKind.ROLLBACK).exists():
            raise FailoverError(f"a rollback of {vm.name} is already running")
        job = FailoverJob.objects.create(vm=vm, kind=FailoverKind.ROLLBACK, rolls_back=live,
                                         replication_job=live.replication_job, actor=actor[:100],
                                         destination_vm=live.destination_vm, protection=live.protection)
        _enqueue(job, task_names.RUN_FAILOVER)
    return job


def _enqueue(job: FailoverJob, task_name: str) -> None:
    """Queue the failover's next step once the transaction commits; one the
    broker cannot take abandons the failover with the reason."""
    dispatch.enqueue_on_commit(task_name, [job.pk], what="the failover's next step", subject=f"failover {job.pk}",
                               on_failure=lambda reason: abandon(job.pk, reason))


def destination_name(vm: VirtualMachine, kind: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "-", vm.name)[:60]
    return f"oma-{kind}-{safe}"


# Steps ---------------------------------------------------------------------------

@contextlib.contextmanager
def _step(job: FailoverJob, name: str) -> Iterator[FailoverStep]:
    step = FailoverStep.begin(job, name)
    job.beat()
    try:
        yield step
    except Exception as exc:
        step.end(FailoverStep.Status.FAILED, str(exc))
        raise
    step.end(FailoverStep.Status.DONE, step.detail)


def _open_step(job: FailoverJob, name: str) -> None:
    """A step that ends when an answer arrives (the agent's, the final cycle's)."""
    FailoverStep.begin(job, name)
    job.beat()


def _close_step(job: FailoverJob, name: str, status: str, detail: str) -> bool:
    """End the running step of that name; False if there is none (a second
    delivery of the same answer)."""
    return bool(FailoverStep.end_running(job, status, detail, name=name))


def run_failover(job_id: int) -> None:
    """The failover's first steps (a test one's all of them); any failure
    undoes what it made and says why."""
    job = FailoverJob.objects.select_related("vm", "replication_job", "rolls_back").get(pk=job_id)
    if not job.transition(FailoverStatus.RUNNING, started_at=timezone.now(), heartbeat_at=timezone.now()):
        log.warning("failover %s not run: it is %s", job_id, job.status)
        return
    try:
        destination = destination_for(job.vm)
        if job.kind == FailoverKind.ROLLBACK:
            _run_rollback(job, destination)
            return
        with _step(job, "preflight") as step:
            volumes = preflight(job, destination)
            step.detail = f"{len(volumes)} volume(s) of {job.replication_job_id}"
        if job.kind == FailoverKind.TEST:
            _boot(job, destination, volumes)
            signals.test_failover_ended.send(sender=FailoverJob, failover_id=job.pk)
        elif job.source_lost:
            _boot(job, destination, volumes)  # nothing asked of the lost site
        else:
            _shut_down_source(job)
    except Exception as exc:
        log.exception("failover %s failed", job_id)
        abandon(job_id, str(exc))


def _boot(job: FailoverJob, destination, volumes: list[tuple[str, str]]) -> None:
    """Protect, define, start, verify; then the failover has succeeded."""
    keys = [key for _, key in volumes]
    shape = shape_of(job.replication_job, keys)
    # A test VM joins the destination's own test network (libvirt:
    # FAILOVER_TEST_NETWORK; CloudStack: the config's network); a live one the mapped ones.
    network = production_network(shape, destination) if job.kind == FailoverKind.LIVE else None
    with _step(job, "protect volumes") as step:
        job.protection = destination.protect([v for v, _ in volumes], f"{job.destination_vm}-{job.pk}")
        job.save(update_fields=["protection"])
        step.detail = ", ".join(job.protection)
    conversion, not_converted = None, ""
    if VMContext.of(job.vm).convert_guest:
        with _step(job, "convert guest") as step:
            try:
                done = destination.convert_guest(job.destination_vm, shape,
                                                 list(zip(job.protection, keys, strict=True)))
                step.detail = str(done)
                conversion = done if isinstance(done, GuestConversion) else None
            except GuestNotConverted as exc:
                step.detail = f"not converted: {exc}"  # it may boot all the same: the boot check decides
                not_converted = str(exc)
    # The buses and NIC model follow what the conversion decided (services.hardware).
    hardware = hardware_service.for_vm(job.vm, job.replication_job.vm_shape, conversion=conversion,
                                       not_converted=not_converted)
    shape = shape_of(job.replication_job, keys, hardware)
    with _step(job, "define VM") as step:
        destination.define_vm(job.destination_vm, shape, list(zip(job.protection, keys, strict=True)),
                              network=network)
        # What was decided here, and what the destination itself chose (a cloud's offering, its NICs).
        chosen = destination.hardware_choices(job.destination_vm)
        hardware_service.booted(job, hardware, chosen)
        step.detail = "; ".join([f"{hardware.summary()} ({hardware.origins()})"]
                                + [f"{what}: {c['value']} ({c['why']})" for what, c in chosen.items()
                                   if what != "nics"]
                                + ([f"warning: {hardware.warning}"] if hardware.warning else []))[:2000]
    with _step(job, "start VM"):
        destination.start(job.destination_vm)
    with _step(job, "verify boot") as step:
        evidence = _verify_boot(job, destination)
        step.detail = f"{evidence.probe}: {evidence.text}"
    fields = {"boot_verified": True, "boot_probe": evidence.probe, "console_match": evidence.text[:4000],
              "completed_at": timezone.now()}
    if job.kind == FailoverKind.LIVE:
        # From the source's shutdown; with the source lost, from the command.
        stopping = job.steps.filter(name=STEP_SHUT_DOWN).values_list("started_at", flat=True).first()
        fields["downtime_s"] = round((fields["completed_at"] - (stopping or job.created_at)).total_seconds(), 3)
        try:
            VMContext.of(job.vm).move(VMState.FAILED_OVER_LIVE, actor=job.actor,
                                      reason=f"live failover {job.pk}: {job.destination_vm} verified",
                                      only_from={VMState.READY_FOR_FAILOVER})
        except IllegalMove as exc:
            raise FailoverError(str(exc)) from None
    job.transition(FailoverStatus.SUCCEEDED, **fields)


def _verify_boot(job: FailoverJob, destination: Destination) -> BootEvidence:
    """What proves the boot, by the VM's boot check: its probes (the default
    ones when none is set) and regex (the default one when empty), within
    its timeout."""
    context = VMContext.of(job.vm)
    return destination.verify_boot(job.destination_vm, context.probes(), context.boot_check_regex,
                                   context.boot_check_timeout_s, heartbeat=job.beat)


# A live failover's waits: the source's power, the final cycle -------------------

def _power_source(job: FailoverJob, action: str, step: str) -> bool:
    """Ask the VM's agent to switch its source's power; the answer comes back
    as source_powered. False for a source with no power switch (a disk
    image): the step is done at once."""
    _open_step(job, step)
    if job.vm.source_kind != SourceKind.VMWARE:
        _close_step(job, step, FailoverStep.Status.DONE,
                    "a disk image has no power switch: whatever writes to it is the operator's to stop or start")
        return False
    revoked = _revoked_agent_of(job.vm)
    if revoked:
        why = (f"agent {revoked} is revoked: the OMA no longer asks it to {action.replace('_', ' ')} "
               f"{job.vm.name}")
        if action == SHUT_DOWN:
            why += "; if its site is lost, a live failover with the source site lost (--source-lost) needs no shutdown"
        _close_step(job, step, FailoverStep.Status.FAILED, why)
        raise AgentRevoked(why)
    timeout = settings.FAILOVER_SHUTDOWN_TIMEOUT_S
    FailoverJob.objects.filter(pk=job.pk).update(
        wait_until=timezone.now() + timedelta(seconds=timeout + settings.FAILOVER_AGENT_GRACE_S))
    orders.send_power(job, action, timeout)
    return True


class AgentRevoked(FailoverError):
    """The VM's agent is revoked: nothing is asked of it any more."""


def _revoked_agent_of(vm: VirtualMachine) -> str:
    """The name of the VM's agent when that agent is revoked, else ''."""
    return vm.agent if Agent.objects.filter(name=vm.agent, state=AgentState.REVOKED).exists() else ""


def end_power_waits_of(agent: str, reason: str) -> int:
    """Answer, with `reason` as the error, every power order a revoked
    agent's failovers still wait on (it will never answer, and its answers
    are refused): a live failover fails and is undone at once rather than
    at its deadline, a rollback ends telling the operator to power the
    source on in vCenter. The number of failovers answered."""
    answered = 0
    waiting = FailoverJob.objects.filter(vm__agent=agent, status=FailoverStatus.RUNNING, wait_until__isnull=False)
    for job in waiting:
        step = job.steps.filter(status=FailoverStep.Status.RUNNING, name__in=(STEP_SHUT_DOWN, STEP_POWER_ON)).first()
        if step is not None:
            source_powered(job.pk, SHUT_DOWN if step.name == STEP_SHUT_DOWN else POWER_ON, SourcePowered(error=reason))
            answered += 1
    return answered


def _shut_down_source(job: FailoverJob) -> None:
    if not _power_source(job, SHUT_DOWN, STEP_SHUT_DOWN):
        _start_final_cycle(job)


def source_powered(job_id: int, action: str, outcome: SourcePowered) -> None:
    """The agent's answer to a power order: the live failover goes on to its
    final cycle, a rollback ends; an error fails it (a live failover then
    powers its source back on)."""
    job = FailoverJob.objects.select_related("vm", "rolls_back").get(pk=job_id)
    error = outcome.error or ""
    detail = error or f"{outcome.how or '?'} ({outcome.power_state or '?'}) in {outcome.seconds} s"
    step = STEP_SHUT_DOWN if action == SHUT_DOWN else STEP_POWER_ON
    if not _close_step(job, step, FailoverStep.Status.FAILED if error else FailoverStep.Status.DONE, detail):
        log.info("failover %s: %s answer with no step waiting for it (a second delivery)", job_id, action)
        return
    FailoverJob.objects.filter(pk=job.pk).update(wait_until=None)
    if job.status != FailoverStatus.RUNNING:
        return  # an abandoned failover's source back on: nothing more to do
    if job.kind == FailoverKind.ROLLBACK:
        _finish_rollback(job, error)
    elif error:
        abandon(job.pk, error)
    else:
        try:
            _start_final_cycle(job)
        except Exception as exc:
            log.exception("failover %s: final cycle not started", job_id)
            abandon(job.pk, str(exc))


def _start_final_cycle(job: FailoverJob) -> None:
    """The source is off: one more cycle catches the replica up with it."""
    _open_step(job, STEP_FINAL_CYCLE)
    sync = SyncType.INCREMENTAL if job.vm.source_kind == SourceKind.VMWARE else SyncType.FULL
    try:
        cycle = start_replication(job.vm, sync, actor=f"live failover {job.pk}", for_failover=job)
    except ReplicationError as exc:
        _close_step(job, STEP_FINAL_CYCLE, FailoverStep.Status.FAILED, str(exc))
        raise FailoverError(f"the final cycle cannot start: {exc}") from None
    FailoverStep.objects.filter(failover=job, name=STEP_FINAL_CYCLE, status=FailoverStep.Status.RUNNING).update(
        detail=f"{cycle.id} ({cycle.sync_type})")


def on_cycle_ended(sender=None, *, cycle: ReplicationJob, **kwargs) -> None:
    """Receives signals.cycle_ended (completed, failed or cancelled): a live
    failover waiting on that cycle goes on, in a task of its own."""
    for job in FailoverJob.objects.filter(final_cycle=cycle, status=FailoverStatus.RUNNING):
        _enqueue(job, task_names.CONTINUE_FAILOVER)


def continue_failover(job_id: int) -> None:
    """After the final cycle: boot from the replica it completed, or give up
    (and power the source back on) if it did not complete."""
    job = FailoverJob.objects.select_related("vm", "final_cycle").get(pk=job_id)
    cycle = job.final_cycle
    if job.status != FailoverStatus.RUNNING or cycle is None or not cycle.is_terminal:
        return
    ok = cycle.status == JobStatus.COMPLETED
    seconds = (cycle.completed_at - cycle.created_at).total_seconds() if cycle.completed_at else 0.0
    detail = (f"{cycle.id} ({cycle.sync_type}): {cycle.bytes_transferred / 2**20:.1f} MiB in {seconds:.2f} s"
              if ok else f"{cycle.id} {cycle.status}: {cycle.error_message}")
    if not _close_step(job, STEP_FINAL_CYCLE, FailoverStep.Status.DONE if ok else FailoverStep.Status.FAILED,
                       detail):
        return
    if not ok:
        abandon(job.pk, f"the final cycle {detail}")
        return
    FailoverJob.objects.filter(pk=job.pk).update(replication_job=cycle, recovery_point=cycle.recovery_point)
    job.refresh_from_db()
    try:
        destination = destination_for(job.vm)
        with _step(job, "preflight after the final cycle") as step:
            volumes = preflight(job, destination)
            step.detail = f"{len(volumes)} volume(s) of {cycle.id}"
        _boot(job, destination, volumes)
    except Exception as exc:
        log.exception("failover %s failed after its final cycle", job_id)
        abandon(job.pk, str(exc))


# Rollback ------------------------------------------------------------------------

def _run_rollback(job: FailoverJob, destination) -> None:
    with _step(job, "destroy VM") as step:
        destination.destroy(job.destination_vm)
        step.detail = f"{job.destination_vm} destroyed"
    with _step(job, "revert volumes") as step:
        destination.discard_protection(job.protection)
        step.detail = "the recovery points are as they were before the failover"
    if job.rolls_back.source_lost:
        # Its source was never shut down by us: whether it runs again is the
        # operator's decision at the returned site, not ours.
        FailoverStep.begin(job, STEP_POWER_ON)
        _close_step(job, STEP_POWER_ON, FailoverStep.Status.DONE,
                    "not asked: the failover ran with the source site lost; power the source on in vCenter "
                    "if it should run again")
        _finish_rollback(job, "")
    else:
        try:
            asked = _power_source(job, POWER_ON, STEP_POWER_ON)
        except AgentRevoked as exc:
            _finish_rollback(job, str(exc))
            return
        if not asked:
            _finish_rollback(job, "")


def _finish_rollback(job: FailoverJob, error: str) -> None:
    """The destination VM is gone and the volumes are back: the live
    failover has ended, and the VM may replicate again (the next cycle is
    incremental: the replica holds what the committed changeIds say)."""
    live = job.rolls_back
    live.transition(FailoverStatus.ENDED, ended_at=timezone.now())
    VMContext.of(job.vm).move(VMState.READY_FOR_FAILOVER, actor=job.actor,
                              reason=f"live failover {live.pk} rolled back ({job.pk})",
                              only_from={VMState.FAILED_OVER_LIVE})
    if error:
        job.transition(FailoverStatus.FAILED, only_from={FailoverStatus.RUNNING}, completed_at=timezone.now(),
                       error_message=f"{error}: power the source on in vCenter"[:4000])
    else:
        job.transition(FailoverStatus.SUCCEEDED, completed_at=timezone.now())


# Undoing -------------------------------------------------------------------------

def abandon(job_id: int, reason: str) -> None:
    """Fail the failover with the reason and the console's last lines, and
    undo it: VM destroyed, protections discarded, a source it shut down
    powered back on; the VM's state back to ready_for_failover
    (cleanup_required if that cannot be done). A rollback that fails only
    says why: each of its steps may simply be run again."""
    job = FailoverJob.objects.select_related("vm").get(pk=job_id)
    FailoverStep.end_running(job, FailoverStep.Status.FAILED, "interrupted")
    tail = ""
    cleanup_error = ""
    if job.kind != FailoverKind.ROLLBACK and job.steps.filter(name__in=FAILOVER_BOOT_STEPS).exists():
        try:
            destination = destination_for(job.vm)
            with contextlib.suppress(Exception):
                tail = "\n".join(destination.console_text(job.destination_vm).splitlines()[-CONSOLE_TAIL_LINES:])
            _undo(job, destination)
        except Exception as exc:
            cleanup_error = f"; clean-up failed: {exc}"
    if not job.transition(FailoverStatus.FAILED, error_message=(reason + cleanup_error)[:4000], console_tail=tail,
                          completed_at=timezone.now(), wait_until=None):
        return
    if job.kind == FailoverKind.LIVE and job.steps.filter(name=STEP_SHUT_DOWN).exists():
        try:
            _power_source(job, POWER_ON, STEP_POWER_ON)
        except Exception as exc:
            _close_step(job, STEP_POWER_ON, FailoverStep.Status.FAILED, f"could not ask the agent: {exc}")
    if job.kind == FailoverKind.ROLLBACK:
        return
    if cleanup_error:
        with contextlib.suppress(IllegalMove):
            VMContext.of(job.vm).move(VMState.CLEANUP_REQUIRED, actor="system",
                                      reason=f"{job.kind} failover {job.pk} failed: {reason}"[:2000])
    points.enqueue_retention(job.vm)  # its point is free again
    if job.kind == FailoverKind.TEST:
        signals.test_failover_ended.send(sender=FailoverJob, failover_id=job.pk)


def _undo(job: FailoverJob, destination) -> None:
    with _step(job, "destroy VM"):
        destination.destroy(job.destination_vm)
    with _step(job, "discard protections"):
        destination.discard_protection(job.protection)


def end_test_failover(vm: VirtualMachine, actor: str = "operator") -> FailoverJob:
    """End the VM's test failover: its VM and overlays go; every recovery
    point is as it was (the cycles never stopped)."""
    job = vm.failovers.filter(kind=FailoverKind.TEST, status__in=FAILOVER_OPEN).first()
    if job is None:
        raise FailoverError(f"VM {vm.name} has no test failover to end")
    if job.status != FailoverStatus.SUCCEEDED:
        raise FailoverError(f"the test failover of {vm.name} is {job.status}; wait until it has booted or failed")
    try:
        _undo(job, destination_for(vm))
    except DestinationError as exc:
        with contextlib.suppress(IllegalMove):
            VMContext.of(vm).move(VMState.CLEANUP_REQUIRED, actor=actor, reason=f"ending test failover: {exc}")
        raise FailoverError(f"ending the test failover failed: {exc}") from None
    job.transition(FailoverStatus.ENDED, ended_at=timezone.now())
    points.enqueue_retention(vm)  # its point is free again
    return job


def commit_failover(vm: VirtualMachine, actor: str = "operator") -> FailoverJob:
    """Make the VM's live failover final: its destination VM keeps running
    and its disks become its own (the overlays flattened; on CloudStack the
    volumes simply stay with it), its recovery points and replicas are
    released, protection of the VM ends (its history stays), and its state
    is completed. No rollback is possible after this."""
    with transaction.atomic():
        vm = VirtualMachine.objects.select_for_update().get(pk=vm.pk)
        live = vm.failovers.filter(kind=FailoverKind.LIVE, status=FailoverStatus.SUCCEEDED).first()
        if live is None:
            raise FailoverError(f"VM {vm.name} has no live failover that has booted to commit")
        if FailoverJob.open(vm).filter(kind=FailoverKind.ROLLBACK).exists():
            raise FailoverError(f"a rollback of {vm.name} is running")
    destination = destination_for(vm)
    try:
        with _step(live, "commit") as step:
            step.detail = destination.commit_vm(live.destination_vm, live.protection, heartbeat=live.beat)
    except DestinationError as exc:
        raise FailoverError(f"committing failed: {exc}; {live.destination_vm} still runs over its recovery "
                            "point and can be rolled back") from None
    reason = f"live failover {live.pk} committed by {actor}"
    with transaction.atomic():
        live.transition(FailoverStatus.COMMITTED, committed_at=timezone.now())
        VMContext.of(vm).move(VMState.COMPLETED, actor=actor, reason=reason, only_from={VMState.FAILED_OVER_LIVE})
        VirtualMachine.objects.filter(pk=vm.pk).update(group=None)  # its schedule and drills end
    released = points.release(vm, reason)
    if not destination.replica_boots_in_place:
        for volume in TargetVolume.objects.filter(source_disk__vm=vm):
            released.append(get_provider(volume.provider).delete(volume))
    log.info("%s: %s", reason, "; ".join(released))
    return live


def reap_failovers(now=None) -> list[int]:
    """The one judge of failovers. One waiting on its final cycle is alive
    while the cycle is (the cycle's own reaper judges that), and goes on if
    the cycle ended but the news was lost; one waiting on its agent has until
    wait_until; any other whose worker went silent for REAPER_TIMEOUT_S is
    failed and undone, naming the step it was in."""
    now = now or timezone.now()
    cutoff = now - timedelta(seconds=settings.REAPER_TIMEOUT_S)
    reaped = []
    for job in FailoverJob.objects.filter(status=FailoverStatus.RUNNING).select_related("final_cycle"):
        step = job.steps.order_by("-id").first()
        if step is not None and step.name == STEP_FINAL_CYCLE and step.status == FailoverStep.Status.RUNNING:
            if job.final_cycle is not None and job.final_cycle.is_terminal:
                continue_failover(job.pk)
            continue
        if job.wait_until is not None:
            if job.wait_until > now:
                continue
            abandon(job.pk, f"the agent did not answer ({step.name if step else 'its start'}) by "
                            f"{job.wait_until:%H:%M:%S}: is its worker running?")
        elif job.heartbeat_at is None or job.heartbeat_at < cutoff:
            abandon(job.pk, f"no sign of life for {settings.REAPER_TIMEOUT_S:.0f} s during "
                            f"{step.name if step else 'its start'}: the worker running it is gone")
        else:
            continue
        reaped.append(job.pk)
    return reaped

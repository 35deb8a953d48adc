"""Failover: boot a protected VM from its replica on the destination.

A test failover protects every replica volume of the VM at one point in
time without copying it (the destination's point-in-time protection: qcow2
overlays over the raw replicas for libvirt), boots a VM from the
protections, verifies the boot on its console and leaves it running for the
operator. The replica is never written: the guest's writes land in the
overlays, and the VM's replication cycles are paused meanwhile (its state is
failed_over_test, which refuses a cycle with that reason: a cycle writing
into an overlay's backing file would change what the running guest reads).
Ending the test destroys the VM and the overlays; the replica is
byte-identical to what it was. A failed step cleans up by itself."""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from replication.choices import FAILOVER_OPEN, FailoverKind, FailoverStatus, JobStatus, VMState
from replication.destinations import get_destination
from replication.destinations.base import DestinationError, VMShape
from replication.lifecycle import FailoverJob, FailoverStep, IllegalMove, VMContext
from replication.models import ReplicationJob, VirtualMachine

log = logging.getLogger(__name__)
CONSOLE_TAIL_LINES = 20


class FailoverError(Exception):
    """A failover cannot start or go on; the message is the reason."""


def failover_report(job: FailoverJob) -> dict:
    """A failover as the commands' --json and the JSON API show it."""
    return {"id": job.pk, "vm": job.vm.name, "kind": job.kind, "status": job.status,
            "state": VMContext.of(job.vm).state, "destination_vm": job.destination_vm,
            "replication_job": job.replication_job_id, "boot_verified": job.boot_verified,
            "console_match": job.console_match, "error": job.error_message, "console_tail": job.console_tail,
            "created_at": job.created_at.isoformat(),
            "completed_at": job.completed_at.isoformat() if job.completed_at else None,
            "steps": [{"name": s.name, "status": s.status, "seconds": s.seconds, "detail": s.detail}
                      for s in job.steps.all()]}


def start_test_failover(vm: VirtualMachine, actor: str = "operator") -> FailoverJob:
    """Record the failover and pause the VM's cycles in one transaction; the
    steps run in a task queued once that commits."""
    with transaction.atomic():
        vm = VirtualMachine.objects.select_for_update().get(pk=vm.pk)
        running = vm.failovers.filter(status__in=FAILOVER_OPEN).first()
        if running is not None:
            raise FailoverError(f"VM {vm.name} already has a {running.kind} failover ({running.status}); "
                                "end it first")
        cycle = vm.jobs.filter(status=JobStatus.COMPLETED).order_by("-completed_at").first()
        if cycle is None:
            raise FailoverError(f"VM {vm.name} has no completed replication cycle to fail over to")
        job = FailoverJob.objects.create(vm=vm, kind=FailoverKind.TEST, replication_job=cycle, actor=actor[:100],
                                         destination_vm=_destination_name(vm, "test"))
        try:
            VMContext.of(vm).move(VMState.FAILED_OVER_TEST, actor=actor, reason=f"test failover {job.pk}",
                                  only_from={VMState.READY_FOR_FAILOVER})
        except IllegalMove as exc:
            raise FailoverError(str(exc)) from None
        transaction.on_commit(lambda: _enqueue_run(job))
    return job


def _enqueue_run(job: FailoverJob) -> None:
    from replication import tasks

    try:
        tasks.run_failover.apply_async(args=[job.pk])
    except Exception as exc:
        log.exception("could not queue failover %s", job.pk)
        abandon(job.pk, f"could not queue the failover (is Redis running?): {exc}")


def _destination_name(vm: VirtualMachine, kind: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "-", vm.name)[:60]
    return f"oma-{kind}-{safe}"


@contextlib.contextmanager
def _step(job: FailoverJob, name: str) -> Iterator[FailoverStep]:
    step = FailoverStep.objects.create(failover=job, name=name)
    job.beat()
    try:
        yield step
    except Exception as exc:
        step.end(FailoverStep.Status.FAILED, str(exc))
        raise
    step.end(FailoverStep.Status.DONE, step.detail)


def run_failover(job_id: int) -> None:
    """The test failover's steps; any failure cleans up and says why."""
    job = FailoverJob.objects.select_related("vm", "replication_job").get(pk=job_id)
    if not job.transition(FailoverStatus.RUNNING, from_statuses={FailoverStatus.PENDING}, started_at=timezone.now(),
                          heartbeat_at=timezone.now()):
        log.warning("failover %s not run: it is %s", job_id, job.status)
        return
    try:
        destination = get_destination()
        with _step(job, "preflight") as step:
            volumes = _preflight(job)
            # The destination answers, and has no VM of that name already.
            if (state := destination.state(job.destination_vm)) != "absent":
                raise FailoverError(f"the destination already has a VM named {job.destination_vm} ({state})")
            step.detail = f"{len(volumes)} volume(s) of {job.replication_job_id}"
        with _step(job, "protect volumes") as step:
            job.protection = destination.protect([v for v, _ in volumes], f"{job.destination_vm}-{job.pk}")
            job.save(update_fields=["protection"])
            step.detail = ", ".join(job.protection)
        with _step(job, "define VM"):
            destination.define_vm(job.destination_vm, _shape(job.replication_job, [key for _, key in volumes]),
                                  list(zip(job.protection, [key for _, key in volumes], strict=True)),
                                  network=settings.FAILOVER_TEST_NETWORK or None)
        with _step(job, "start VM"):
            destination.start(job.destination_vm)
        with _step(job, "verify boot") as step:
            match = _verify_boot(job, destination)
            step.detail = match
    except Exception as exc:
        log.exception("failover %s failed", job_id)
        abandon(job_id, str(exc))
        return
    job.transition(FailoverStatus.SUCCEEDED, from_statuses={FailoverStatus.RUNNING}, boot_verified=True,
                   console_match=match[:4000], completed_at=timezone.now())


def _preflight(job: FailoverJob) -> list[tuple[str, str]]:
    """Every replica volume of the cycle, in disk order: (path, disk key)."""
    cycle: ReplicationJob = job.replication_job
    if cycle is None or cycle.status != JobStatus.COMPLETED:
        raise FailoverError("the replication cycle to fail over to is gone or not completed")
    volumes = []
    for disk in cycle.disks.select_related("target_volume").order_by("disk_key"):
        path = disk.target_volume.path
        if not path or not Path(path).exists():
            raise FailoverError(f"{disk.disk_key}: replica volume {path or '(none)'} is missing")
        volumes.append((path, disk.disk_key))
    run_dir = Path(settings.FAILOVER_DIR)
    run_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(run_dir).free
    if free < settings.FAILOVER_MIN_FREE_BYTES:
        raise FailoverError(f"not enough space for the overlays in {run_dir}: {free // 2**20} MiB free, "
                            f"{settings.FAILOVER_MIN_FREE_BYTES // 2**20} MiB needed (FAILOVER_MIN_FREE_BYTES)")
    return volumes


def _shape(cycle: ReplicationJob, disk_keys: list[str]) -> VMShape:
    """The VM as the cycle being booted recorded it (boot order among the
    disks it replicated); what it does not know, the destination's defaults
    (FAILOVER_DEFAULT_CPUS, FAILOVER_DEFAULT_MEMORY_MIB)."""
    shape = cycle.vm_shape or {}
    return VMShape(cpus=shape.get("cpus") or settings.FAILOVER_DEFAULT_CPUS,
                   memory_mib=shape.get("memory_mib") or settings.FAILOVER_DEFAULT_MEMORY_MIB,
                   firmware=shape.get("firmware") or "bios",
                   disks=tuple(key for key in shape.get("disks") or () if key in disk_keys))


def _verify_boot(job: FailoverJob, destination) -> str:
    """The console line that proves the boot: the VM's boot check regex, or
    (none set) any line at all, within its timeout."""
    context = VMContext.of(job.vm)
    pattern = re.compile(context.boot_check_regex) if context.boot_check_regex else None
    deadline = time.monotonic() + context.boot_check_timeout_s
    last_beat = time.monotonic()
    while True:
        text = destination.console_text(job.destination_vm)
        for line in text.splitlines():
            if (pattern.search(line) if pattern else line.strip()):
                return line.strip()
        state = destination.state(job.destination_vm)
        if state != "running":
            raise FailoverError(f"the VM is {state} and its console never showed "
                                f"{'/' + context.boot_check_regex + '/' if pattern else 'anything'}")
        if time.monotonic() > deadline:
            raise FailoverError(f"boot not verified within {context.boot_check_timeout_s} s: the console never "
                                f"showed {'/' + context.boot_check_regex + '/' if pattern else 'anything'}")
        if time.monotonic() - last_beat > 5:
            job.beat()
            last_beat = time.monotonic()
        time.sleep(0.25)


def abandon(job_id: int, reason: str) -> None:
    """Fail the failover with the reason and the console's last lines, and
    undo it: VM destroyed, protections discarded, the VM's state back to
    ready_for_failover (cleanup_required if that cannot be done)."""
    job = FailoverJob.objects.select_related("vm").get(pk=job_id)
    job.steps.filter(status=FailoverStep.Status.RUNNING).update(status=FailoverStep.Status.FAILED,
                                                                ended_at=timezone.now(), detail="interrupted")
    tail = ""
    cleanup_error = ""
    # Nothing to undo when it failed before it created anything (preflight).
    if job.steps.exclude(name="preflight").exists():
        try:
            destination = get_destination()
            with contextlib.suppress(Exception):
                tail = "\n".join(destination.console_text(job.destination_vm).splitlines()[-CONSOLE_TAIL_LINES:])
            _undo(job, destination)
        except Exception as exc:
            cleanup_error = f"; clean-up failed: {exc}"
    job.transition(FailoverStatus.FAILED, from_statuses=FAILOVER_OPEN, error_message=(reason + cleanup_error)[:4000],
                   console_tail=tail, completed_at=timezone.now())
    to = VMState.CLEANUP_REQUIRED if cleanup_error else VMState.READY_FOR_FAILOVER
    with contextlib.suppress(IllegalMove):
        VMContext.of(job.vm).move(to, actor="system", reason=f"test failover {job.pk} failed: {reason}"[:2000],
                                  only_from={VMState.FAILED_OVER_TEST})


def _undo(job: FailoverJob, destination) -> None:
    with _step(job, "destroy VM"):
        destination.destroy(job.destination_vm)
    with _step(job, "discard protections"):
        destination.discard_protection(job.protection)


def end_test_failover(vm: VirtualMachine, actor: str = "operator") -> FailoverJob:
    """End the VM's test failover: its VM and overlays go, the replica is as
    it was, and cycles may run again."""
    job = vm.failovers.filter(kind=FailoverKind.TEST, status__in=FAILOVER_OPEN).first()
    if job is None:
        raise FailoverError(f"VM {vm.name} has no test failover to end")
    if job.status != FailoverStatus.SUCCEEDED:
        raise FailoverError(f"the test failover of {vm.name} is {job.status}; wait until it has booted or failed")
    try:
        _undo(job, get_destination())
    except DestinationError as exc:
        VMContext.of(vm).move(VMState.CLEANUP_REQUIRED, actor=actor, reason=f"ending test failover: {exc}")
        raise FailoverError(f"ending the test failover failed: {exc}") from None
    job.transition(FailoverStatus.ENDED, from_statuses={FailoverStatus.SUCCEEDED}, ended_at=timezone.now())
    VMContext.of(vm).move(VMState.READY_FOR_FAILOVER, actor=actor, reason=f"test failover {job.pk} ended")
    return job


def reap_failovers(now=None) -> list[int]:
    """A failover whose worker went silent (REAPER_TIMEOUT_S) is failed and
    undone, naming the step it was in."""
    now = now or timezone.now()
    cutoff = now - timedelta(seconds=settings.REAPER_TIMEOUT_S)
    reaped = []
    for job in FailoverJob.objects.filter(status=FailoverStatus.RUNNING, heartbeat_at__lt=cutoff):
        step = job.steps.order_by("-id").first()
        abandon(job.pk, f"no sign of life for {settings.REAPER_TIMEOUT_S:.0f} s during "
                        f"{step.name if step else 'its start'}: the worker running it is gone")
        reaped.append(job.pk)
    return reaped

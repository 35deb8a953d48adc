"""Scheduled protection: groups come due on their schedule (django-celery-
beat fires replication.group_due), their VMs queue for a slot, and
admission starts cycles within each group's limit, each agent's (its
record's max_vms/max_disks, else AGENT_MAX_VMS/AGENT_MAX_DISKS) and each
ESXi host's (the agent's max_per_host, else AGENT_MAX_PER_HOST: snapshots
and NBD sessions are the host's resources), oldest recovery point first,
and only on agents that take work (active; a paused, draining, pending or
revoked agent's VMs wait, the reason on their admission). A VM whose
cycle still runs is skipped, not doubled; a failed scheduled cycle is
retried with backoff, and after the last retry the VM is flagged.

This module is the only writer of the groups' PeriodicTask rows and of
Admission rows."""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta

import redis
from django.conf import settings
from django.db import transaction
from django.db.models import Count, Exists, F, OuterRef, Subquery
from django.utils import timezone
from django_celery_beat.models import CrontabSchedule, IntervalSchedule, PeriodicTask

from replication import names
from replication.choices import (
    DISK_TERMINAL,
    JOB_ACTIVE,
    AdmissionReason,
    AdmissionStatus,
    JobStatus,
    SourceKind,
    SyncType,
    VMState,
)
from replication.models import Admission, Agent, ProtectionGroup, ReplicationJob, SourceDisk, VirtualMachine, VMDisk
from vma_agent import task_names

log = logging.getLogger(__name__)
ADMISSION_LOCK = "oma:admission-lock"


class ScheduleError(Exception):
    """A group or schedule change is refused; the message is the reason,
    `field` the group's field it is about (if one)."""

    def __init__(self, message: str, field: str = ""):
        self.field = field
        super().__init__(message)


# --- groups and their schedules -------------------------------------------------

def create_group(name: str, **fields) -> ProtectionGroup:
    name = names.checked(name, ProtectionGroup, error=lambda why: ScheduleError(why, "name"), what="group name")
    if ProtectionGroup.objects.filter(name=name).exists():
        raise ScheduleError(f"a group named {name} exists already", "name")
    group = ProtectionGroup(name=name, **fields)
    check_group(group)
    group.save()
    return group


def update_group(group: ProtectionGroup, **fields) -> ProtectionGroup:
    for name, value in fields.items():
        setattr(group, name, value)
    check_group(group)
    with transaction.atomic():
        group.save()
        sync_schedule(group)
    return group


# Upper bounds: a year of seconds, or counts far past any real group; beyond
# them a value is a typing mistake (and MariaDB's columns overflow).
_GROUP_BOUNDS = {"interval_s": ("the interval", 366 * 24 * 3600), "drill_interval_s": ("the drill interval",
                 366 * 24 * 3600), "rpo_target_s": ("the RPO target", 366 * 24 * 3600),
                 "retry_backoff_s": ("the retry back-off", 366 * 24 * 3600),
                 "max_concurrent": ("the concurrency limit", 10_000), "max_retries": ("the retry count", 1_000),
                 "points_keep": ("the recovery points kept", 10_000),
                 "points_hourly_h": ("the hours of hourly recovery points", 366 * 24),
                 "points_daily_d": ("the days of daily recovery points", 3_660)}


def check_group(group: ProtectionGroup) -> None:
    for field, (label, limit) in _GROUP_BOUNDS.items():
        value = getattr(group, field)
        if value is not None and not isinstance(value, int):
            raise ScheduleError(f"{label} must be a whole number, not {value!r}", field)
        if value is not None and not 0 <= value <= limit:
            raise ScheduleError(f"{label} must be between 0 and {limit}, not {value}", field)
    if group.max_concurrent < 1:
        raise ScheduleError("the concurrency limit must be at least 1", "max_concurrent")
    if group.points_keep is not None and group.points_keep < 1:
        raise ScheduleError("a group keeps at least 1 recovery point per VM (the newest)", "points_keep")
    if group.interval_s is not None and group.interval_s < 1:
        raise ScheduleError("the interval must be at least 1 second", "interval_s")
    if group.drill_interval_s is not None and group.drill_interval_s < 1:
        raise ScheduleError("the drill interval must be at least 1 second", "drill_interval_s")
    if group.cron:
        fields = group.cron.split()
        if len(fields) != 5:
            raise ScheduleError(f"cron expression {group.cron!r} needs 5 fields: minute hour day-of-month month "
                                "day-of-week", "cron")
        try:
            from zoneinfo import ZoneInfo

            ZoneInfo(group.timezone)
            from celery.schedules import crontab

            crontab(*fields)  # the same parser beat uses
        except Exception as exc:  # noqa: BLE001 - every parse error is the operator's to see
            raise ScheduleError(f"cron expression {group.cron!r} in {group.timezone}: {exc}", "cron") from None


def set_schedule(group: ProtectionGroup, *, interval_s: int | None = None, cron: str = "",
                 tz: str = "UTC") -> ProtectionGroup:
    if bool(interval_s) == bool(cron):
        raise ScheduleError("give either an interval or a cron expression", "interval_s")
    return update_group(group, interval_s=interval_s or None, cron=cron.strip(), timezone=tz)


def sync_schedule(group: ProtectionGroup) -> None:
    """Make the group's PeriodicTasks (its cycles', its drills') say what the
    group says (beat reads changes from the database without a restart)."""
    crontab = None
    if group.cron and not group.interval_s:
        minute, hour, day_of_month, month_of_year, day_of_week = group.cron.split()
        crontab, _ = CrontabSchedule.objects.get_or_create(
            minute=minute, hour=hour, day_of_month=day_of_month, month_of_year=month_of_year,
            day_of_week=day_of_week, timezone=group.timezone)
    group.periodic_task = _sync_task(group, group.periodic_task, task_names.GROUP_DUE, group.interval_s, crontab,
                                     f"protection group {group.pk}: {group.name}")
    group.drill_task = _sync_task(group, group.drill_task, task_names.DRILL_DUE, group.drill_interval_s, None,
                                  f"drill of protection group {group.pk}: {group.name}")
    ProtectionGroup.objects.filter(pk=group.pk).update(periodic_task=group.periodic_task, drill_task=group.drill_task)


def _sync_task(group: ProtectionGroup, task: PeriodicTask | None, task_name: str, interval_s: int | None,
               crontab: CrontabSchedule | None, name: str) -> PeriodicTask | None:
    if not interval_s and crontab is None:
        if task is not None:
            task.delete()
        return None
    interval = None
    if interval_s:
        interval, _ = IntervalSchedule.objects.get_or_create(every=interval_s, period=IntervalSchedule.SECONDS)
    values = {"task": task_name, "args": json.dumps([group.pk]), "queue": task_names.OMA_QUEUE,
              "enabled": not group.paused, "description": name, "interval": interval, "crontab": crontab}
    if task is None:
        return PeriodicTask.objects.create(name=name, **values)
    for field, value in values.items():
        setattr(task, field, value)
    task.save()
    return task


def delete_group(group: ProtectionGroup) -> None:
    with transaction.atomic():
        for task in (group.periodic_task, group.drill_task):
            if task is not None:
                task.delete()
        group.delete()


def add_vms(group: ProtectionGroup, vms: list[VirtualMachine]) -> None:
    """A VM belongs to at most one group: adding it here takes it from its old one."""
    retired = [vm.name for vm in vms if vm.lifecycle_state == VMState.DECOMMISSIONED]
    if retired:
        raise ScheduleError(f"VM(s) {', '.join(retired)} are decommissioned: they cannot join a group", "vms")
    with transaction.atomic():
        for vm in vms:
            if vm.group_id not in (None, group.pk):
                Admission.drop_waiting(vm, f"moved to group {group.name}")
            VirtualMachine.objects.filter(pk=vm.pk).update(group=group)


def remove_vms(group: ProtectionGroup, vms: list[VirtualMachine]) -> None:
    with transaction.atomic():
        for vm in vms:
            if vm.group_id != group.pk:
                raise ScheduleError(f"VM {vm.name} is not in group {group.name}")
            Admission.drop_waiting(vm, f"removed from group {group.name}")
            VirtualMachine.objects.filter(pk=vm.pk).update(group=None, protection_flag="")


def set_paused(group: ProtectionGroup, paused: bool) -> ProtectionGroup:
    return update_group(group, paused=paused)


# --- coming due and admission ---------------------------------------------------

def group_due(group_id: int) -> None:
    """The group's schedule fired: each of its VMs queues for a slot, unless
    its previous cycle still runs (skipped, and recorded) or it already waits."""
    group = ProtectionGroup.objects.filter(pk=group_id).first()
    if group is None or group.paused:
        return
    now = timezone.now()
    with transaction.atomic():
        waiting = set(Admission.objects.filter(group=group, status=AdmissionStatus.WAITING)
                      .values_list("vm_id", flat=True))
        active = dict(ReplicationJob.objects.filter(vm__group=group, status__in=JOB_ACTIVE)
                      .values_list("vm_id", "id"))
        retry_pending = _retry_pending(group, now)
        entries = []
        for vm_id in group.vms.values_list("pk", flat=True):
            if vm_id in active:
                entries.append(Admission(group=group, vm_id=vm_id, status=AdmissionStatus.SKIPPED, due_at=now,
                                         decided_at=now, note=f"its cycle {active[vm_id]} is still running"))
            elif vm_id in retry_pending:
                entries.append(Admission(group=group, vm_id=vm_id, status=AdmissionStatus.SKIPPED, due_at=now,
                                         decided_at=now, note=f"its failed cycle {retry_pending[vm_id]} is being "
                                                              "queued again as a retry"))
            elif vm_id not in waiting:
                entries.append(Admission(group=group, vm_id=vm_id, due_at=now, not_before=now))
        Admission.objects.bulk_create(entries)
    admit()


RETRY_PENDING_S = 60  # how long a tick waits for job_ended to queue a failed cycle's retry


def _retry_pending(group: ProtectionGroup, now) -> dict:
    """VMs whose scheduled cycle failed moments ago and whose retry job_ended
    (the task that runs right after a job ends) has not queued yet: a tick in
    that window would start them again as a second first attempt. Bounded in
    time, so a lost job_ended never stops a VM's schedule. {vm_id: job id}"""
    later = Admission.objects.filter(vm_id=OuterRef("vm_id"), pk__gt=OuterRef("pk")).exclude(
        status=AdmissionStatus.SKIPPED)
    return dict(Admission.objects.filter(
        group=group, status=AdmissionStatus.STARTED, job__status=JobStatus.FAILED,
        attempt__lte=group.max_retries, job__completed_at__gte=now - timedelta(seconds=RETRY_PENDING_S))
        .exclude(Exists(later)).values_list("vm_id", "job_id"))


def admit() -> list[ReplicationJob]:
    """Start waiting VMs while their group and agent have free slots, oldest
    recovery point first. One admission pass at a time (a Redis lock), so
    two passes never fill the same slot."""
    client = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    with client.lock(ADMISSION_LOCK, timeout=120, blocking_timeout=60):
        return _admit_pass()


def waiting_queue():
    """The VMs waiting for a slot, in the order they will get one."""
    return (Admission.objects.filter(status=AdmissionStatus.WAITING, group__paused=False)
            .select_related("vm", "group")
            .annotate(recovery_point=Subquery(_last_recovery_point(OuterRef("vm_id"))),
                      disk_count=Subquery(_disk_count(OuterRef("vm_id"))))
            .order_by(F("recovery_point").asc(nulls_first=True), "due_at", "id"))


def _admit_pass() -> list[ReplicationJob]:
    from replication.services.jobs import ReplicationError, start_replication

    now = timezone.now()
    running = Counter(ReplicationJob.objects.filter(status__in=JOB_ACTIVE, vm__group__isnull=False)
                      .values_list("vm__group_id", flat=True))
    in_flight = list(ReplicationJob.objects.filter(status__in=JOB_ACTIVE).values_list("vm__agent", "vm__esxi_host"))
    agent_vms = Counter(agent for agent, _ in in_flight)
    host_vms = Counter((agent, host) for agent, host in in_flight if host)
    agent_disks = Counter(VMDisk.objects.filter(job__status__in=JOB_ACTIVE).exclude(status__in=DISK_TERMINAL)
                          .values_list("job__vm__agent", flat=True))
    queue = list(waiting_queue())
    limits = _agent_limits({entry.vm.agent for entry in queue})
    started = []
    for entry in queue:
        vm, group = entry.vm, entry.group
        if entry.not_before > now or running[group.pk] >= group.max_concurrent:
            continue
        disks = entry.disk_count or 0
        limit = limits[vm.agent]
        host = (vm.agent, vm.esxi_host)
        if limit.refusal:
            entry.still_waits(limit.refusal)
            continue
        if agent_vms[vm.agent] >= limit.vms:
            entry.still_waits(f"agent {vm.agent} runs {agent_vms[vm.agent]} VMs, its limit")
            continue
        if agent_disks[vm.agent] + disks > limit.disks:
            entry.still_waits(f"agent {vm.agent} copies {agent_disks[vm.agent]} disks of its {limit.disks}; "
                              f"this VM has {disks}")
            continue
        if vm.esxi_host and host_vms[host] >= limit.per_host:
            entry.still_waits(f"ESXi host {vm.esxi_host} has {host_vms[host]} VMs in flight, its limit")
            continue
        try:
            job = start_replication(vm, _sync_type(vm), actor=f"schedule of group {group.name}")
        except ReplicationError as exc:
            _decide(entry, AdmissionStatus.SKIPPED, note=str(exc))
            continue
        _decide(entry, AdmissionStatus.STARTED, job=job)
        log.info("group %s: started %s of VM %s (%s, attempt %d)", group.name, job.id, vm.name, entry.reason,
                 entry.attempt)
        running[group.pk] += 1
        agent_vms[vm.agent] += 1
        agent_disks[vm.agent] += disks
        if vm.esxi_host:
            host_vms[host] += 1
        started.append(job)
    return started


@dataclass
class AgentLimits:
    vms: int
    disks: int
    per_host: int
    refusal: str = ""  # why it takes no new cycle; "": it does


def _agent_limits(names: set[str]) -> dict[str, AgentLimits]:
    """Each named agent's limits (its record's, else the settings') and
    whether it takes new cycles; one query for all of them."""
    from replication.services import agents

    records = {agent.name: agent for agent in Agent.objects.filter(name__in=names)}
    if agents.LOCAL in names and agents.LOCAL not in records:
        records[agents.LOCAL] = agents.get(agents.LOCAL)
    limits = {}
    for name in names:
        agent = records.get(name)
        if agent is None:  # none recorded (yet): the settings' limits, as before agents were records
            limits[name] = AgentLimits(settings.AGENT_MAX_VMS, settings.AGENT_MAX_DISKS, settings.AGENT_MAX_PER_HOST)
            continue
        limits[name] = AgentLimits(
            vms=settings.AGENT_MAX_VMS if agent.max_vms is None else agent.max_vms,
            disks=settings.AGENT_MAX_DISKS if agent.max_disks is None else agent.max_disks,
            per_host=settings.AGENT_MAX_PER_HOST if agent.max_per_host is None else agent.max_per_host,
            refusal=agents.work_refusal(agent) or "")
    return limits


def _sync_type(vm: VirtualMachine) -> str:
    """Incremental where the source tracks changes (VMware, qcow2) and a
    cycle has completed; a raw image is always copied whole."""
    if vm.source_kind == SourceKind.IMAGE:
        return SyncType.FULL
    has_base = vm.disks.exclude(change_id="").exists()
    return SyncType.INCREMENTAL if has_base else SyncType.FULL


def _decide(entry: Admission, status: str, *, job: ReplicationJob | None = None, note: str = "") -> None:
    entry.decide(status, job=job, note=note)


def _last_recovery_point(vm_ref):
    return (ReplicationJob.objects.filter(vm_id=vm_ref, status=JobStatus.COMPLETED, recovery_point_at__isnull=False)
            .order_by("-recovery_point_at").values("recovery_point_at")[:1])


def _disk_count(vm_ref):
    return (SourceDisk.objects.filter(vm_id=vm_ref).order_by().values("vm_id")
            .annotate(n=Count("id")).values("n")[:1])


def job_ended(job_id: str) -> None:
    """A cycle ended: a scheduled one that failed is queued again after its
    backoff, until the group's retries run out and the VM is flagged; one
    that completed clears the flag. Then the freed slot goes to the queue."""
    job = ReplicationJob.objects.select_related("vm").filter(pk=job_id).first()
    if job is None:
        return
    entry = getattr(job, "admission", None)
    if job.status == JobStatus.COMPLETED:
        VirtualMachine.objects.filter(pk=job.vm_id).exclude(protection_flag="").update(protection_flag="")
    elif job.status == JobStatus.FAILED and entry is not None and job.vm.group_id == entry.group_id:
        group = entry.group
        if entry.attempt <= group.max_retries:
            delay = group.retry_backoff_s * 2 ** (entry.attempt - 1)
            now = timezone.now()
            Admission.objects.create(group=group, vm=job.vm, reason=AdmissionReason.RETRY, attempt=entry.attempt + 1,
                                     due_at=now, not_before=now + timedelta(seconds=delay),
                                     note=f"retry {entry.attempt} of {group.max_retries} after {job.id} failed")
        else:
            VirtualMachine.objects.filter(pk=job.vm_id).update(
                protection_flag=f"{entry.attempt} scheduled cycles failed; last {job.id}: {job.error_message}"[:500])
    admit()

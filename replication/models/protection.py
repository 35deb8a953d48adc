"""Protection policies (MigrateKit OSSEA's vm_machine_groups, replication_schedules,
schedule_executions): a group of VMs kept fresh on a schedule, within a
concurrency limit, against a recovery point objective, and rehearsed by
drills. The schedules live in django-celery-beat's tables (PeriodicTasks
written only by services.scheduler); a VM's place in the admission queue
and every decision about it are Admission rows; each rehearsal a DrillRun.
Their statuses move along choices.ADMISSION_TRANSITIONS and
DRILL_TRANSITIONS (models.base)."""

from __future__ import annotations

from django.db import models
from django.utils import timezone

from replication.choices import (
    ADMISSION_TRANSITIONS,
    DRILL_TRANSITIONS,
    AdmissionReason,
    AdmissionStatus,
    DrillStatus,
)
from replication.models.base import StateMachine
from replication.names import validate_no_control_characters


class ProtectionGroup(models.Model):
    name = models.CharField(max_length=100, unique=True, validators=[validate_no_control_characters])
    description = models.CharField(max_length=500, blank=True)
    interval_s = models.PositiveIntegerField(null=True, blank=True,
                                             help_text="Start a cycle of each VM every N seconds")
    cron = models.CharField(max_length=100, blank=True,
                            help_text='Or a cron expression: "minute hour day-of-month month day-of-week"')
    timezone = models.CharField(max_length=64, default="UTC", help_text="The cron expression's time zone")
    rpo_target_s = models.PositiveIntegerField(default=3600,
                                               help_text="A VM whose recovery point is older is over its target")
    max_concurrent = models.PositiveIntegerField(default=2, help_text="Cycles of this group's VMs at once")
    max_retries = models.PositiveIntegerField(default=2, help_text="Retries of a failed scheduled cycle")
    retry_backoff_s = models.PositiveIntegerField(default=60,
                                                  help_text="First retry after this; each next one waits twice as long")
    paused = models.BooleanField(default=False, help_text="A paused group starts nothing")
    points_keep = models.PositiveIntegerField(
        null=True, blank=True, help_text="Recovery points kept per VM: the newest N (empty: RECOVERY_POINTS_KEEP)")
    points_hourly_h = models.PositiveIntegerField(
        default=0, help_text="Also keep the newest point of each hour for this many hours")
    points_daily_d = models.PositiveIntegerField(
        default=0, help_text="Also keep the newest point of each day for this many days")
    drill_interval_s = models.PositiveIntegerField(
        null=True, blank=True, help_text="Rehearse a recovery of each VM (a test failover) every N seconds")
    periodic_task = models.OneToOneField("django_celery_beat.PeriodicTask", null=True, blank=True,
                                         on_delete=models.SET_NULL, related_name="protection_group", editable=False)
    drill_task = models.OneToOneField("django_celery_beat.PeriodicTask", null=True, blank=True,
                                      on_delete=models.SET_NULL, related_name="drill_group", editable=False)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        db_table = "vm_machine_groups"
        ordering = ["name"]

    def __str__(self):
        return self.name

    @property
    def schedule_label(self) -> str:
        if self.interval_s:
            return f"every {self.interval_s} s"
        if self.cron:
            return f"cron {self.cron} ({self.timezone})"
        return "no schedule"


class Admission(StateMachine):
    """One time a VM came due: it waits for a slot, starts a cycle, or is
    skipped (its previous cycle still runs) - with when and why."""

    transitions = ADMISSION_TRANSITIONS

    group = models.ForeignKey(ProtectionGroup, on_delete=models.CASCADE, related_name="admissions")
    vm = models.ForeignKey("replication.VirtualMachine", on_delete=models.CASCADE, related_name="admissions")
    reason = models.CharField(max_length=20, choices=AdmissionReason.choices, default=AdmissionReason.SCHEDULED)
    attempt = models.PositiveIntegerField(default=1, help_text="1, then 2, 3... for retries of a failed cycle")
    status = models.CharField(max_length=20, choices=AdmissionStatus.choices, default=AdmissionStatus.WAITING,
                              db_index=True)
    due_at = models.DateTimeField(default=timezone.now)
    not_before = models.DateTimeField(default=timezone.now, help_text="A retry waits out its backoff")
    decided_at = models.DateTimeField(null=True, blank=True)
    job = models.OneToOneField("replication.ReplicationJob", null=True, blank=True, on_delete=models.SET_NULL,
                               related_name="admission")
    note = models.CharField(max_length=500, blank=True)

    class Meta:
        verbose_name = "scheduling decision"
        db_table = "schedule_executions"
        ordering = ["-due_at", "-id"]

    def __str__(self):
        return f"{self.vm} {self.reason} #{self.attempt}: {self.status}"

    def decide(self, status: str, *, job=None, note: str = "") -> bool:
        return self.transition(status, job=job, note=note[:500], decided_at=timezone.now())

    def still_waits(self, why: str) -> bool:
        """It keeps waiting, for this reason (written only when the reason changes)."""
        why = why[:500]
        if self.note == why:
            return False
        self.note = why
        return bool(type(self).objects.filter(pk=self.pk, status=AdmissionStatus.WAITING).update(note=why))

    @classmethod
    def drop_waiting(cls, vm, note: str) -> int:
        """The VM left its group: its waits end unanswered."""
        return cls.move_rows(cls.objects.filter(vm=vm), AdmissionStatus.DROPPED, decided_at=timezone.now(),
                             note=note[:500])


class DrillRun(StateMachine):
    """One VM's rehearsal in a group's drill: a test failover, its boot
    verified on the guest's console, the test ended; pass or fail, and the
    recovery time it measured (failover asked -> boot verified)."""

    transitions = DRILL_TRANSITIONS

    group = models.ForeignKey(ProtectionGroup, null=True, on_delete=models.SET_NULL, related_name="drills")
    vm = models.ForeignKey("replication.VirtualMachine", on_delete=models.CASCADE, related_name="drills")
    failover = models.OneToOneField("replication.FailoverJob", null=True, blank=True, on_delete=models.SET_NULL,
                                    related_name="drill")
    status = models.CharField(max_length=20, choices=DrillStatus.choices, default=DrillStatus.QUEUED, db_index=True)
    queued_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    ended_at = models.DateTimeField(null=True, blank=True)
    rto_s = models.FloatField(null=True, blank=True, help_text="Seconds from the failover's start to its boot "
                                                               "verified")
    note = models.CharField(max_length=1000, blank=True)
    requested_by = models.CharField(max_length=100, default="schedule",
                                    help_text="Who asked for the drill (its group's schedule, or a user)")

    class Meta:
        verbose_name = "failover drill"
        db_table = "drill_runs"
        ordering = ["-queued_at", "-id"]

    def __str__(self):
        return f"drill of {self.vm}: {self.status}"

    def start(self, failover, at) -> bool:
        return self.transition(DrillStatus.RUNNING, failover=failover, started_at=at)

    def end(self, status: str, note: str, at, rto_s: float | None = None) -> bool:
        return self.transition(status, note=note[:1000], ended_at=at,
                               rto_s=round(rto_s, 3) if rto_s is not None else None)

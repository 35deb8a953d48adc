"""Failovers: a VM booted from its replica on the destination (test or
live) or a live one rolled back, step by step, and the network a NIC joins
on a live failover. A failover's status moves along
choices.FAILOVER_TRANSITIONS, a step's along FAILOVER_STEP_TRANSITIONS
(models.base); only these models write either."""

from __future__ import annotations

from django.db import models
from django.utils import timezone

from replication.choices import (
    FAILOVER_OPEN,
    FAILOVER_RUNNING,
    FAILOVER_STEP_TRANSITIONS,
    FAILOVER_TRANSITIONS,
    FailoverKind,
    FailoverStatus,
    FailoverStepStatus,
)
from replication.models.base import StateMachine
from replication.names import validate_no_control_characters


class FailoverJob(StateMachine):
    """One failover of a VM onto the destination, step by step."""

    transitions = FAILOVER_TRANSITIONS

    vm = models.ForeignKey("replication.VirtualMachine", on_delete=models.PROTECT, related_name="failovers")
    kind = models.CharField(max_length=10, choices=FailoverKind.choices)
    status = models.CharField(max_length=20, choices=FailoverStatus.choices, default=FailoverStatus.PENDING,
                              db_index=True)
    replication_job = models.ForeignKey("replication.ReplicationJob", null=True, on_delete=models.SET_NULL,
                                        related_name="+", help_text="The completed cycle whose replica boots")
    recovery_point = models.ForeignKey("replication.RecoveryPoint", null=True, blank=True, on_delete=models.PROTECT,
                                       related_name="failovers", help_text="The point its VM boots from")
    source_lost = models.BooleanField(default=False, help_text="Live, with the source site lost: no shutdown, no "
                                                               "final cycle; the running cycle fenced")
    destination_vm = models.CharField(max_length=200, blank=True, help_text="The VM's name on the destination")
    protection = models.JSONField(default=list, blank=True,
                                  help_text="The point-in-time protections of the volumes (overlay paths)")
    final_cycle = models.ForeignKey("replication.ReplicationJob", null=True, blank=True, on_delete=models.SET_NULL,
                                    related_name="+", help_text="Live: the incremental run after the source shut down")
    rolls_back = models.ForeignKey("self", null=True, blank=True, on_delete=models.SET_NULL, related_name="rollbacks",
                                   help_text="Rollback: the live failover it undoes")
    wait_until = models.DateTimeField(null=True, blank=True,
                                      help_text="Waiting on the agent (source power) until then; the reaper "
                                                "judges a silent failover only after it")
    downtime_s = models.FloatField(null=True, blank=True,
                                   help_text="Live: from the source's shutdown to the boot verified, in seconds")
    forecast_downtime_s = models.FloatField(null=True, blank=True,
                                            help_text="Live: the downtime forecast shown before it started")
    boot_verified = models.BooleanField(default=False)
    console_match = models.TextField(blank=True, help_text="What verified the boot: the console line, the "
                                                            "screen's text, the lease or the agent's answer")
    boot_probe = models.CharField(max_length=20, blank=True,
                                  help_text="The probe that verified the boot: console, screen, network or agent")
    hardware = models.JSONField(default=dict, blank=True,
                                help_text="What its VM booted with (firmware, buses, NIC model, offering...) "
                                          "and where each came from")
    console_tail = models.TextField(blank=True)
    error_message = models.TextField(blank=True)
    actor = models.CharField(max_length=100)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    completed_at = models.DateTimeField(null=True, blank=True)
    ended_at = models.DateTimeField(null=True, blank=True)
    committed_at = models.DateTimeField(null=True, blank=True,
                                        help_text="Live: when its VM's disks became its own (no rollback after)")

    class Meta:
        verbose_name = "failover"
        db_table = "failover_jobs"
        ordering = ["-created_at"]

    def __str__(self):
        return f"{self.kind} failover of {self.vm} ({self.status})"

    @classmethod
    def open(cls, vm) -> models.QuerySet:
        """The VM's failovers not over yet: a test or live one until it is
        ended (or failed), a rollback while it runs."""
        return cls.objects.filter(vm=vm).filter(
            models.Q(kind__in=[FailoverKind.TEST, FailoverKind.LIVE], status__in=FAILOVER_OPEN)
            | models.Q(kind=FailoverKind.ROLLBACK, status__in=FAILOVER_RUNNING))

    def beat(self) -> None:
        FailoverJob.objects.filter(pk=self.pk).update(heartbeat_at=timezone.now())


class FailoverStep(StateMachine):
    """One step of a failover: timed, with its outcome. A step is begun
    running and ended once (done or failed); ended, it stays as it ended."""

    Status = FailoverStepStatus
    transitions = FAILOVER_STEP_TRANSITIONS

    failover = models.ForeignKey(FailoverJob, on_delete=models.CASCADE, related_name="steps")
    name = models.CharField(max_length=60)
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.RUNNING)
    started_at = models.DateTimeField(default=timezone.now)
    ended_at = models.DateTimeField(null=True, blank=True)
    detail = models.TextField(blank=True)

    class Meta:
        db_table = "failover_steps"
        ordering = ["started_at", "id"]

    def __str__(self):
        return f"{self.failover_id}:{self.name} {self.status}"

    @property
    def seconds(self) -> float | None:
        return None if self.ended_at is None else round((self.ended_at - self.started_at).total_seconds(), 3)

    @classmethod
    def begin(cls, failover: FailoverJob, name: str) -> FailoverStep:
        return cls.objects.create(failover=failover, name=name)

    def end(self, status: str, detail: str = "") -> bool:
        return self.transition(status, ended_at=timezone.now(), detail=detail[:4000])

    @classmethod
    def end_running(cls, failover: FailoverJob, status: str, detail: str, *, name: str | None = None) -> int:
        """End the failover's running steps (only the one of that name, when
        given: a step that waits on an answer); returns how many ended, 0 for
        a second delivery of the same answer."""
        rows = cls.objects.filter(failover=failover)
        if name is not None:
            rows = rows.filter(name=name)
        return cls.move_rows(rows, status, ended_at=timezone.now(), detail=detail[:4000])


class NetworkMapping(models.Model):
    """Which destination network a NIC joins on a live failover, by the name
    of its network on the source. A test failover ignores it: its VM joins
    the isolated FAILOVER_TEST_NETWORK (or none), never production."""

    source_network = models.CharField(max_length=200, unique=True, validators=[validate_no_control_characters])
    destination_network = models.CharField(max_length=200, validators=[validate_no_control_characters])
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        db_table = "network_mappings"
        ordering = ["source_network"]

    def __str__(self):
        return f"{self.source_network} -> {self.destination_network}"

    @classmethod
    def as_dict(cls) -> dict[str, str]:
        return dict(cls.objects.values_list("source_network", "destination_network"))

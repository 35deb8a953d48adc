"""A VM's lifecycle and its failovers: the state that says what an operator
may do next (replicate, fail over, end a test, roll back), every move with
its time, actor and reason, and failover jobs with their steps. Models own
their transitions: a move is a conditional UPDATE from the states allowed in
choices.VM_TRANSITIONS, refused with the reason otherwise."""

from __future__ import annotations

from django.db import models, transaction
from django.utils import timezone

from replication.choices import (
    FAILOVER_OPEN,
    FAILOVER_RUNNING,
    VM_STATE_REFUSALS,
    VM_TRANSITIONS,
    FailoverKind,
    FailoverStatus,
    VMState,
    sources_of,
)
from replication.names import validate_no_control_characters


class IllegalMove(Exception):
    """A lifecycle move the VM's state does not allow; the message says why."""


class VMContext(models.Model):
    """The seeds' vm_replication_contexts: one per VM, its lifecycle state."""

    vm = models.OneToOneField("replication.VirtualMachine", on_delete=models.CASCADE, related_name="context")
    state = models.CharField(max_length=30, choices=VMState.choices, default=VMState.DISCOVERED, db_index=True)
    updated_at = models.DateTimeField(auto_now=True)
    boot_check_regex = models.CharField(max_length=500, blank=True,
                                        help_text="What the console must show for a boot to count; empty: "
                                                  "the VM runs and its console printed anything")
    boot_check_timeout_s = models.PositiveIntegerField(default=120)
    convert_guest = models.BooleanField(default=False,
                                        help_text="Convert the guest (virt-v2v-in-place) on the overlays before "
                                                  "a failed-over VM's first boot")

    class Meta:
        db_table = "vm_replication_contexts"

    def __str__(self):
        return f"{self.vm} {self.state}"

    @classmethod
    def of(cls, vm) -> VMContext:
        context, _ = cls.objects.get_or_create(vm=vm)
        return context

    @classmethod
    def registered(cls, vm, actor: str, how: str) -> VMContext:
        """A new VM's first line of history: who registered it, and how."""
        context = cls.of(vm)
        VMStateChange.objects.create(context=context, to_state=context.state, actor=actor[:100],
                                     reason=f"registered {how} by {actor}"[:2000])
        return context

    def move(self, to: VMState, *, actor: str, reason: str = "", only_from: set | None = None) -> None:
        """Move to `to` if the stored state allows it (and is in `only_from`,
        when given); raises IllegalMove with the reason otherwise."""
        allowed = set(sources_of(VM_TRANSITIONS, to))
        if only_from is not None:
            allowed &= set(only_from)
        with transaction.atomic():
            moved = VMContext.objects.filter(pk=self.pk, state__in=allowed).update(state=to,
                                                                                  updated_at=timezone.now())
            self.refresh_from_db()
            if not moved:
                if self.state == to:
                    return
                why = VM_STATE_REFUSALS.get(self.state, f"it is {self.state}")
                raise IllegalMove(f"VM {self.vm.name} cannot go to {VMState(to).label.lower()}: {why}")
            VMStateChange.objects.create(context=self, to_state=to, actor=actor[:100], reason=reason[:2000])

    def state_before_replicating(self) -> VMState:
        """The state the VM left when its current cycle started."""
        entered = self.changes.filter(to_state=VMState.REPLICATING).order_by("-at", "-id").first()
        if entered is None:
            return VMState.DISCOVERED
        before = self.changes.filter(id__lt=entered.id).order_by("-id").first()
        return VMState(before.to_state) if before is not None else VMState.DISCOVERED


class VMStateChange(models.Model):
    """The VM's lifecycle history: every state it entered, when, who, why."""

    context = models.ForeignKey(VMContext, on_delete=models.CASCADE, related_name="changes")
    to_state = models.CharField(max_length=30, choices=VMState.choices)
    at = models.DateTimeField(default=timezone.now)
    actor = models.CharField(max_length=100)
    reason = models.TextField(blank=True)

    class Meta:
        db_table = "vm_state_changes"
        ordering = ["at", "id"]

    def __str__(self):
        return f"{self.context.vm} -> {self.to_state} by {self.actor}"


class FailoverJob(models.Model):
    """One failover of a VM onto the destination, step by step."""

    vm = models.ForeignKey("replication.VirtualMachine", on_delete=models.PROTECT, related_name="failovers")
    kind = models.CharField(max_length=10, choices=FailoverKind.choices)
    status = models.CharField(max_length=20, choices=FailoverStatus.choices, default=FailoverStatus.PENDING,
                              db_index=True)
    replication_job = models.ForeignKey("replication.ReplicationJob", null=True, on_delete=models.SET_NULL,
                                        related_name="+", help_text="The completed cycle whose replica boots")
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
    console_match = models.TextField(blank=True, help_text="The console line that verified the boot")
    console_tail = models.TextField(blank=True)
    error_message = models.TextField(blank=True)
    actor = models.CharField(max_length=100)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    completed_at = models.DateTimeField(null=True, blank=True)
    ended_at = models.DateTimeField(null=True, blank=True)

    class Meta:
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

    def transition(self, to: FailoverStatus, *, from_statuses, **fields) -> bool:
        moved = FailoverJob.objects.filter(pk=self.pk, status__in=list(from_statuses)).update(status=to, **fields)
        self.refresh_from_db()
        return bool(moved)

    def beat(self) -> None:
        FailoverJob.objects.filter(pk=self.pk).update(heartbeat_at=timezone.now())


class FailoverStep(models.Model):
    """One step of a failover: timed, with its outcome."""

    class Status(models.TextChoices):
        RUNNING = "running", "Running"
        DONE = "done", "Done"
        FAILED = "failed", "Failed"

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

    def end(self, status: str, detail: str = "") -> None:
        self.status, self.ended_at, self.detail = status, timezone.now(), detail[:4000]
        self.save(update_fields=["status", "ended_at", "detail"])


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


class ApiToken(models.Model):
    """A token for scripts calling the JSON API (Authorization: Bearer ...),
    acting as its user. Only the token's SHA-256 is stored: it is shown once,
    when made (manage.py api_token)."""

    user = models.ForeignKey("auth.User", on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100)
    key_sha256 = models.CharField(max_length=64, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = "api_tokens"

    def __str__(self):
        return f"{self.name} ({self.user})"

    @staticmethod
    def digest(key: str) -> str:
        import hashlib

        return hashlib.sha256(key.encode()).hexdigest()

    @classmethod
    def issue(cls, user, name: str) -> tuple[ApiToken, str]:
        import secrets

        key = secrets.token_urlsafe(32)
        return cls.objects.create(user=user, name=name[:100], key_sha256=cls.digest(key)), key

    @classmethod
    def user_for(cls, key: str):
        token = cls.objects.select_related("user").filter(key_sha256=cls.digest(key), user__is_active=True).first()
        if token is None:
            return None
        cls.objects.filter(pk=token.pk).update(last_used_at=timezone.now())
        return token.user

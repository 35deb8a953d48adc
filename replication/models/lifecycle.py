"""A VM's lifecycle: the state that says what an operator may do next
(replicate, fail over, end a test, roll back), and every move with its
time, actor and reason. The state moves along choices.VM_TRANSITIONS
(models.base); a refused move says why."""

from __future__ import annotations

import re

from django.core.exceptions import ValidationError
from django.db import models, transaction
from django.utils import timezone

from replication.choices import VM_STATE_REFUSALS, VM_TRANSITIONS, VMState
from replication.models.base import StateMachine
from replication.platforms.base import parse_boot_probes


class IllegalMove(Exception):
    """A lifecycle move the VM's state does not allow; the message says why."""


class VMContext(StateMachine):
    """MigrateKit OSSEA's vm_replication_contexts: one per VM, its lifecycle state."""

    state_field = "state"
    transitions = VM_TRANSITIONS

    vm = models.OneToOneField("replication.VirtualMachine", on_delete=models.CASCADE, related_name="context")
    state = models.CharField(max_length=30, choices=VMState.choices, default=VMState.DISCOVERED, db_index=True)
    updated_at = models.DateTimeField(auto_now=True)
    boot_check_regex = models.CharField(max_length=500, blank=True,
                                        help_text="What the console must show for a boot to count; empty: "
                                                  "the VM runs and its console printed anything")
    boot_check_timeout_s = models.PositiveIntegerField(default=120)
    boot_probes = models.CharField(max_length=100, blank=True,
                                   help_text="How a boot is seen, comma-separated, any one suffices: console, "
                                             "screen, network, agent; empty: the default probes")
    hardware = models.JSONField(default=dict, blank=True,
                                help_text="The operator's choices for the destination's hardware (firmware, "
                                          "secure_boot, tpm, disk_bus, scsi_model, nic_model); a key absent: "
                                          "from the source and the conversion")
    hardware_warning = models.CharField(max_length=500, blank=True,
                                        help_text="Why the VM may not boot as expected (e.g. a Windows guest "
                                                  "converted without virtio-win drivers)")
    convert_guest = models.BooleanField(default=False,
                                        help_text="Convert the guest (virt-v2v-in-place) on the overlays before "
                                                  "a failed-over VM's first boot")

    class Meta:
        verbose_name = "VM lifecycle"
        db_table = "vm_replication_contexts"

    def __str__(self):
        return f"{self.vm} {self.state}"

    def probes(self) -> tuple[str, ...]:
        """The boot probes a failover tries: the ones set, else the default ones."""
        return parse_boot_probes(self.boot_probes)

    def clean(self):
        errors = {}
        try:
            self.boot_probes = ",".join(parse_boot_probes(self.boot_probes)) if self.boot_probes.strip() else ""
        except ValueError as exc:
            errors["boot_probes"] = str(exc)
        try:
            re.compile(self.boot_check_regex)
        except re.error as exc:
            errors["boot_check_regex"] = f"not a regular expression: {exc}"
        if not 1 <= self.boot_check_timeout_s <= 3600:
            errors["boot_check_timeout_s"] = "1..3600 seconds"
        if errors:
            raise ValidationError(errors)

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

    def transition(self, to: VMState, *, actor: str, reason: str = "", only_from=None, **fields) -> bool:
        """StateMachine.transition, each move in the VM's history."""
        fields.setdefault("updated_at", timezone.now())
        with transaction.atomic():
            moved = super().transition(to, only_from=only_from, **fields)
            if moved:
                VMStateChange.objects.create(context=self, to_state=to, actor=actor[:100], reason=reason[:2000])
        return moved

    def move(self, to: VMState, *, actor: str, reason: str = "", only_from=None) -> None:
        """transition() for callers that need the move made: raises
        IllegalMove with the reason unless the VM moved or already is in `to`."""
        if self.transition(to, actor=actor, reason=reason, only_from=only_from) or self.state == to:
            return
        why = VM_STATE_REFUSALS.get(self.state, f"it is {self.state}")
        raise IllegalMove(f"VM {self.vm.name} cannot go to {VMState(to).label.lower()}: {why}")

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
        verbose_name = "VM state change"
        db_table = "vm_state_changes"
        ordering = ["at", "id"]

    def __str__(self):
        return f"{self.context.vm} -> {self.to_state} by {self.actor}"

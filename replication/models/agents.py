"""The agents (MigrateKit OSSEA's VMAs) that copy VMware sites' disks: each a
record with its state, how the OMA reaches its progress API, its own queue,
limits and health; the one-time pairing codes an agent enrols with; and the
audit trail of every enrolment step.

An agent's secrets are never stored here: its API token by reference (a
file, as for vCenter passwords), its broker password and message key as
hashes or in the secrets directory (services.agents writes them)."""

from __future__ import annotations

from django.db import models
from django.utils import timezone

from replication.choices import AGENT_TRANSITIONS, AgentState
from replication.models.base import StateMachine
from replication.names import validate_no_control_characters


class Agent(StateMachine):
    state_field = "state"
    transitions = AGENT_TRANSITIONS

    class Channel(models.TextChoices):
        DIRECT = "direct", "direct (the OMA reaches the agent's API at its URL)"
        TUNNEL = "tunnel", "outbound tunnel (the agent's SSH reverse tunnel; the OMA reads its end)"

    name = models.CharField(max_length=50, unique=True, validators=[validate_no_control_characters],
                            help_text="Also its queue's name: vma.<name>")
    state = models.CharField(max_length=20, choices=AgentState.choices, default=AgentState.ACTIVE, db_index=True)
    channel = models.CharField(max_length=10, choices=Channel.choices, default=Channel.DIRECT)
    api_url = models.CharField(max_length=500, blank=True,
                               help_text="Where the OMA reads its progress API (for a tunnel: the OMA's end)")
    token_file = models.CharField(max_length=1000, blank=True,
                                  help_text="File on the OMA holding the agent's VMA_TOKEN; empty: the "
                                            "OMA's own VMA_TOKEN (the embedded agent)")
    max_vms = models.PositiveIntegerField(null=True, blank=True, help_text="VMs in flight; empty: AGENT_MAX_VMS")
    max_disks = models.PositiveIntegerField(null=True, blank=True,
                                            help_text="Disks in flight; empty: AGENT_MAX_DISKS")
    max_per_host = models.PositiveIntegerField(null=True, blank=True,
                                               help_text="VMs in flight per ESXi host; empty: AGENT_MAX_PER_HOST")
    broker_user = models.CharField(max_length=100, blank=True,
                                   help_text="Its own broker user (enrolled agents), allowed only its queue")
    message_key_file = models.CharField(max_length=1000, blank=True,
                                        help_text="File holding the key its messages to the OMA are signed with")
    public_key = models.TextField(blank=True, help_text="The agent's SSH public key (enrolment, tunnel)")
    tunnel_port = models.PositiveIntegerField(null=True, blank=True, unique=True,
                                              help_text="The OMA's end of its reverse tunnel (127.0.0.1:port)")
    version = models.CharField(max_length=50, blank=True, help_text="Its software version, as it last said")
    last_seen_at = models.DateTimeField(null=True, blank=True, help_text="Its API last answered the poller")
    last_error = models.CharField(max_length=500, blank=True, help_text="Why its API did not answer, last time")
    enrolled_from = models.CharField(max_length=200, blank=True, help_text="The address it enrolled from")
    approved_by = models.CharField(max_length=100, blank=True)
    approved_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        db_table = "agents"
        ordering = ["name"]

    def __str__(self):
        return self.name

    @property
    def queue(self) -> str:
        from vma_agent.task_names import agent_queue

        return agent_queue(self.name)

    @property
    def takes_work(self) -> bool:
        """New cycles may start on it (paused, draining, pending, revoked: no)."""
        return self.state == AgentState.ACTIVE


class PairingCode(models.Model):
    """A one-time code an administrator made for one agent to enrol with;
    only its hash is kept."""

    code_hash = models.CharField(max_length=64, unique=True)
    created_by = models.CharField(max_length=100)
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField()
    used_at = models.DateTimeField(null=True, blank=True)
    agent = models.ForeignKey(Agent, null=True, blank=True, on_delete=models.SET_NULL, related_name="pairing_codes",
                              help_text="The agent that enrolled with it")

    class Meta:
        verbose_name = "pairing code"
        db_table = "agent_pairing_codes"
        ordering = ["-created_at"]

    def __str__(self):
        return f"pairing code of {self.created_by}, {'used' if self.used_at else 'unused'}"

    def usable(self) -> bool:
        return self.used_at is None and self.expires_at > timezone.now()


class AgentAuditEntry(models.Model):
    """Who did what to which agent, when and from where (enrolment,
    approval, rejection, revocation, refused messages)."""

    agent = models.ForeignKey(Agent, null=True, blank=True, on_delete=models.SET_NULL, related_name="audit")
    agent_name = models.CharField(max_length=50, blank=True, help_text="Kept if the agent is removed")
    action = models.CharField(max_length=50)
    actor = models.CharField(max_length=100)
    source = models.CharField(max_length=200, blank=True, help_text="The address the request came from")
    detail = models.TextField(blank=True)
    at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        verbose_name = "agent audit entry"
        verbose_name_plural = "agent audit entries"
        db_table = "agent_audit"
        ordering = ["-at", "-id"]

    def __str__(self):
        return f"{self.action} {self.agent_name} by {self.actor}"

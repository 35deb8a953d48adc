"""The agents (VMAs) as the OMA works with them: which agent a VM's work
goes to, and the client of that agent's progress API (its URL and token as
its record says; the embedded agent "local" is created on first use and
reached at VMA_URL with VMA_TOKEN, so a single-agent install needs no
configuration)."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

from django.conf import settings
from django.db import transaction
from django.db.models import Count

from replication import names
from replication.choices import JOB_ACTIVE, AgentState, DiskStatus
from replication.models import Agent, AgentAuditEntry, ReplicationJob, VCenter, VirtualMachine, VMDisk
from vma_agent.client import ProgressClient

LOCAL = "local"

log = logging.getLogger(__name__)


class AgentError(ValueError):
    """An agent that does not exist, or cannot be reached as recorded; str() says why."""


def get(name: str) -> Agent:
    """The agent of that name; "local" (the embedded default) is created on first use."""
    if name == LOCAL:
        agent, _ = Agent.objects.get_or_create(name=LOCAL)
        return agent
    try:
        return Agent.objects.get(name=name)
    except Agent.DoesNotExist:
        raise AgentError(f"no agent named {name!r}: manage.py agent add {name} --url URL --token-file FILE, "
                         "or enrol it (manage.py agent pairing-code)") from None


def of_vm(vm) -> Agent:
    """The agent that copies the VM's disks and switches its power."""
    return get(vm.agent)


def api_url(agent: Agent) -> str:
    return agent.api_url or settings.VMA_URL


def api_token(agent: Agent) -> str | None:
    """The agent's API token: from its token file, or the OMA's own
    VMA_TOKEN for an agent recorded without one (the embedded agent)."""
    if not agent.token_file:
        return settings.VMA_TOKEN
    try:
        return Path(agent.token_file).read_text().strip() or None
    except OSError as exc:
        raise AgentError(f"agent {agent.name}: cannot read its token file {agent.token_file}: "
                         f"{exc.strerror}") from None


def client(agent: Agent) -> ProgressClient:
    """A client of the agent's progress API (a new HTTP session: one per
    thread, as requests' sessions are not thread-safe)."""
    return ProgressClient(api_url(agent), api_token(agent), timeout_s=settings.VMA_REQUEST_TIMEOUT_S,
                          keep_alive=settings.VMA_HTTP_KEEPALIVE)


# --- health and limits ([limits] part of issue 30) --------------------------------

_REFUSALS = {
    AgentState.PAUSED: "agent {name} is paused: new cycles wait until it is resumed",
    AgentState.DRAINING: "agent {name} is draining: it finishes its running copies and takes no new cycle",
    AgentState.PENDING: "agent {name} awaits approval: no cycle before it is approved",
    AgentState.REJECTED: "agent {name} was rejected: it takes no work",
    AgentState.REVOKED: "agent {name} is revoked: it takes no work",
}


def work_refusal(agent: Agent) -> str | None:
    """Why the agent takes no new cycle now; None when it takes work."""
    if agent.takes_work:
        return None
    return _REFUSALS.get(agent.state, "agent {name} is {state}: it takes no new cycle").format(
        name=agent.name, state=agent.state)


def silent_after() -> timedelta:
    return timedelta(seconds=settings.AGENT_SILENT_AFTER_S)


def is_silent(agent: Agent, now: datetime) -> bool:
    return agent.last_seen_at is not None and agent.last_seen_at < now - silent_after()


def silent(now: datetime) -> list[Agent]:
    """Agents whose API answered once and not for AGENT_SILENT_AFTER_S since
    (one never seen has not gone silent: its copies' own heartbeats judge them)."""
    return list(Agent.objects.filter(last_seen_at__lt=now - silent_after()))


# Agents by hand ([routing]): add, list, pause, resume, drain, remove ------
#
# Every change is one AgentAuditEntry (who, from where, what). Enrolment
# (pairing codes, approval, revocation) is its own section/module.

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


def _audit(agent: Agent | None, name: str, action: str, actor: str, source: str = "", detail: str = "") -> None:
    AgentAuditEntry.objects.create(agent=agent, agent_name=name, action=action, actor=actor[:100],
                                   source=source[:200], detail=detail)


def named(name: str) -> Agent:
    """The agent a VM or vCenter names. A name with no record (given to
    add_vm or discover before it was added) is recorded now, as migration
    0023 recorded every name already in use: active, read at VMA_URL with
    VMA_TOKEN until `agent add` or enrolment says otherwise."""
    agent, created = Agent.objects.get_or_create(name=name)
    if created and name != LOCAL:
        log.warning("agent %s is named by a VM but was not recorded: recorded now, read at VMA_URL", name)
        _audit(agent, name, "recorded", "system", detail="named before it was added: read at VMA_URL")
    return agent


def _limit(value: int | None, what: str) -> int | None:
    if value is not None and value < 1:
        raise AgentError(f"{what} must be at least 1, not {value} (leave it out for the OMA's default)")
    return value


def add(name: str, url: str, token_file: str, *, max_vms: int | None = None, max_disks: int | None = None,
        max_per_host: int | None = None, actor: str, source: str = "") -> Agent:
    """Record an agent the operator reaches by hand (their own tunnel or
    VPN): its progress API answers at `url` with the token held in
    `token_file` (the agent host's VMA_TOKEN). Active at once."""
    name = names.checked(name, Agent, error=AgentError, what="agent name")
    if not NAME_PATTERN.match(name):
        raise AgentError(f"the agent name {name!r} may hold only letters, digits, '-' and '_' and must start with "
                         "a letter or digit (it names the agent's queue, vma.<name>)")
    parts = urlsplit(url or "")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise AgentError(f"the agent's URL must be http(s)://HOST[:PORT], not {url!r}")
    try:
        parts.port  # noqa: B018 - raises for a port out of range
    except ValueError as exc:
        raise AgentError(f"the agent's URL {url!r}: {exc}") from None
    path = Path(token_file or "")
    if not token_file or not path.is_absolute():
        raise AgentError(f"the token file must be an absolute path, not {token_file!r}")
    try:
        if not path.read_text().strip():
            raise AgentError(f"the token file {token_file} is empty: it must hold the agent host's VMA_TOKEN")
    except OSError as exc:
        raise AgentError(f"cannot read the token file {token_file}: {exc.strerror}") from None
    fields = {"api_url": url.rstrip("/"), "token_file": str(path), "channel": Agent.Channel.DIRECT,
              "max_vms": _limit(max_vms, "--max-vms"), "max_disks": _limit(max_disks, "--max-disks"),
              "max_per_host": _limit(max_per_host, "--max-per-host")}
    with transaction.atomic():
        if Agent.objects.filter(name=name).exists():
            raise AgentError(f"an agent named {name!r} already exists")
        agent = Agent.objects.create(name=name, state=AgentState.ACTIVE, **fields)
        _audit(agent, name, "added", actor, source, f"url {agent.api_url}, token file {agent.token_file}"
               + "".join(f", {key} {value}" for key, value in fields.items() if key.startswith("max_") and value))
    return agent


@dataclass
class AgentRow:
    """An agent as the Agents page and `agent list` show it."""

    agent: Agent
    copies_running: int
    vms: int

    def as_dict(self) -> dict:
        a = self.agent
        return {"name": a.name, "state": a.state, "channel": a.channel, "url": api_url(a),
                "last_seen_at": a.last_seen_at.isoformat() if a.last_seen_at else None,
                "version": a.version, "last_error": a.last_error, "copies_running": self.copies_running,
                "vms": self.vms, "max_vms": a.max_vms, "max_disks": a.max_disks, "max_per_host": a.max_per_host}


def copies_running(name: str) -> int:
    return VMDisk.objects.filter(job__vm__agent=name, status=DiskStatus.COPYING,
                                 job__status__in=JOB_ACTIVE).count()


def listing() -> list[AgentRow]:
    """Every agent with what it copies now and how many VMs it serves (the
    embedded agent "local" included once it exists)."""
    copying = dict(VMDisk.objects.filter(status=DiskStatus.COPYING, job__status__in=JOB_ACTIVE)
                   .values("job__vm__agent").annotate(n=Count("pk")).values_list("job__vm__agent", "n"))
    vms = dict(VirtualMachine.objects.values("agent").annotate(n=Count("pk")).values_list("agent", "n"))
    return [AgentRow(agent, copying.get(agent.name, 0), vms.get(agent.name, 0)) for agent in Agent.objects.all()]


_MOVES = {  # action: (state it goes to, what it means, states it may come from)
    "pause": (AgentState.PAUSED, "takes no new cycle; its running copies go on",
              (AgentState.ACTIVE, AgentState.DRAINING)),
    "resume": (AgentState.ACTIVE, "takes new cycles again", (AgentState.PAUSED, AgentState.DRAINING)),
    "drain": (AgentState.DRAINING, "takes no new cycle; remove it once its copies end",
              (AgentState.ACTIVE, AgentState.PAUSED)),
}


def change_state(name: str, action: str, *, actor: str, source: str = "") -> Agent:
    """pause, resume or drain an agent; refused, with the reason, from a
    state that does not allow it (pending, rejected, revoked: enrolment's)."""
    to, meaning, sources = _MOVES[action]
    agent = get(name)
    if agent.state == to:
        raise AgentError(f"agent {name} is already {agent.get_state_display()}")
    if not agent.transition(to, only_from=sources):
        raise AgentError(f"agent {name} is {agent.get_state_display()}: it cannot be {action}d"
                         + (" (approve it first)" if agent.state == AgentState.PENDING else ""))
    _audit(agent, name, action, actor, source, f"now {agent.get_state_display()}: {meaning}")
    return agent


def pause(name: str, *, actor: str, source: str = "") -> Agent:
    return change_state(name, "pause", actor=actor, source=source)


def resume(name: str, *, actor: str, source: str = "") -> Agent:
    return change_state(name, "resume", actor=actor, source=source)


def drain(name: str, *, actor: str, source: str = "") -> Agent:
    return change_state(name, "drain", actor=actor, source=source)


def remove(name: str, *, actor: str, source: str = "") -> None:
    """Forget an agent; refused while a VM or vCenter names it or it copies
    (move the VMs to another agent first, or drain it and wait)."""
    with transaction.atomic():
        try:
            agent = Agent.objects.select_for_update().get(name=name)
        except Agent.DoesNotExist:
            raise AgentError(f"no agent named {name!r}") from None
        reasons = []
        if n := copies_running(name):
            reasons.append(f"it is copying {n} disk{'s' if n != 1 else ''}")
        if n := ReplicationJob.objects.filter(vm__agent=name, status__in=JOB_ACTIVE).count():
            reasons.append(f"{n} job{'s are' if n != 1 else ' is'} still running on it")
        if n := VirtualMachine.objects.filter(agent=name).count():
            reasons.append(f"{n} VM{'s use' if n != 1 else ' uses'} it")
        if used_by := list(VCenter.objects.filter(agent=name).values_list("name", flat=True)):
            reasons.append(f"vCenter {', '.join(used_by)} is reached through it")
        if reasons:
            raise AgentError(f"agent {name} cannot be removed: {'; '.join(reasons)}")
        _audit(None, name, "removed", actor, source,
               f"was {agent.get_state_display()}, url {api_url(agent)}")
        agent.delete()


__all__ = ["LOCAL", "AgentError", "AgentRow", "add", "api_token", "api_url", "change_state", "client",
           "copies_running", "drain", "get", "is_silent", "listing", "named", "of_vm", "pause", "remove", "resume",
           "silent", "work_refusal"]

"""The agents (VMAs) as the OMA works with them: which agent a VM's work
goes to, and the client of that agent's progress API (its URL and token as
its record says; the embedded agent "local" is created on first use and
reached at VMA_URL with VMA_TOKEN, so a single-agent install needs no
configuration)."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

from django.conf import settings
from django.utils import timezone

from replication.choices import AgentState
from replication.models import Agent
from vma_agent.client import ProgressClient

LOCAL = "local"


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


def seen(agent: Agent, version: str = "", now: datetime | None = None) -> None:
    """Its API answered (the poller says so): its health, one writer."""
    fields = {"last_seen_at": now or timezone.now(), "last_error": ""}
    if version:
        fields["version"] = version[:50]
    Agent.objects.filter(pk=agent.pk).update(**fields)


__all__ = ["LOCAL", "AgentError", "api_token", "api_url", "client", "get", "is_silent", "of_vm", "seen", "silent",
           "work_refusal"]

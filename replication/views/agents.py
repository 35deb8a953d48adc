"""The Agents page: every agent (MigrateKit OSSEA's VMAs) with its state,
channel, health and what it copies; operators pause, resume or drain one;
administrators make pairing codes and approve, reject or revoke enrolled
agents (each asked first, naming what will happen)."""

from django.conf import settings
from django.contrib import messages
from django.contrib.admin.models import ADDITION
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_POST

from replication.models import Agent
from replication.roles import ADMINISTER, OPERATE, READ, actor_of, log_admin, page_permission, refusal
from replication.services import agents, enrolment
from replication.views.common import render_page

ACTIONS = ("pause", "resume", "drain")
# What each enrolment step does, as the confirmation page says it.
ENROLMENT_STEPS = {
    "approve": ("Approve", [
        "allow its SSH key to open its reverse tunnel (its own port on this OMA, forwarding only)",
        "create its own broker user, reading only its own queue",
        "issue its API token and message key (and its own export key, when the export uses TLS-PSK), fetched "
        "once by the agent with its pairing code"]),
    "reject": ("Reject", ["refuse its enrolment: it gets no tunnel, broker user or credentials"]),
    "revoke": ("Revoke", [
        "fail its running cycles and stop their copies (earlier recovery points are kept)",
        "fail a live failover waiting on it to shut its source down, and undo it",
        "remove its tunnel key and end its SSH session, and its export key",
        "delete its broker user and close its connections: its messages are refused from now on"]),
}
DONE = {"approve": "approved", "reject": "rejected", "revoke": "revoked"}


@page_permission(READ)
def agent_list(request, new_code: str = ""):
    return render_page(request, "replication/agents.html",
                       {"rows": agents.listing(), "actions": ACTIONS, "new_code": new_code,
                        "code_minutes": settings.PAIRING_CODE_MINUTES})


@require_POST
@page_permission(ADMINISTER)
def agent_pairing_code(request):
    """A one-time code for one agent host to enrol with, shown once (only its hash is kept)."""
    code = enrolment.new_pairing_code(actor_of(request))
    record = enrolment.pairing_code_record(code)
    log_admin(request, record, "pairing code made from the Agents page, valid until "
                               f"{record.expires_at.isoformat(timespec='minutes')}", flag=ADDITION)
    return agent_list(request, new_code=code)


@page_permission(READ)
def agent_enrolment(request, name: str, step: str):
    """Approve, reject or revoke agent `name`: GET asks, naming what will
    happen; POST does it through the same service as `manage.py agent`."""
    agent = get_object_or_404(Agent, name=name)
    if step not in ENROLMENT_STEPS:
        messages.error(request, f"unknown step {step!r}: one of {', '.join(ENROLMENT_STEPS)}")
        return redirect("agent-list")
    if not request.user.has_perm(ADMINISTER):
        return render(request, "replication/forbidden.html", {"reason": refusal(request.user, ADMINISTER)},
                      status=403)
    label, consequences = ENROLMENT_STEPS[step]
    page = {"title": f"{label} agent {agent.name}", "action_label": f"{label} {agent.name}",
            "consequences": consequences, "back_url": reverse("agent-list"),
            "crumbs": [(reverse("agent-list"), "Agents")], "warning": "", "refusal": ""}
    if request.method != "POST":
        return render_page(request, "replication/confirm.html", page)
    act = {"approve": enrolment.approve, "reject": enrolment.reject, "revoke": enrolment.revoke}[step]
    try:
        agent = act(name, actor_of(request), request.META.get("REMOTE_ADDR", ""))
    except enrolment.EnrolmentError as exc:
        page["refusal"] = str(exc)
        return render_page(request, "replication/confirm.html", page, exc.status if exc.status < 500 else 409)
    log_admin(request, agent, f"{DONE[step]} agent {agent.name}: now {agent.get_state_display()}")
    messages.info(request, f"agent {agent.name} {DONE[step]}: now {agent.get_state_display()}")
    return redirect("agent-list")


@require_POST
@page_permission(OPERATE)
def agent_action(request, name: str, action: str):
    if action not in ACTIONS:
        messages.error(request, f"unknown action {action!r}: one of {', '.join(ACTIONS)}")
        return redirect("agent-list")
    try:
        agent = agents.change_state(name, action, actor=actor_of(request), source=request.META.get("REMOTE_ADDR", ""))
    except agents.AgentError as exc:
        messages.error(request, str(exc))
    else:
        log_admin(request, agent, f"{action} agent {agent.name}: now {agent.get_state_display()}")
        messages.info(request, f"agent {agent.name} is now {agent.get_state_display()}")
    return redirect("agent-list")

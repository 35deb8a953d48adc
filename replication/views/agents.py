"""The Agents page: every agent (MigrateKit OSSEA's VMAs) with its state,
channel, health and what it copies; operators pause, resume or drain one."""

from django.contrib import messages
from django.shortcuts import redirect
from django.views.decorators.http import require_POST

from replication.roles import OPERATE, READ, actor_of, log_admin, page_permission
from replication.services import agents
from replication.views.common import render_page

ACTIONS = ("pause", "resume", "drain")


@page_permission(READ)
def agent_list(request):
    return render_page(request, "replication/agents.html", {"rows": agents.listing(), "actions": ACTIONS})


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

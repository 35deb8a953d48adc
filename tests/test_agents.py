"""Agents as records ([routing] of issue 30): `manage.py agent` and its
service, the poller reading every agent's own API, stop and limit going to
the VM's agent, discovery through a vCenter's agent; and two agents as two
sets of processes on this machine copying at once, one then killed."""

from __future__ import annotations

import json
import subprocess
import sys
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from replication.choices import AgentState
from replication.models import Agent, AgentAuditEntry, ReplicationJob
from replication.services import agents, orders
from tests.helpers import PROJECT_ROOT, MiB, make_image, worker_env


def run(*args) -> str:
    out = StringIO()
    call_command(*args, stdout=out, stderr=StringIO())
    return out.getvalue()


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "site-b.token"
    path.write_text("token-of-site-b\n")
    return path


# The command and its service -------------------------------------------------


@pytest.mark.django_db
def test_agent_add_records_it_active_with_an_audit_entry(token_file):
    out = run("agent", "add", "site-b", "--url", "http://127.0.0.1:9101/", "--token-file", str(token_file),
              "--max-vms", "3", "--max-per-host", "2")

    agent = Agent.objects.get(name="site-b")
    assert "agent site-b added" in out and "vma.site-b" in out
    assert (agent.state, agent.api_url, agent.token_file, agent.max_vms, agent.max_disks, agent.max_per_host) == (
        AgentState.ACTIVE, "http://127.0.0.1:9101", str(token_file), 3, None, 2)
    assert agents.api_token(agent) == "token-of-site-b"
    entry = AgentAuditEntry.objects.get(agent=agent)
    assert entry.action == "added" and entry.actor and "http://127.0.0.1:9101" in entry.detail


@pytest.mark.django_db
@pytest.mark.parametrize(("args", "reason"), [
    (["bad name", "--url", "http://h:1"], "may hold only letters"),
    (["b", "--url", "ftp://h"], r"must be http\(s\)://HOST"),
    (["b", "--url", "http://h:99999"], "Port out of range"),
    (["b", "--url", "http://h:1", "--max-vms", "0"], "--max-vms must be at least 1"),
])
def test_agent_add_refuses_bad_input_with_the_reason(token_file, args, reason):
    with pytest.raises(CommandError, match=reason):
        run("agent", "add", *args, "--token-file", str(token_file))
    assert not Agent.objects.exclude(name=agents.LOCAL).exists() and not AgentAuditEntry.objects.exists()


@pytest.mark.django_db
def test_agent_add_refuses_a_missing_or_empty_token_file_and_a_taken_name(tmp_path, token_file):
    with pytest.raises(CommandError, match="cannot read the token file"):
        run("agent", "add", "b", "--url", "http://h:1", "--token-file", str(tmp_path / "nope"))
    (tmp_path / "empty").write_text(" \n")
    with pytest.raises(CommandError, match="is empty"):
        run("agent", "add", "b", "--url", "http://h:1", "--token-file", str(tmp_path / "empty"))
    with pytest.raises(CommandError, match="absolute path"):
        run("agent", "add", "b", "--url", "http://h:1", "--token-file", "relative.token")
    run("agent", "add", "b", "--url", "http://h:1", "--token-file", str(token_file))
    with pytest.raises(CommandError, match="already exists"):
        run("agent", "add", "b", "--url", "http://h:2", "--token-file", str(token_file))


@pytest.mark.django_db
def test_pause_resume_drain_move_the_state_and_refuse_what_the_state_forbids(token_file):
    run("agent", "add", "b", "--url", "http://h:1", "--token-file", str(token_file))
    assert "now paused" in run("agent", "pause", "b")
    with pytest.raises(CommandError, match="already paused"):
        run("agent", "pause", "b")
    assert "now draining" in run("agent", "drain", "b")
    assert "now active" in run("agent", "resume", "b")
    Agent.objects.filter(name="b").update(state=AgentState.REVOKED)
    with pytest.raises(CommandError, match="is revoked: it cannot be resumed"):
        run("agent", "resume", "b")
    with pytest.raises(CommandError, match="no agent named 'ghost'"):
        run("agent", "pause", "ghost")
    assert list(AgentAuditEntry.objects.filter(agent_name="b").order_by("at", "id")
                .values_list("action", flat=True)) == ["added", "pause", "drain", "resume"]


@pytest.mark.django_db
def test_remove_is_refused_while_a_vm_or_vcenter_uses_the_agent_or_it_copies(token_file, tmp_path):
    from replication.services.inventory import register_image_vm

    run("agent", "add", "b", "--url", "http://h:1", "--token-file", str(token_file))
    vm = register_image_vm("vm-b", [str(make_image(tmp_path / "b.img", MiB, [(0, 4096)]))], agent="b")
    with pytest.raises(CommandError, match="agent b cannot be removed: 1 VM uses it"):
        run("agent", "remove", "b")
    vm.delete()
    assert "agent b removed" in run("agent", "remove", "b")
    assert not Agent.objects.filter(name="b").exists()
    assert AgentAuditEntry.objects.filter(agent_name="b", action="removed").exists()
    with pytest.raises(CommandError, match="no agent named 'b'"):
        run("agent", "remove", "b")


@pytest.mark.django_db
def test_agent_list_shows_state_health_copies_and_vms(token_file, tmp_path):
    from replication.services.inventory import register_image_vm

    run("agent", "add", "b", "--url", "http://h:1", "--token-file", str(token_file))
    Agent.objects.filter(name="b").update(version="0.30.0", last_error="connection refused")
    register_image_vm("vm-b", [str(make_image(tmp_path / "b.img", MiB, [(0, 4096)]))], agent="b")

    rows = json.loads(run("agent", "list", "--json"))
    (row,) = [r for r in rows if r["name"] == "b"]
    assert (row["state"], row["channel"], row["url"], row["version"], row["vms"], row["copies_running"],
            row["last_seen_at"]) == ("active", "direct", "http://h:1", "0.30.0", 1, 0, None)
    text = run("agent", "list")
    assert text.splitlines()[0].split() == ["NAME", "STATE", "CHANNEL", "URL", "LAST", "SEEN", "VERSION", "COPIES",
                                           "VMS"]
    assert "b: last error: connection refused" in text


def test_the_command_refuses_an_unknown_subcommand_with_its_list():
    out = subprocess.run([sys.executable, "manage.py", "agent", "frobnicate"], cwd=PROJECT_ROOT, env=worker_env(),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "invalid choice: 'frobnicate'" in out.stderr and "pause" in out.stderr


@pytest.mark.django_db
def test_stop_and_limit_go_to_the_vms_agent(token_file, tmp_path):
    from replication.services.inventory import register_image_vm

    run("agent", "add", "b", "--url", "http://127.0.0.1:9101", "--token-file", str(token_file))
    vm = register_image_vm("vm-b", [str(make_image(tmp_path / "b.img", MiB, [(0, 4096)]))], agent="b")
    job = ReplicationJob(id="job-20260101-000000.000-abcdef", vm=vm)
    client = orders.agent_client(job)
    assert client.base_url == "http://127.0.0.1:9101"
    assert client.session.headers["Authorization"] == "Bearer token-of-site-b"


@pytest.mark.django_db
def test_discovery_gives_new_vms_the_vcenters_agent(vcenter, token_file):
    from replication.services import vmware as vmware_service
    from simulators.vcenter import vm_spec

    run("agent", "add", "site-b", "--url", "http://h:1", "--token-file", str(token_file))
    sim, record = vcenter(vm_spec("disc01", capacities=[MiB]), name="vc-routing")
    record.agent = "site-b"
    record.save()
    (vm,) = vmware_service.discover(record, ["disc01"])
    assert vm.agent == "site-b"
    with pytest.raises(vmware_service.VCenterConfigError, match="no agent named 'ghost'"):
        vmware_service.discover(record, ["disc01"], agent="ghost")

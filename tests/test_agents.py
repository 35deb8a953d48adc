"""Agents as records ([routing] of issue 30): `manage.py agent` and its
service, the poller reading every agent's own API, stop and limit going to
the VM's agent, discovery through a vCenter's agent; and two agents as two
sets of processes on this machine copying at once, one then killed."""

from __future__ import annotations

import json
import subprocess
import sys
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from replication.choices import AgentState, DiskStatus, JobStatus
from replication.models import Agent, AgentAuditEntry, CopyAttempt, ReplicationJob, VirtualMachine, VMDisk
from replication.services import agents, orders, progress
from tests.helpers import (
    PROJECT_ROOT,
    Judge,
    MiB,
    free_port,
    make_image,
    sha256,
    start_agent_api,
    start_worker,
    wait_until,
    worker_env,
)


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
    # An agent named before it was added is recorded (active, read at VMA_URL, as migration 0023 did).
    VirtualMachine.objects.filter(pk=vm.pk).delete()
    (vm,) = vmware_service.discover(record, ["disc01"], agent="later")
    assert vm.agent == "later" and Agent.objects.get(name="later").api_url == ""
    assert AgentAuditEntry.objects.filter(agent_name="later", action="recorded").exists()


# The Agents page and the admin ------------------------------------------------


@pytest.mark.django_db
def test_the_agents_page_shows_every_agent_to_a_viewer_without_actions(client, token_file):
    from django.urls import reverse

    from tests.helpers import user_with_role

    run("agent", "add", "site-b", "--url", "http://h:1", "--token-file", str(token_file))
    Agent.objects.filter(name="site-b").update(version="0.30.0")
    client.force_login(user_with_role("viewer", "viewer"))
    page = client.get(reverse("agent-list")).content.decode()
    assert 'data-agent="site-b"' in page and "0.30.0" in page and 'href="/agents/"' in page
    assert "/agents/site-b/pause/" not in page
    assert client.post(reverse("agent-action", args=["site-b", "pause"])).status_code == 403
    assert Agent.objects.get(name="site-b").state == AgentState.ACTIVE


@pytest.mark.django_db
def test_an_operator_pauses_and_resumes_an_agent_by_post_with_csrf(token_file):
    from django.test import Client
    from django.urls import reverse

    from tests.helpers import user_with_role

    run("agent", "add", "site-b", "--url", "http://h:1", "--token-file", str(token_file))
    strict = Client(enforce_csrf_checks=True)
    strict.force_login(user_with_role("op", "operator"))
    url = reverse("agent-action", args=["site-b", "pause"])
    assert strict.get(url).status_code == 405
    assert strict.post(url).status_code == 403  # no CSRF token
    page = strict.get(reverse("agent-list"))
    token = page.cookies["csrftoken"].value
    done = strict.post(url, {"csrfmiddlewaretoken": token}, follow=True).content.decode()
    assert "agent site-b is now paused" in done and Agent.objects.get(name="site-b").state == AgentState.PAUSED
    again = strict.post(url, {"csrfmiddlewaretoken": token}, follow=True).content.decode()
    assert "already paused" in again
    entry = AgentAuditEntry.objects.filter(agent_name="site-b", action="pause").get()
    assert entry.actor == "op" and entry.source == "127.0.0.1"
    from django.contrib.admin.models import LogEntry

    logged = LogEntry.objects.get()  # the refused second pause logs nothing
    assert logged.user.username == "op" and logged.object_repr == str(Agent.objects.get(name="site-b"))
    assert "pause agent site-b" in logged.get_change_message()


@pytest.mark.django_db
def test_the_admin_shows_agents_read_mostly(client, token_file):
    from django.contrib.auth.models import User

    run("agent", "add", "site-b", "--url", "http://h:1", "--token-file", str(token_file))
    client.force_login(User.objects.create_superuser("admin", password="s3cret-pass"))
    agent = Agent.objects.get(name="site-b")
    assert client.get("/admin/replication/agent/").status_code == 200
    assert client.get("/admin/replication/agent/add/").status_code == 403
    page = client.get(f"/admin/replication/agent/{agent.pk}/change/").content.decode()
    assert 'name="max_vms"' in page and 'name="api_url"' not in page
    assert client.get("/admin/replication/agentauditentry/").status_code == 200


# Two agents as two sets of processes -------------------------------------------

HEARTBEAT_TIMEOUT_S = 3
DISK_BYTES = 24 * MiB
COPY_RATE = 3 * MiB  # each agent's own limit (COPY_LIMIT_BPS): a copy lasts ~8 s, so the two overlap


class AgentSite:
    """One agent as on its own host: its API (vma_agent.api, served as the
    session's is) with its own token and progress store (a prefix of its
    own), and its own Celery worker consuming only vma.<name>."""

    def __init__(self, name: str, tmp_path: Path):
        self.name = name
        self.token = f"token-of-{name}"
        self.token_file = tmp_path / f"{name}.token"
        self.token_file.write_text(self.token)
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.env = {"VMA_AGENT_NAME": name, "VMA_URL": self.url, "VMA_TOKEN": self.token,
                    "VMA_PROGRESS_PREFIX": f"vma:progress:{name}", "HEARTBEAT_TIMEOUT_S": str(HEARTBEAT_TIMEOUT_S),
                    "COPY_LIMIT_BPS": str(COPY_RATE)}
        self.api = start_agent_api(name, self.env)
        self.worker = start_worker("agent", f"agent-{name}", extra_env=self.env)
        agents.add(name, self.url, str(self.token_file), actor="test")

    def kill(self) -> None:
        from tests.helpers import kill_worker

        kill_worker(self.worker)
        self.api.kill()
        self.api.wait()

    def stop(self) -> None:
        from tests.helpers import stop_worker

        if self.worker.poll() is None:
            stop_worker(self.worker)
        if self.api.poll() is None:
            self.api.terminate()
            self.api.wait(10)


def _copying(job) -> VMDisk:
    return VMDisk.objects.get(job=job)


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_two_agents_copy_at_once_and_only_the_killed_ones_run_is_lost(celery_worker_process, tmp_path, settings):
    from replication.services.inventory import register_image_vm
    from replication.services.jobs import start_replication
    from tests.helpers import replica_sha256, wait_for_job

    settings.HEARTBEAT_TIMEOUT_S = HEARTBEAT_TIMEOUT_S
    monkey_feeds = progress._feeds.copy()
    progress._feeds.clear()
    sites, judge = [], None
    try:
        sites = [AgentSite("east", tmp_path), AgentSite("west", tmp_path)]
        images = {site.name: make_image(tmp_path / f"{site.name}.img", DISK_BYTES, [(0, DISK_BYTES)],
                                        seed=7 if site.name == "east" else 8) for site in sites}
        vms = {site.name: register_image_vm(f"vm-{site.name}", [str(images[site.name])], agent=site.name)
               for site in sites}
        judge = Judge()

        # Both copy at once; each one's progress reaches the database from its own agent's API.
        jobs = {name: start_replication(vm) for name, vm in vms.items()}

        def both_midway() -> bool:
            disks = [_copying(job) for job in jobs.values()]
            running = all(ReplicationJob.objects.get(pk=job.id).status == JobStatus.REPLICATING
                          for job in jobs.values())
            assert running or not all(0 < d.progress_percent < 100 for d in disks), "a copy ended first"
            return running and all(d.status == DiskStatus.COPYING and 0 < d.progress_percent < 100 for d in disks)

        wait_until(both_midway, 60, "both agents' progress in the database while both copy")
        for name, job in jobs.items():
            job = wait_for_job(job.id, timeout=120)
            assert job.status == JobStatus.COMPLETED, (name, job.error_message)
            assert replica_sha256(_copying(job)) == sha256(images[name]), name
        for site in sites:
            agent = Agent.objects.get(name=site.name)
            assert agent.last_seen_at is not None and agent.last_error == "", site.name
            assert agent.version, site.name

        # A second cycle on each; east's agent dies mid-copy (its worker and its API).
        jobs = {name: start_replication(vm) for name, vm in vms.items()}
        wait_until(both_midway, 60, "both second cycles copying")
        east, west = sites
        east.kill()
        west_job = wait_for_job(jobs["west"].id, timeout=120)
        assert west_job.status == JobStatus.COMPLETED, west_job.error_message
        assert replica_sha256(_copying(west_job)) == sha256(images["west"])
        assert not CopyAttempt.objects.filter(disk__job=west_job, outcome=CopyAttempt.Outcome.LOST).exists()

        east_disk = _copying(jobs["east"])
        wait_until(lambda: CopyAttempt.objects.filter(disk=east_disk, outcome=CopyAttempt.Outcome.LOST).exists(),
                   60, "east's run judged lost by the reaper")
        assert ReplicationJob.objects.get(pk=jobs["east"].id).status != JobStatus.COMPLETED
        wait_until(lambda: Agent.objects.get(name="east").last_error != "", 30, "east's silence recorded")
        assert Agent.objects.get(name="west").last_error == ""
    finally:
        if judge is not None:
            judge.stop()
        for site in sites:
            site.stop()
        progress._feeds.clear()
        progress._feeds.update(monkey_feeds)


# The poller and a slow agent -----------------------------------------------------


class SilentAgent:
    """An agent API that accepts connections and never answers (a hung
    host, a stalled tunnel), until released."""

    def __init__(self):
        import socket
        import threading

        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(8)
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.held = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.held.append(conn)

    def release(self):
        self.server.close()
        for conn in self.held:
            conn.close()


@pytest.mark.integration
@pytest.mark.django_db
def test_a_silent_agent_never_delays_the_others_progress(vma_server, tmp_path, monkeypatch, settings):
    from tests.test_progress_api import post
    from tests.test_progress_poller import update

    monkeypatch.setattr("replication.services.jobs.enqueue_prepare", lambda *args: None)
    monkeypatch.setattr(progress, "_feeds", {})
    settings.PROGRESS_POLL_INTERVAL_S = 1  # the pass waits this long for an agent, then goes on
    settings.VMA_REQUEST_TIMEOUT_S = 60  # far longer: only the pass's own wait lets it go on
    silent = SilentAgent()
    token = tmp_path / "slow.token"
    token.write_text("slow-token")
    agents.add("slow", silent.url, str(token), actor="test")
    try:
        local_job, slow_job = _replicating("vm-quick", "local", tmp_path), _replicating("vm-slow", "slow", tmp_path)
        progress.poll_once()  # catch up with what other tests left in the local agent's store
        post(vma_server, local_job.id, update(1, 300, disk_id="disk-2000"))

        stats = progress.poll_once()

        assert (stats.agents, stats.agents_busy) == (2, 1)
        assert VMDisk.objects.get(job=local_job).bytes_done == 300
        wait_until(lambda: silent.held, 10, "the poller's request held by the silent agent")
        assert "no answer within 1 s" in Agent.objects.get(name="slow").last_error
        assert VMDisk.objects.get(job=slow_job).bytes_done == 0

        # Its read still hangs: the next pass skips it rather than waiting, and the local agent's progress flows.
        post(vma_server, local_job.id, update(2, 700, disk_id="disk-2000"))
        stats = progress.poll_once()
        assert stats.agents_busy == 1 and VMDisk.objects.get(job=local_job).bytes_done == 700
        assert len(silent.held) == 1  # no second request piled up behind the first
        assert Agent.objects.get(name=agents.LOCAL).last_error == ""
    finally:
        silent.release()


def _replicating(name: str, agent: str, tmp_path):
    from replication.choices import Stage
    from replication.services.inventory import register_image_vm
    from replication.services.jobs import start_replication

    image = make_image(tmp_path / f"{name}.img", MiB, [(0, 4096)])
    job = start_replication(register_image_vm(name, [str(image)], agent=agent))
    assert job.enter_stage(Stage.INITIALIZING, JobStatus.PREPARING)
    assert job.enter_stage(Stage.TRANSFER, JobStatus.REPLICATING)
    for disk in job.disks.all():
        assert disk.start_attempt("task-x")
    return ReplicationJob.objects.get(pk=job.id)


@pytest.mark.integration
@pytest.mark.django_db
def test_an_api_answering_as_another_agent_is_not_taken_for_it(vma_server, tmp_path, monkeypatch, settings):
    from tests.test_progress_api import post
    from tests.test_progress_poller import update

    monkeypatch.setattr("replication.services.jobs.enqueue_prepare", lambda *args: None)
    monkeypatch.setattr(progress, "_feeds", {})
    token = tmp_path / "b.token"
    token.write_text(settings.VMA_TOKEN)
    # site-b recorded at the session agent's URL, which answers as "local".
    agents.add("site-b", vma_server, str(token), actor="test")
    job = _replicating("vm-b", "site-b", tmp_path)
    post(vma_server, job.id, update(1, 300, disk_id="disk-2000"))

    stats = progress.poll_once()

    assert stats.errors == 1 and VMDisk.objects.get(job=job).bytes_done == 0
    assert "answers as agent 'local', not 'site-b'" in Agent.objects.get(name="site-b").last_error

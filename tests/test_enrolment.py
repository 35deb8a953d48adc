"""Enrolment and isolation of agents, on the real RabbitMQ of this machine
(a vhost of its own, removed at the end, with the users made in it):
pairing codes (expired, reused), rejection, approval giving an agent its
own broker user and message key (fetched by `python -m vma_agent.enrol`
over real HTTP), revocation closing its connections and refusing its
credentials; agent A's user cannot read, declare or delete what is not its
own, while a real Celery worker as A consumes vma.A and signs its outcome;
an outcome for B's disk sent with A's identity is refused and recorded,
nothing changed."""

from __future__ import annotations

import hashlib
import io
import os
import re
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import amqp.exceptions
import pytest
import requests
from celery import Celery
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone
from kombu import Connection, Consumer, Exchange, Queue

from replication import tasks
from replication.choices import AgentState, DiskStatus, JobStatus, VMState
from replication.models import Agent, AgentAuditEntry, ChangeIdRecord, CopyAttempt, PairingCode
from replication.services import enrolment
from tests.helpers import (
    PROJECT_ROOT,
    free_port,
    make_image,
    start_worker,
    stop_site,
    stop_worker,
    wait_until,
    worker_env,
)
from vma_agent import identity, task_names
from vma_agent.enrol import agent_key, write_credentials

pytestmark = pytest.mark.integration
MiB = 1024 * 1024
RABBITMQCTL = ["rabbitmqctl", "-q"]


def rabbitmqctl(*args: str) -> str:
    done = subprocess.run([*RABBITMQCTL, *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"rabbitmqctl {args}: {done.stderr}"
    return done.stdout


def broker_users() -> set[str]:
    return {line.split("\t")[0] for line in rabbitmqctl("list_users", "--no-table-headers").splitlines()}


@pytest.fixture
def rabbit(settings):
    """A vhost of this test's own on the real RabbitMQ (the OMA's user,
    guest, may do everything there); agents' users made in it are deleted
    with it."""
    vhost = f"oma-test-enrol-{os.getpid()}-{time.monotonic_ns() % 10**6}"
    rabbitmqctl("add_vhost", vhost)
    settings.AGENT_BROKER_URL = f"amqp://127.0.0.1:5672/{vhost}"
    oma_url = f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
    try:
        rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        with Connection(oma_url) as conn:  # the OMA's queue, as its worker declares it
            oma_queue()(conn.default_channel).declare()
        yield oma_url
    finally:  # only this vhost's agents: another run's, on the same RabbitMQ, are its own
        for line in rabbitmqctl("list_permissions", "-p", vhost, "--no-table-headers").splitlines():
            user = line.split("\t")[0]
            if user.startswith("vma-enr-"):
                subprocess.run([*RABBITMQCTL, "delete_user", user], capture_output=True, timeout=60)
        rabbitmqctl("delete_vhost", vhost)


def broker_vhost_of(url: str) -> str:
    return url.rsplit("/", 1)[1]


def oma_queue() -> Queue:
    return Queue(task_names.OMA_QUEUE, Exchange(task_names.OMA_QUEUE), task_names.OMA_QUEUE)


def public_key(tmp_path: Path, name: str) -> str:
    return agent_key(tmp_path / f"state-{name}", name)


def enrol_over_http(client, code: str, name: str, key: str):
    return client.post("/api/agents/enrol/", {"code": code, "name": name, "public_key": key, "version": "1"},
                       content_type="application/json")


def approved(client, tmp_path, name: str) -> dict:
    """Agent `name` enrolled, approved, its credentials fetched and written as the agent host does."""
    code = enrolment.new_pairing_code("os:test")
    assert enrol_over_http(client, code, name, public_key(tmp_path, name)).status_code == 201
    call_command("agent", "approve", name)
    response = client.get(f"/api/agents/enrol/{name}/", HTTP_AUTHORIZATION=f"Pairing {code}")
    assert response.status_code == 200, response.json()
    creds = response.json()
    env = write_credentials(tmp_path / f"state-{name}", creds, "http://127.0.0.1")
    return {**creds, "env_file": env, "key_file": tmp_path / f"state-{name}" / "message_key"}


def refused(action, *args) -> str:
    with pytest.raises(amqp.exceptions.AccessRefused) as caught:
        action(*args)
    return str(caught.value)


# Pairing codes ----------------------------------------------------------------------

@pytest.mark.django_db
def test_an_expired_code_is_refused_and_makes_no_agent(client, tmp_path):
    code = enrolment.new_pairing_code("os:test", minutes=15)
    PairingCode.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
    response = enrol_over_http(client, code, "enr-late", public_key(tmp_path, "late"))
    assert response.status_code == 410 and response.json() == {"error": "pairing code expired"}
    assert not Agent.objects.filter(name="enr-late").exists()
    entry = AgentAuditEntry.objects.get(action="enrol-refused")
    assert (entry.agent_name, entry.source, entry.detail) == ("enr-late", "127.0.0.1", "pairing code expired")


@pytest.mark.django_db
def test_a_code_enrols_one_agent_only_and_only_its_hash_is_kept(client, tmp_path):
    out = io.StringIO()
    call_command("agent", "pairing-code", "--expires-min", "5", stdout=out)
    code = out.getvalue().strip()
    assert len(code) == 19 and PairingCode.objects.get().code_hash == hashlib.sha256(code.encode()).hexdigest()
    first = enrol_over_http(client, code, "enr-one", public_key(tmp_path, "one"))
    assert first.status_code == 201 and first.json()["state"] == "pending"
    again = enrol_over_http(client, code, "enr-two", public_key(tmp_path, "two"))
    assert again.status_code == 409 and again.json() == {"error": "pairing code already used"}
    assert list(Agent.objects.filter(name__startswith="enr-").values_list("name", "state", "enrolled_from")) == [
        ("enr-one", AgentState.PENDING, "127.0.0.1")]
    assert PairingCode.objects.get().agent.name == "enr-one"


@pytest.mark.django_db
def test_bad_requests_get_their_reason(client, tmp_path):
    key = public_key(tmp_path, "x")
    assert enrol_over_http(client, enrolment.new_pairing_code("t"), "Bad Name!", key).json()["error"].startswith(
        "bad agent name 'Bad Name!'")
    assert enrol_over_http(client, enrolment.new_pairing_code("t"), "enr-x", "ssh-rsa AAAA").status_code == 400
    assert enrol_over_http(client, "NOPE-NOPE-NOPE-NOPE", "enr-x", key).json() == {"error": "unknown pairing code"}
    assert enrol_over_http(client, enrolment.new_pairing_code("t"), "enr-x", key).status_code == 201
    taken = enrol_over_http(client, enrolment.new_pairing_code("t"), "enr-x", key)
    assert taken.status_code == 409 and "taken" in taken.json()["error"]
    assert client.post("/api/agents/enrol/", "[]", content_type="application/json").status_code == 400


@pytest.mark.django_db
def test_enrolment_attempts_are_limited_per_client_address(client, tmp_path, settings):
    settings.ENROL_RATE = "3/h"
    key = public_key(tmp_path, "flood")
    flooder, other = f"192.0.2.{os.getpid() % 250 + 1}", f"198.51.100.{os.getpid() % 250 + 1}"

    def attempt(code, name, address):
        return client.post("/api/agents/enrol/", {"code": code, "name": name, "public_key": key},
                           content_type="application/json", REMOTE_ADDR=address)

    answers = [attempt("NOPE-NOPE-NOPE-NOPE", f"enr-guess-{i}", flooder).status_code for i in range(3)]
    assert answers == [403, 403, 403]
    code = enrolment.new_pairing_code("os:test")
    for _ in range(2):  # even a good code: this address has used its attempts
        late = attempt(code, "enr-flood", flooder)
        assert late.status_code == 429, late.content
        retry_after = int(late["Retry-After"])
        assert 0 < retry_after <= 3600 and late.json()["retry_after_s"] == retry_after
        assert late.json()["error"].startswith(f"too many enrolment attempts from {flooder}: at most 3/h")
    assert not Agent.objects.filter(name="enr-flood").exists()
    assert PairingCode.objects.get().used_at is None  # the code is still good
    assert attempt(code, "enr-flood", other).status_code == 201  # another address is not held back
    throttled = list(AgentAuditEntry.objects.filter(action="enrol-throttled").values_list("source", "detail"))
    assert len(throttled) == 1 and throttled[0][0] == flooder and "more than 3 enrolment attempts" in throttled[0][1]
    assert AgentAuditEntry.objects.filter(action="enrol-refused").count() == 3


@pytest.mark.django_db
def test_pairing_code_approve_reject_and_revoke_from_the_agents_page(client, tmp_path, rabbit):
    """The Agents page does what `manage.py agent` does, for administrators
    only, each step asked first and in the admin's log under the user."""
    from django.contrib.admin.models import LogEntry
    from django.test import Client

    from tests.helpers import user_with_role

    admin, operator = Client(), Client()
    admin.force_login(user_with_role("agent-admin", "administrator"))
    operator.force_login(user_with_role("agent-op", "operator"))
    assert operator.post("/agents/pairing-code/").status_code == 403
    page = admin.post("/agents/pairing-code/").content.decode()
    code = re.search(r"data-pairing-code>([^<]+)<", page).group(1)
    assert enrol_over_http(client, code, "enr-page", public_key(tmp_path, "enr-page")).status_code == 201
    assert 'href="/agents/enr-page/enrolment/approve/"' in admin.get("/agents/").content.decode()

    asked = admin.get("/agents/enr-page/enrolment/approve/")
    assert asked.status_code == 200 and "create its own broker user" in asked.content.decode()
    assert operator.post("/agents/enr-page/enrolment/approve/").status_code == 403
    assert Agent.objects.get(name="enr-page").state == AgentState.PENDING
    assert admin.post("/agents/enr-page/enrolment/approve/").status_code == 302
    agent = Agent.objects.get(name="enr-page")
    assert agent.state == AgentState.ACTIVE and agent.broker_user in broker_users()
    # A step the agent's state refuses says why, and changes nothing.
    refused = admin.post("/agents/enr-page/enrolment/reject/")
    assert refused.status_code == 409 and "only a pending agent can be rejected" in refused.content.decode()
    assert Agent.objects.get(name="enr-page").state == AgentState.ACTIVE

    assert admin.post("/agents/enr-page/enrolment/revoke/").status_code == 302
    agent.refresh_from_db()
    assert agent.state == AgentState.REVOKED and agent.broker_user not in broker_users()
    assert [e.change_message for e in LogEntry.objects.filter(object_repr__contains="enr-page").order_by("id")] == [
        "approved agent enr-page: now active", "revoked agent enr-page: now revoked"]
    assert {e.user.username for e in LogEntry.objects.filter(object_repr__contains="enr-page")} == {"agent-admin"}
    assert admin.get("/agents/enr-page/enrolment/nonsense/").status_code == 302


@pytest.mark.django_db
def test_a_rejected_agent_gets_no_credentials(client, tmp_path, rabbit):
    code = enrolment.new_pairing_code("os:test")
    assert enrol_over_http(client, code, "enr-rej", public_key(tmp_path, "rej")).status_code == 201
    waiting = client.get("/api/agents/enrol/enr-rej/", HTTP_AUTHORIZATION=f"Pairing {code}")
    assert waiting.status_code == 202
    call_command("agent", "reject", "enr-rej", "--actor", "alice")
    answer = client.get("/api/agents/enrol/enr-rej/", HTTP_AUTHORIZATION=f"Pairing {code}")
    assert answer.status_code == 403 and answer.json()["state"] == "rejected"
    with pytest.raises(CommandError, match="only a pending agent can be approved"):
        call_command("agent", "approve", "enr-rej")
    assert enrolment.broker_user_of("enr-rej") not in broker_users()
    assert [(e.action, e.actor) for e in AgentAuditEntry.objects.filter(agent__name="enr-rej").order_by("at", "id")
            ] == [("enrolled", "enr-rej"), ("rejected", f"{enrolment_actor()} for alice")]


def enrolment_actor() -> str:
    from replication.roles import os_actor

    return os_actor()


# Enrolment end to end, over HTTP, with the agent host's command ------------------------------

@pytest.mark.django_db(transaction=True)
def test_the_agent_host_enrols_waits_for_approval_and_gets_its_own_credentials(live_server, tmp_path, rabbit):
    code = enrolment.new_pairing_code("os:test")
    state = tmp_path / "agent-state"
    proc = subprocess.Popen([sys.executable, "-m", "vma_agent.enrol", "--oma", live_server.url, "--code", code,
                             "--name", "enr-site", "--state-dir", str(state), "--poll-s", "0.2", "--wait-s", "120"],
                            cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: Agent.objects.filter(name="enr-site").exists(), 60, "the agent's enrolment")
        agent = Agent.objects.get(name="enr-site")
        assert agent.state == AgentState.PENDING and agent.public_key == (state / "id_ed25519.pub").read_text().strip()
        assert (state / "id_ed25519").stat().st_mode & 0o777 == 0o600
        call_command("agent", "approve", "enr-site")
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    env = dict(line.split("=", 1) for line in (state / "agent.env").read_text().splitlines())
    assert (state / "agent.env").stat().st_mode & 0o777 == 0o600
    assert (state / "message_key").stat().st_mode & 0o777 == 0o600
    assert env["VMA_AGENT_NAME"] == "enr-site" and env["CELERY_BROKER_URL"].startswith(f"amqp://{enrolment.broker_user_of('enr-site')}:")
    agent.refresh_from_db()
    assert (state / "message_key").read_text().strip() == Path(agent.message_key_file).read_text().strip()
    assert agent.broker_user == enrolment.broker_user_of("enr-site") and agent.state == AgentState.ACTIVE
    with Connection(env["CELERY_BROKER_URL"]) as conn:  # its own credentials work, for its own queue
        Queue("vma.enr-site", Exchange("vma.enr-site"), "vma.enr-site")(conn.default_channel).declare()
    again = subprocess.run([sys.executable, "-m", "vma_agent.enrol", "--oma", live_server.url, "--code", code,
                            "--name", "enr-site", "--state-dir", str(state), "--resume"], cwd=PROJECT_ROOT,
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "credentials already fetched" in again.stderr
    actions = list(AgentAuditEntry.objects.filter(agent=agent).order_by("at", "id").values_list("action", "source"))
    assert actions == [("enrolled", "127.0.0.1"), ("tunnel-authorized", ""), ("approved", ""),
                       ("credentials-fetched", "127.0.0.1")]


# Revocation --------------------------------------------------------------------------

@pytest.mark.django_db
def test_revoking_closes_the_agents_connections_and_refuses_its_credentials(client, tmp_path, rabbit):
    creds = approved(client, tmp_path, "enr-rev")
    conn = Connection(creds["broker_url"])
    conn.connect()
    Queue("vma.enr-rev", Exchange("vma.enr-rev"), "vma.enr-rev")(conn.default_channel).declare()
    call_command("agent", "revoke", "enr-rev")

    def closed() -> bool:
        try:
            conn.drain_events(timeout=0.2)
        except TimeoutError:
            return False
        except (amqp.exceptions.ConnectionForced, OSError, amqp.exceptions.RecoverableConnectionError):
            return True
        return False

    wait_until(closed, 30, "the revoked agent's open connection to be closed")
    conn.release()
    assert "ACCESS_REFUSED" in refused(Connection(creds["broker_url"]).connect)
    agent = Agent.objects.get(name="enr-rev")
    assert agent.state == AgentState.REVOKED and agent.revoked_at is not None
    assert AgentAuditEntry.objects.filter(agent=agent, action="revoked", detail__contains="1 connection").exists()


@pytest.mark.django_db
def test_a_broker_password_that_starts_with_a_dash_is_not_taken_for_an_option(client, tmp_path, rabbit,
                                                                              monkeypatch):
    """token_urlsafe starts one password in 64 with "-"; rabbitmqctl took it
    for an option and the approval failed (seen in CI)."""
    real = enrolment.secrets.token_urlsafe
    monkeypatch.setattr(enrolment.secrets, "token_urlsafe", lambda n=32: "-" + real(n))
    creds = approved(client, tmp_path, "enr-dash")
    assert creds["broker_url"].split(":")[2].startswith("-")  # amqp://user:-password@...
    with Connection(creds["broker_url"]) as conn:
        conn.connect()
        assert conn.connected


# Isolation -------------------------------------------------------------------------------

@pytest.mark.django_db
def test_agent_a_cannot_consume_declare_or_delete_what_is_not_its_own(client, tmp_path, rabbit):
    a = approved(client, tmp_path, "enr-a")
    approved(client, tmp_path, "enr-b")
    with Connection(rabbit) as oma:  # B's queue, with an order waiting in it
        queue_b = Queue("vma.enr-b", Exchange("vma.enr-b"), "vma.enr-b")
        queue_b(oma.default_channel).declare()
        oma.Producer().publish({"order": "for B"}, exchange="vma.enr-b", routing_key="vma.enr-b")
    with Connection(a["broker_url"]) as conn:
        reason = refused(lambda: Consumer(conn.channel(), [Queue("vma.enr-b", no_declare=True)]).consume())
        assert "access to queue 'vma.enr-b'" in reason
    with Connection(a["broker_url"]) as conn:
        assert "access to queue 'vma.enr-b'" in refused(lambda: conn.channel().basic_get("vma.enr-b"))
    with Connection(a["broker_url"]) as conn:
        assert "access to queue 'oma'" in refused(lambda: conn.channel().queue_delete("oma"))
    with Connection(a["broker_url"]) as conn:  # nor bind a queue of its own to B's exchange
        channel = conn.channel()
        Queue("vma.enr-a", Exchange("vma.enr-a"), "vma.enr-a")(channel).declare()
        assert "access to exchange 'vma.enr-b'" in refused(
            lambda: channel.queue_bind("vma.enr-a", "vma.enr-b", "vma.enr-b"))
    with Connection(a["broker_url"]) as conn:  # nor queue an order into B's queue (the default exchange)
        channel = conn.channel()
        conn.Producer(channel).publish({"order": "forged by A"}, exchange="", routing_key="vma.enr-b")
        assert "access to exchange 'amq.default'" in refused(lambda: channel.basic_qos(0, 1, False))
    with Connection(rabbit) as oma:
        assert_only_bs_order(oma, queue_b)


def assert_only_bs_order(oma, queue_b) -> None:
    """B's order is still in its queue, untouched, alone (read with the OMA's connection)."""
    inbox = oma.SimpleQueue(queue_b)
    message = inbox.get(timeout=5)
    assert message.payload == {"order": "for B"}
    message.ack()
    assert inbox.qsize() == 0


@pytest.mark.django_db
def test_agent_a_gets_nothing_of_celerys_remote_control(client, tmp_path, rabbit):
    """Remote control (celery.pidbox) is a fanout to every worker, with a
    queue and replies per node: none of it is open to an agent's user, so A
    can neither read B's control commands nor answer as B."""
    a = approved(client, tmp_path, "enr-a")
    approved(client, tmp_path, "enr-b")
    pidbox_of_b = "enr-b@site-b.celery.pidbox"
    with Connection(rabbit) as oma:  # B's pidbox as a worker with remote control would declare it, a command in it
        queue = Queue(pidbox_of_b, Exchange("celery.pidbox", "fanout", durable=False), auto_delete=False)
        queue(oma.default_channel).declare()
        Exchange("reply.celery.pidbox", "direct", durable=False)(oma.default_channel).declare()
        oma.Producer().publish({"method": "ping"}, exchange="celery.pidbox", routing_key="")
    with Connection(a["broker_url"]) as conn:
        assert f"access to queue '{pidbox_of_b}'" in refused(lambda: conn.channel().basic_get(pidbox_of_b))
    with Connection(a["broker_url"]) as conn:
        assert f"access to queue '{pidbox_of_b}'" in refused(lambda: conn.channel().queue_delete(pidbox_of_b))
    with Connection(a["broker_url"]) as conn:  # nor a pidbox queue of its own on the broadcast exchange
        assert "access to queue 'enr-a@x.celery.pidbox'" in refused(
            lambda: conn.channel().queue_declare("enr-a@x.celery.pidbox", auto_delete=True))
    with Connection(a["broker_url"]) as conn:  # nor its own queue bound to it (every broadcast, every agent's)
        channel = conn.channel()
        Queue("vma.enr-a", Exchange("vma.enr-a"), "vma.enr-a")(channel).declare()
        assert "access to exchange 'celery.pidbox'" in refused(
            lambda: channel.queue_bind("vma.enr-a", "celery.pidbox", ""))
    with Connection(a["broker_url"]) as conn:  # nor answer on the reply exchange, as B or anyone
        channel = conn.channel()
        conn.Producer(channel).publish({"enr-b@site-b": {"ok": "pong"}}, exchange="reply.celery.pidbox",
                                       routing_key="any-ticket")
        assert "access to exchange 'reply.celery.pidbox'" in refused(lambda: channel.basic_qos(0, 1, False))
    with Connection(rabbit) as oma:  # B's command is still there, untouched
        message = oma.SimpleQueue(queue).get(timeout=5)
        assert message.payload == {"method": "ping"}
        message.ack()


@pytest.mark.django_db
def test_a_celery_worker_as_agent_a_consumes_its_queue_and_signs_its_outcome(client, tmp_path, rabbit):
    a = approved(client, tmp_path, "enr-a")
    worker = start_worker("agent", "enr-a", concurrency=1, extra_env={
        "TEST_CELERY_BROKER_URL": a["broker_url"], "VMA_AGENT_NAME": "enr-a",
        "VMA_MESSAGE_KEY_FILE": str(a["key_file"])})
    try:
        order = {"failover_id": 7, "action": "power_on", "vm_name": "vm-a", "vm_moref": "vm-1",
                 "vcenter": {"name": "vc", "host": "127.0.0.1", "port": free_port(), "username": "u",
                             "thumbprint": "", "password_env": "ENR_NO_SUCH_PASSWORD"}}
        # Not the current app: the rest of the session publishes through its own.
        oma_app = Celery("oma-test", broker=rabbit, set_as_current=False)
        try:
            oma_app.send_task(task_names.POWER_SOURCE, args=[order], queue="vma.enr-a")
        finally:
            oma_app.close()
        with Connection(rabbit) as oma:
            inbox = oma.SimpleQueue(oma_queue())
            deadline = time.monotonic() + 120
            message = None
            while message is None and time.monotonic() < deadline:
                try:
                    message = inbox.get(timeout=1)
                except inbox.Empty:
                    assert worker.poll() is None, worker.log_path.read_text()[-3000:]
            assert message is not None, f"no outcome: {worker.log_path.read_text()[-3000:]}"
            message.ack()
    finally:
        stop_worker(worker)
    assert message.headers["task"] == task_names.SOURCE_POWERED
    args, kwargs, _ = message.decode()
    assert args[:2] == [7, "power_on"] and "ENR_NO_SUCH_PASSWORD" in args[2]["error"]
    assert kwargs["identity"]["agent"] == "enr-a"
    queues = rabbitmqctl("list_queues", "-p", broker_vhost_of(rabbit), "name", "--no-table-headers").split()
    assert sorted(queues) == ["oma", "vma.enr-a"]  # no pidbox: its worker runs without remote control
    assert enrolment.accepts(task_names.SOURCE_POWERED, args, kwargs["identity"], "enr-a")
    assert not enrolment.accepts(task_names.SOURCE_POWERED, args, kwargs["identity"], "enr-b")


@pytest.mark.django_db
def test_a_celery_worker_as_agent_a_cannot_consume_bs_queue(client, tmp_path, rabbit):
    a = approved(client, tmp_path, "enr-a")
    approved(client, tmp_path, "enr-b")
    log_path = tmp_path / "worker-a-on-b.log"
    env = {**worker_env(), "PROCESS_ROLE": "agent", "TEST_CELERY_BROKER_URL": a["broker_url"],
           "VMA_AGENT_NAME": "enr-a", "VMA_MESSAGE_KEY_FILE": str(a["key_file"])}
    env.pop("DATABASE_URL", None)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", "oma_site", "worker", "-Q", "vma.enr-b", "-c",
                                 "1", "--without-gossip", "--without-mingle", "-n", f"enr-a-on-b-{os.getpid()}@%h"],
                                cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        code = proc.wait(timeout=120)
    finally:
        proc.kill()
    text = log_path.read_text()
    assert code != 0, f"the worker ran with A's credentials on B's queue:\n{text[-3000:]}"
    refused = f"refused for user '{enrolment.broker_user_of('enr-a')}'"
    assert "ACCESS_REFUSED" in text and "vma.enr-b" in text and refused in text, text[-3000:]


@pytest.fixture
def copying_disk_of_b(client, tmp_path, rabbit, monkeypatch):
    """B's VM with a job copying its one disk (run 1)."""
    from replication.services import jobs
    from replication.services.inventory import register_image_vm

    monkeypatch.setattr("replication.services.jobs.enqueue_prepare", lambda *args: None)
    a, b = approved(client, tmp_path, "enr-a"), approved(client, tmp_path, "enr-b")
    vm = register_image_vm("vm-of-b", [str(make_image(tmp_path / "b.img", MiB, [(0, 4096)]))], agent="enr-b")
    job = jobs.start_replication(vm)
    assert job.enter_stage("Initializing", JobStatus.PREPARING) and job.enter_stage("Transfer", JobStatus.REPLICATING)
    disk = job.disks.get()
    assert disk.start_attempt("b-worker")
    return a, b, job, disk


def completed_args(job, disk) -> list:
    outcome = {"status": "completed", "worker": "w", "bytes_total": MiB, "bytes_zeroed": 0, "throughput_bps": 1}
    return [str(job.pk), disk.disk_key, 1, outcome]


@pytest.mark.django_db
def test_an_outcome_for_bs_disk_sent_with_as_identity_is_refused_and_recorded(copying_disk_of_b):
    a, b, job, disk = copying_disk_of_b
    args = completed_args(job, disk)
    as_a = identity.sign(a["key_file"].read_bytes().strip(), "enr-a", task_names.DISK_COPIED, args)
    tasks.disk_copied(*args, identity=as_a)
    forged = identity.sign(a["key_file"].read_bytes().strip(), "enr-b", task_names.DISK_COPIED, args)
    tasks.disk_copied(*args, identity=forged)  # B's name, A's key
    tasks.disk_copied(*args)  # unsigned, for an agent that signs
    disk.refresh_from_db()
    assert disk.status == DiskStatus.COPYING and disk.bytes_total != MiB
    refusals = list(AgentAuditEntry.objects.filter(action="message-refused").order_by("id").values_list(
        "agent_name", "detail"))
    assert [name for name, _ in refusals] == ["enr-a", "enr-b", "enr-b"]
    assert "sent as agent 'enr-a', but the VM's agent is 'enr-b'" in refusals[0][1]
    assert "signature of agent enr-b does not match" in refusals[1][1]
    assert "unsigned, but agent enr-b signs its messages" in refusals[2][1]
    as_b = identity.sign(b["key_file"].read_bytes().strip(), "enr-b", task_names.DISK_COPIED, args)
    tasks.disk_copied(*args, identity=as_b)  # B itself: accepted
    disk.refresh_from_db()
    assert disk.status == DiskStatus.COMPLETED


@pytest.mark.django_db
def test_a_revoked_agents_signed_outcome_is_refused(copying_disk_of_b):
    _, b, job, disk = copying_disk_of_b
    args = completed_args(job, disk)
    call_command("agent", "revoke", "enr-b")
    job.refresh_from_db()
    assert job.status == JobStatus.FAILED and "agent enr-b revoked" in job.error_message
    disk.refresh_from_db()  # its run closed by the OMA, not left for the revoked agent's word
    assert disk.status == DiskStatus.FAILED and "agent enr-b revoked" in disk.error_message
    run = CopyAttempt.objects.get(disk=disk)
    assert run.outcome == CopyAttempt.Outcome.CANCELLED and "agent enr-b revoked" in run.reason
    tasks.disk_copied(*args, identity=identity.sign(b["key_file"].read_bytes().strip(), "enr-b",
                                                    task_names.DISK_COPIED, args))
    disk.refresh_from_db()
    assert disk.status == DiskStatus.FAILED and disk.bytes_total != MiB
    assert AgentAuditEntry.objects.filter(action="message-refused", detail__contains="is revoked").exists()


@pytest.mark.django_db
def test_the_reaper_ends_what_a_revoked_agent_still_holds(copying_disk_of_b):
    """A cycle that raced the revocation (or one a revocation cut short
    left): the reaper's next pass ends it on the OMA's word, whatever its
    heartbeat says."""
    from replication.services import reaper

    _, _, job, disk = copying_disk_of_b
    Agent.objects.filter(name="enr-b").update(state=AgentState.REVOKED, revoked_at=timezone.now())
    result = reaper.reap()
    assert result.agents_revoked == ["enr-b"]
    job.refresh_from_db()
    disk.refresh_from_db()
    assert job.status == JobStatus.FAILED and job.error_message.startswith("agent enr-b revoked at ")
    assert disk.status == DiskStatus.FAILED and "its work is not trusted" in disk.error_message
    assert CopyAttempt.objects.get(disk=disk).outcome == CopyAttempt.Outcome.CANCELLED
    entry = AgentAuditEntry.objects.get(action="work-ended")
    assert (entry.agent_name, entry.actor, entry.detail) == (
        "enr-b", "reaper", "1 job(s) failed, 1 copy run(s) closed, 0 failover(s) answered")
    assert reaper.reap().agents_revoked == []  # once


@pytest.mark.django_db
def test_the_embedded_agent_without_a_key_keeps_working_unsigned(tmp_path, monkeypatch):
    assert enrolment.accepts(task_names.DISK_COPIED, ["j", "d", 1, {}], None, "local")
    assert not AgentAuditEntry.objects.exists()


# Revoked mid-copy ------------------------------------------------------------------------

@pytest.mark.django_db(transaction=True)
def test_an_agent_revoked_mid_copy_stops_and_leaves_the_replica_as_it_was(client, tmp_path, sockdir, rabbit,
                                                                         settings, monkeypatch):
    """An enrolled agent as on its own host (its API, its worker on RabbitMQ
    with its own credentials) copies a VM's disk from a slow nbdkit; the
    OMA's worker and this process's steps go through the same RabbitMQ.
    Revoked mid-copy of its second cycle: the job fails at once naming the
    revocation, the OMA closes the run itself (the agent's own word is
    refused), the copy stops, the first cycle's point is intact and no point
    comes of the partial copy, and the agent's credentials are refused."""
    from replication import dispatch
    from replication.models import RecoveryPoint, ReplicationJob, VirtualMachine, VMContext, VMDisk
    from replication.services.inventory import register_image_vm
    from replication.services.jobs import start_replication
    from tests.helpers import Judge, replica_sha256, sha256, slow_nbd_source, start_agent_api, wait_for_job

    NAME = f"enr-cp{os.getpid() % 10000}"  # noqa: N806 - broker users are per server: unique to this run
    a = approved(client, tmp_path, NAME)
    token_file = tmp_path / "enr-cp.token"
    token_file.write_text("token-of-enr-cp")
    api_url = f"http://127.0.0.1:{free_port()}"
    agent_env = {"VMA_AGENT_NAME": NAME, "VMA_URL": api_url, "VMA_TOKEN": "token-of-enr-cp",
                 "VMA_PROGRESS_PREFIX": f"vma:progress:enr-cp-{os.getpid()}"}
    Agent.objects.filter(name=NAME).update(api_url=api_url, token_file=str(token_file))
    oma_app = Celery("oma-test-rabbit", broker=rabbit, set_as_current=False)
    monkeypatch.setattr(dispatch, "publish", lambda task_name, args=(), *, queue=task_names.OMA_QUEUE, **options:
                        oma_app.send_task(task_name, args=list(args), queue=queue, **options))
    image = make_image(tmp_path / "cp.img", 24 * MiB, [(0, 24 * MiB)], seed=11)
    source = slow_nbd_source(sockdir, image, "250ms")  # 1 MiB requests, one at a time: ~6 s a cycle
    redis_env = {"TEST_VMA_REDIS_URL": settings.VMA_REDIS_URL}
    api = oma_worker = agent_worker = judge = None
    try:
        api = start_agent_api(NAME, agent_env)
        oma_worker = start_worker("oma", "oma-on-rabbit", extra_env={"TEST_CELERY_BROKER_URL": rabbit, **redis_env})
        agent_worker = start_worker("agent", NAME, extra_env={
            **agent_env, **redis_env, "TEST_CELERY_BROKER_URL": a["broker_url"],
            "VMA_MESSAGE_KEY_FILE": str(a["key_file"])})
        judge = Judge()
        vm = register_image_vm("vm-cp", [source.uri], agent=NAME)
        first = wait_for_job(start_replication(vm).id, timeout=120)
        assert first.status == JobStatus.COMPLETED, first.error_message
        point_disk = first.disks.get()
        v1 = sha256(image)
        assert replica_sha256(point_disk) == v1

        make_image(image, 24 * MiB, [(0, 24 * MiB)], seed=12)  # the source changes before the second cycle
        job = start_replication(VirtualMachine.objects.get(pk=vm.pk))
        wait_until(lambda: VMDisk.objects.filter(job=job, status=DiskStatus.COPYING, bytes_done__gt=MiB).exists(),
                   60, "the second cycle's copy under way, its progress read from the agent's API")
        call_command("agent", "revoke", NAME, "--actor", "alice")

        # The OMA ended it on its own word, at once: nothing waits for the revoked agent.
        job = ReplicationJob.objects.get(pk=job.pk)
        assert job.status == JobStatus.FAILED and f"agent {NAME} revoked" in job.error_message, job.error_message
        disk = job.disks.get()
        assert disk.status == DiskStatus.FAILED and f"agent {NAME} revoked" in disk.error_message
        run = CopyAttempt.objects.get(disk=disk)
        assert run.outcome == CopyAttempt.Outcome.CANCELLED and f"agent {NAME} revoked" in run.reason

        # The copy stops (asked through the agent's API, its target layer fenced), short of the end.
        def copy_stopped() -> dict | None:
            answer = requests.get(f"{api_url}/api/v1/progress/{job.id}", timeout=5,
                                  headers={"Authorization": "Bearer token-of-enr-cp"})
            assert answer.status_code == 200, answer.text
            record = (answer.json().get("disks") or {}).get(disk.disk_key) or {}
            return record if record.get("status") in ("cancelled", "failed") else None

        stopped = wait_until(copy_stopped, 60, "the revoked agent's copy to stop")
        assert stopped["bytes_transferred"] < 24 * MiB, stopped

        # What the target held is intact: the first cycle's point, and no point or changeId from the partial copy.
        assert list(RecoveryPoint.objects.filter(vm=vm).values_list("job_id", flat=True)) == [first.id]
        assert replica_sha256(point_disk) == v1
        assert not ChangeIdRecord.objects.filter(job=job).exists()
        assert not [p for p in settings.OMA_VOLUME_DIR.rglob("*") if job.id in p.name]  # its layer thrown away
        assert VMContext.of(VirtualMachine.objects.get(pk=vm.pk)).state == VMState.READY_FOR_FAILOVER

        # Its credentials are refused (its worker, cut off, gives up), and its late word could not change anything.
        assert "ACCESS_REFUSED" in refused(Connection(a["broker_url"]).connect)
        wait_until(lambda: agent_worker.poll() is not None, 60, "the revoked agent's worker to give up")
        assert "ACCESS_REFUSED" in agent_worker.log_path.read_text()
        with pytest.raises(CommandError, match="already revoked"):
            call_command("agent", "revoke", NAME)
        disk.refresh_from_db()
        assert disk.status == DiskStatus.FAILED and CopyAttempt.objects.get(disk=disk).outcome == "cancelled"
        # Ended by the revocation, or by the reaper's pass over revoked agents if it came first: once, and audited.
        details = " ".join(AgentAuditEntry.objects.filter(agent__name=NAME, action__in=["revoked", "work-ended"])
                           .values_list("detail", flat=True))
        assert [sum(int(n) for n in re.findall(rf"(\d+) {what}", details)) for what in ("job", "copy run")] == [1, 1]
    finally:
        stop_site(judge, (agent_worker, oma_worker), api)
        source.stop()
        oma_app.close()


def test_the_same_agent_name_in_two_vhosts_gets_two_users_and_revoking_one_leaves_the_other(rabbit, settings):
    """Two OMAs on one RabbitMQ (vhosts of their own) that reuse an agent name."""
    vhost_a = broker_vhost_of(settings.AGENT_BROKER_URL)
    vhost_b = f"{vhost_a}-b"
    try:
        user_a = enrolment._add_broker_user("enr-twin", "pw-a")
        settings.AGENT_BROKER_URL = f"amqp://127.0.0.1:5672/{vhost_b}"
        user_b = enrolment._add_broker_user("enr-twin", "pw-b")
        assert user_a != user_b and {user_a, user_b} <= broker_users()
        enrolment._delete_broker_user(user_b)
        assert user_b not in broker_users()
        with Connection(f"amqp://{user_a}:pw-a@127.0.0.1:5672/{vhost_a}") as conn:
            conn.connect()  # A's agent still gets in with its own password
            assert conn.connected
    finally:
        subprocess.run([*RABBITMQCTL, "delete_user", enrolment.broker_user_of("enr-twin", vhost_b)],
                       capture_output=True, timeout=60)
        subprocess.run([*RABBITMQCTL, "delete_vhost", vhost_b], capture_output=True, timeout=60)

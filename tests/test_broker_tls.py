"""Agents' broker link over TLS (AGENT_BROKER_URL amqps://), on a REAL
RabbitMQ node of this module's own that speaks only TLS (tests/rabbit_node:
the machine's RabbitMQ is left as it is): approval hands the agent an amqps
URL to the broker's own address (no broker forward in its tunnel) and the CA
that signed the broker's certificate; `python -m vma_agent.enrol` writes it
beside agent.env, and a real Celery worker started from that consumes its
own queue over TLS. A client checking against another CA, or the system's,
or naming another host than the certificate's, is refused by the
certificate check; plain AMQP to the TLS port gets nowhere; agent A still
cannot read B's queue. No readable CA: no approval, and the reason."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import quote

import pytest
from celery import Celery
from django.core.management import call_command
from django.core.management.base import CommandError
from kombu import Connection, Exchange, Queue

from replication.choices import AgentState
from replication.models import Agent, AgentAuditEntry
from replication.services import enrolment, tunnels
from tests.helpers import PROJECT_ROOT, free_port, start_worker, stop_worker, wait_until
from tests.rabbit_node import NodeError, TlsRabbitNode
from tests.test_enrolment import approved, assert_only_bs_order, enrol_over_http, oma_queue, public_key, refused
from vma_agent import broker_tls, task_names
from vma_agent.run import read_env

pytestmark = pytest.mark.integration
EXPORT = "127.0.0.1:10809"


@pytest.fixture(scope="module")
def tls_node(tmp_path_factory):
    """The private TLS-only RabbitMQ node, for this module; stopped (and
    killed) at its end. Missing rabbitmq-server or openssl fails the tests,
    never skips them."""
    node = TlsRabbitNode(tmp_path_factory.mktemp("rabbit-tls"))
    try:
        node.start()
    except NodeError as exc:
        node.stop()
        pytest.fail(f"the private TLS RabbitMQ node did not start: {exc}")
    yield node
    node.stop()


def tls_connection(url: str, ca_file: Path | str) -> Connection:
    """A connection as an agent's worker opens it: broker_use_ssl from vma_agent.broker_tls."""
    return Connection(url, ssl=broker_tls.use_ssl(url, str(ca_file)), connect_timeout=10)


@pytest.fixture
def tls_broker(settings, tls_node):
    """The OMA configured for agents on the TLS node: AGENT_BROKER_URL amqps
    to a vhost of this test's own, its CA, rabbitmqctl for that node, and an
    NBD export port (whose forward the tunnel keeps)."""
    vhost = f"oma-tls-{os.getpid()}-{time.monotonic_ns() % 10**9}"
    tls_node.rabbitmqctl("add_vhost", vhost)
    tls_node.rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    settings.AGENT_BROKER_URL = f"amqps://127.0.0.1:{tls_node.port}/{vhost}"
    settings.AGENT_BROKER_CA_FILE = str(tls_node.ca_file)
    settings.RABBITMQCTL = tls_node.ctl
    settings.OMA_EXPORT_LISTEN = EXPORT
    settings.AGENT_TUNNEL_PERMIT_OPEN = []
    oma_url = f"amqps://guest:guest@127.0.0.1:{tls_node.port}/{vhost}"
    with tls_connection(oma_url, tls_node.ca_file) as conn:  # the OMA's queue, as its worker declares it
        oma_queue()(conn.default_channel).declare()
    return SimpleNamespace(node=tls_node, vhost=vhost, oma_url=oma_url)


def connections(node: TlsRabbitNode) -> list[list[str]]:
    return [line.split("\t") for line in node.rabbitmqctl("list_connections", "user", "ssl", "vhost",
                                                          "--no-table-headers").splitlines()]


@pytest.mark.django_db(transaction=True)
def test_an_agent_enrolled_for_a_tls_broker_consumes_its_queue_over_tls(live_server, tmp_path, tls_broker):
    node, name = tls_broker.node, "tls-site"
    code = enrolment.new_pairing_code("os:test")
    state = tmp_path / "agent-state"
    proc = subprocess.Popen([sys.executable, "-m", "vma_agent.enrol", "--oma", live_server.url, "--code", code,
                             "--name", name, "--state-dir", str(state), "--poll-s", "0.2", "--wait-s", "120"],
                            cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: Agent.objects.filter(name=name).exists(), 60, "the agent's enrolment")
        call_command("agent", "approve", name)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err

    # Its broker URL is amqps to the broker's own address, with its own user; the CA beside it, 0600.
    env = read_env(state / "agent.env")
    user = enrolment.broker_user_of(name)
    url = env["CELERY_BROKER_URL"]
    assert url.startswith(f"amqps://{quote(user, safe='')}:"), url
    assert url.endswith(f"@127.0.0.1:{node.port}/{tls_broker.vhost}"), url
    ca_file = state / "broker_ca.pem"
    assert env["VMA_BROKER_CA_FILE"] == str(ca_file)
    assert ca_file.read_text() == node.ca_file.read_text() and ca_file.stat().st_mode & 0o777 == 0o600
    # Its tunnel: the API's reverse forward and the export's forward, no broker forward; its key may open only
    # the export through it.
    tunnel = json.loads((state / "tunnel.json").read_text())
    assert tunnel["forward"] == [f"10809:{EXPORT}"]
    assert tunnel["remote_port"] == Agent.objects.get(name=name).tunnel_port
    line = next(line for line in tunnels.authorized_keys_path().read_text().splitlines()
                if line.endswith(f"oma-agent:{name}"))
    assert 'permitopen="127.0.0.1:10809"' in line and line.count("permitopen=") == 1, line

    # A real worker from agent.env consumes its own queue over TLS and sends its signed outcome.
    worker = start_worker("agent", name, concurrency=1, extra_env={
        "TEST_CELERY_BROKER_URL": url, "VMA_BROKER_CA_FILE": env["VMA_BROKER_CA_FILE"],
        "VMA_AGENT_NAME": env["VMA_AGENT_NAME"], "VMA_MESSAGE_KEY_FILE": env["VMA_MESSAGE_KEY_FILE"]})
    try:
        assert [user, "true", tls_broker.vhost] in connections(node)  # its connection is TLS
        order = {"failover_id": 9, "action": "shut_down", "vm_name": "vm-tls", "vm_moref": "vm-9",
                 "vcenter": {"name": "vc", "host": "127.0.0.1", "port": free_port(), "username": "u",
                             "thumbprint": "", "password_env": "TLS_NO_SUCH_PASSWORD"}}
        oma_app = Celery("oma-test-tls", broker=tls_broker.oma_url, set_as_current=False)
        oma_app.conf.broker_use_ssl = broker_tls.use_ssl(tls_broker.oma_url, str(node.ca_file))
        try:
            oma_app.send_task(task_names.POWER_SOURCE, args=[order], queue=f"vma.{name}")
        finally:
            oma_app.close()
        with tls_connection(tls_broker.oma_url, node.ca_file) as oma:
            inbox = oma.SimpleQueue(oma_queue())

            def outcome():
                assert worker.poll() is None, worker.log_path.read_text()[-3000:]
                try:
                    return inbox.get(timeout=1)
                except inbox.Empty:
                    return None

            message = wait_until(outcome, 120, f"the outcome of agent {name}'s worker")
            message.ack()
    finally:
        stop_worker(worker)
    log = worker.log_path.read_text()
    assert f"Connected to amqps://{user}:**@127.0.0.1:{node.port}/{tls_broker.vhost}" in log, log[-3000:]
    assert message.headers["task"] == task_names.SOURCE_POWERED
    args, kwargs, _ = message.decode()
    assert args[:2] == [9, "shut_down"] and "TLS_NO_SUCH_PASSWORD" in args[2]["error"]
    assert enrolment.accepts(task_names.SOURCE_POWERED, args, kwargs["identity"], name)


@pytest.mark.django_db
def test_only_a_client_checking_the_brokers_certificate_against_its_ca_gets_in(client, tmp_path, tls_broker):
    node = tls_broker.node
    creds = approved(client, tmp_path, "tls-ca")
    url, ca_file = creds["broker_url"], tmp_path / "state-tls-ca" / "broker_ca.pem"
    with tls_connection(url, ca_file) as conn:  # the CA it was given: in, as its own user
        Queue("vma.tls-ca", Exchange("vma.tls-ca"), "vma.tls-ca")(conn.default_channel).declare()
        assert [enrolment.broker_user_of("tls-ca"), "true", tls_broker.vhost] in connections(node)
    for other in (node.other_ca_file, ""):  # another CA; the system's CAs
        with pytest.raises(ssl.SSLCertVerificationError, match="self-signed certificate in certificate chain"):
            tls_connection(url, other).connect()
    by_name = url.replace("@127.0.0.1:", "@localhost:")  # the right CA, but not the certificate's name
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        tls_connection(by_name, ca_file).connect()
    plain = "amqp://" + url.removeprefix("amqps://")  # plain AMQP to the TLS port: closed before any login
    with pytest.raises(OSError):
        Connection(plain, connect_timeout=10).connect()
    assert [c for c in connections(node) if c[0] == enrolment.broker_user_of("tls-ca")] == []


@pytest.mark.django_db
def test_over_tls_agent_a_still_cannot_read_bs_queue(client, tmp_path, tls_broker):
    a = approved(client, tmp_path, "tls-a")
    approved(client, tmp_path, "tls-b")
    ca_file = tmp_path / "state-tls-a" / "broker_ca.pem"
    queue_b = Queue("vma.tls-b", Exchange("vma.tls-b"), "vma.tls-b")
    with tls_connection(tls_broker.oma_url, tls_broker.node.ca_file) as oma:  # B's order, waiting
        queue_b(oma.default_channel).declare()
        oma.Producer().publish({"order": "for B"}, exchange="vma.tls-b", routing_key="vma.tls-b")
    with tls_connection(a["broker_url"], ca_file) as conn:
        assert "access to queue 'vma.tls-b'" in refused(lambda: conn.channel().basic_get("vma.tls-b"))
    with tls_connection(tls_broker.oma_url, tls_broker.node.ca_file) as oma:  # B's order untouched, alone
        assert_only_bs_order(oma, queue_b)


@pytest.mark.django_db
def test_no_approval_while_the_tls_brokers_ca_cannot_be_read(client, tmp_path, settings):
    """Checked before any step: no tunnel port, no key line, no broker user
    (no rabbitmqctl runs at all), the agent still pending; the reason on the
    command line and on the Agents page, and in the audit trail."""
    from django.test import Client

    from tests.helpers import user_with_role

    settings.AGENT_BROKER_URL = "amqps://broker.example:5671/oma"
    settings.RABBITMQCTL = ["/bin/false"]  # never reached
    not_pem = tmp_path / "not-a-cert.pem"
    not_pem.write_text("hello\n")
    code = enrolment.new_pairing_code("os:test")
    assert enrol_over_http(client, code, "tls-noca", public_key(tmp_path, "tls-noca")).status_code == 201
    reasons = {"": "AGENT_BROKER_CA_FILE is not set",
               str(tmp_path / "missing.pem"): f"AGENT_BROKER_CA_FILE {tmp_path / 'missing.pem'} cannot be read "
                                              "(No such file or directory)",
               str(not_pem): f"AGENT_BROKER_CA_FILE {not_pem} holds no PEM certificate"}
    for ca_file, reason in reasons.items():
        settings.AGENT_BROKER_CA_FILE = ca_file
        with pytest.raises(CommandError, match=reason.replace("(", r"\(").replace(")", r"\)")):
            call_command("agent", "approve", "tls-noca")
    admin = Client()
    admin.force_login(user_with_role("tls-admin", "administrator"))
    page = admin.post("/agents/tls-noca/enrolment/approve/")
    assert page.status_code == 409 and "holds no PEM certificate" in page.content.decode()
    agent = Agent.objects.get(name="tls-noca")
    assert (agent.state, agent.tunnel_port, agent.broker_user) == (AgentState.PENDING, None, "")
    assert "oma-agent:tls-noca" not in (tunnels.authorized_keys_path().read_text()
                                        if tunnels.authorized_keys_path().exists() else "")
    refusals = AgentAuditEntry.objects.filter(agent=agent, action="approval-refused").values_list("detail", flat=True)
    assert len(refusals) == 4 and all("AGENT_BROKER_CA_FILE" in detail for detail in refusals)
    assert client.get("/api/agents/enrol/tls-noca/", HTTP_AUTHORIZATION=f"Pairing {code}").status_code == 202


@pytest.mark.django_db(transaction=True)
def test_the_agent_host_waits_while_the_ca_cannot_be_read_and_gets_it_then(live_server, tmp_path, tls_broker,
                                                                           settings):
    """The CA went missing between approval and the agent's fetch: the OMA
    answers 503 with the reason and keeps the one-time credentials; the
    agent host says why and keeps asking, and gets them once it is back."""
    code = enrolment.new_pairing_code("os:test")
    state = tmp_path / "late-state"
    assert subprocess.run([sys.executable, "-m", "vma_agent.enrol", "--oma", live_server.url, "--code", code,
                           "--name", "tls-late", "--state-dir", str(state), "--no-wait"], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=60).returncode == 0
    call_command("agent", "approve", "tls-late")
    settings.AGENT_BROKER_CA_FILE = str(tmp_path / "gone.pem")
    err_path = tmp_path / "enrol.err"
    with open(err_path, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "vma_agent.enrol", "--oma", live_server.url, "--code", code,
                                 "--name", "tls-late", "--state-dir", str(state), "--resume", "--poll-s", "0.2",
                                 "--wait-s", "120"], cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_until(lambda: "gone.pem cannot be read" in err_path.read_text(), 60, "the agent host's reason")
        assert proc.poll() is None and not (state / "agent.env").exists()
        settings.AGENT_BROKER_CA_FILE = str(tls_broker.node.ca_file)
        assert proc.wait(60) == 0, err_path.read_text()
    finally:
        proc.kill()
    assert (state / "broker_ca.pem").read_text() == tls_broker.node.ca_file.read_text()
    assert read_env(state / "agent.env")["CELERY_BROKER_URL"].startswith("amqps://")


def test_a_plain_broker_url_gets_no_tls_options_and_amqps_a_required_check():
    assert broker_tls.use_ssl("amqp://u:p@127.0.0.1:5672/oma", "/etc/ca.pem") is False
    assert broker_tls.use_ssl("redis://127.0.0.1:6379/0", "") is False
    assert broker_tls.use_ssl("amqps://u:p@broker.example:5671/oma", "/etc/ca.pem") == {
        "cert_reqs": ssl.CERT_REQUIRED, "server_hostname": "broker.example", "ca_certs": "/etc/ca.pem"}
    from oma_site.celery import app

    assert app.conf.broker_use_ssl is False  # this run's broker is Redis: as before

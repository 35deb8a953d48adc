"""Each enrolled agent's own TLS-PSK identity at the NBD export server
(services.export_keys), with a real nbdkit export server on TCP requiring
TLS and the machine's RabbitMQ for the approvals: approval adds the agent's
line to OMA_EXPORT_TLS_PSK_FILE and hands it the key once; the agent copies
with its own identity (vma_agent.export_tls); one agent's key is no other's;
revocation removes its line and the server refuses its next connection at
once, while the others' keys keep working. An export listening on an
address agents reach directly gets no forward in their tunnels."""

from __future__ import annotations

import os
import secrets

import pytest
from django.core.management import call_command

from replication.models import AgentAuditEntry
from replication.platforms.local.volumes import LocalVolumeProvider
from replication.services import export_keys, tunnels
from tests import test_enrolment
from tests.helpers import MiB, free_port, make_image, sha256
from tests.test_enrolment import approved
from vma_agent.copy import CopyError, copy_image, export_size
from vma_agent.export_tls import own_uri
from vma_agent.nbdkit import serve_file_readonly
from vma_agent.run import read_env

pytestmark = pytest.mark.integration
rabbit = test_enrolment.rabbit  # the machine's RabbitMQ, a vhost of the test's own


@pytest.fixture
def export_server(tmp_path, sockdir, settings):
    """The OMA's export server on TCP with TLS-PSK (the OMA's own line in its PSK file)."""
    psk = tmp_path / "export.psk"
    psk.write_text(f"oma:{secrets.token_hex(32)}\n")
    psk.chmod(0o600)
    listen = f"127.0.0.1:{free_port()}"
    settings.OMA_EXPORT_TLS_PSK_FILE = str(psk)
    settings.OMA_EXPORT_LISTEN = listen
    provider = LocalVolumeProvider(tmp_path / "volumes", sockdir, tls_psk_file=psk, listen=listen)
    provider.ensure_export_server()
    yield provider
    provider.stop_export_server()


def agent_uri(uri: str, state) -> str:
    env = read_env(state / "agent.env")
    return own_uri(uri, env["VMA_EXPORT_PSK_FILE"], env["VMA_EXPORT_TLS_USERNAME"])


@pytest.mark.django_db
def test_an_agent_copies_with_its_own_export_key_until_it_is_revoked(client, tmp_path, rabbit, export_server):
    provider = export_server
    oma_line = provider.tls_psk_file.read_text()
    a = approved(client, tmp_path, "psk-a")
    approved(client, tmp_path, "psk-b")
    state_a, state_b = tmp_path / "state-psk-a", tmp_path / "state-psk-b"

    # Its own line, beside the OMA's and B's; the key handed over once, written 0600 on the agent host.
    key_a = export_keys.key_of("psk-a")
    assert len(key_a) == 64 and a["export_tls"] == {"username": "vma-psk-a", "psk": key_a}
    lines = provider.tls_psk_file.read_text().splitlines()
    assert lines == [oma_line.strip(), f"vma-psk-a:{key_a}", f"vma-psk-b:{export_keys.key_of('psk-b')}"]
    assert provider.tls_psk_file.stat().st_mode & 0o777 == 0o600
    assert (state_a / "export.psk").read_text() == f"vma-psk-a:{key_a}\n"
    assert (state_a / "export.psk").stat().st_mode & 0o777 == 0o600
    env = read_env(state_a / "agent.env")
    assert (env["VMA_EXPORT_PSK_FILE"], env["VMA_EXPORT_TLS_USERNAME"]) == (str(state_a / "export.psk"), "vma-psk-a")

    # The order names the export as the OMA does; the agent presents its own identity, and its copy lands.
    provider.create_volume("migration-vol-psk", 4 * MiB)
    uri = provider.export_uri("migration-vol-psk")
    mine = agent_uri(uri, state_a)
    assert mine.startswith(f"nbds://vma-psk-a@{provider.tcp[0]}:{provider.tcp[1]}/migration-vol-psk?")
    assert str(provider.tls_psk_file) not in mine
    image = make_image(tmp_path / "src.img", 4 * MiB, [(0, MiB), (3 * MiB, 5000)], seed=7)
    with serve_file_readonly(image) as src:
        copy_image(src, mine)
    assert sha256(provider.volume_path("migration-vol-psk")) == sha256(image)

    # A's key is not B's: presented under B's name, refused.
    forged = tmp_path / "forged.psk"
    forged.write_text(f"vma-psk-b:{key_a}\n")
    with pytest.raises(CopyError, match="gnutls_handshake"):
        export_size(own_uri(uri, str(forged), "vma-psk-b"))

    call_command("agent", "revoke", "psk-a")
    assert "vma-psk-a:" not in provider.tls_psk_file.read_text()
    with pytest.raises(CopyError, match="gnutls_handshake"):  # its next connection: refused, no restart
        export_size(mine)
    assert export_size(agent_uri(uri, state_b)) == 4 * MiB  # B keeps its key
    assert export_size(uri) == 4 * MiB  # and the OMA its own
    assert AgentAuditEntry.objects.filter(agent__name="psk-a", action="revoked",
                                          detail__endswith="export key removed").exists()
    assert "export TLS-PSK identity vma-psk-b" in AgentAuditEntry.objects.get(agent__name="psk-b",
                                                                              action="approved").detail


def test_an_export_reached_directly_is_not_forwarded_through_tunnels(settings):
    settings.AGENT_TUNNEL_PERMIT_OPEN = []
    settings.AGENT_BROKER_URL = "amqp://127.0.0.1:5672/oma"
    for listen, forwarded in (("127.0.0.1:10809", True), ("0.0.0.0:10809", True), ("192.0.2.10:10809", False)):
        settings.OMA_EXPORT_LISTEN = listen
        assert (tunnels.export_open() == "127.0.0.1:10809") is forwarded, listen
        assert tunnels.permitted_opens() == ["127.0.0.1:5672"] + (["127.0.0.1:10809"] if forwarded else [])


def test_no_export_key_without_a_psk_file_and_plain_uris_are_left_alone(settings):
    settings.OMA_EXPORT_TLS_PSK_FILE = ""
    assert not export_keys.enabled() and export_keys.key_of("psk-x") == "" and not export_keys.withdraw("psk-x")
    assert own_uri("nbd://127.0.0.1:10809/v", "/s/export.psk", "vma-x") == "nbd://127.0.0.1:10809/v"
    assert own_uri("nbds://oma@h:1/v?tls-psk-file=/k", "", "") == "nbds://oma@h:1/v?tls-psk-file=/k"
    assert own_uri("nbds+unix://oma@/v?socket=/run/t.sock&tls-psk-file=/k", "/s/e.psk", "vma-x") == (
        "nbds+unix://vma-x@/v?socket=/run/t.sock&tls-psk-file=/s/e.psk")


@pytest.mark.django_db(transaction=True)
def test_an_enrolled_agents_cycles_write_the_replica_with_its_own_export_key(client, tmp_path, rabbit, settings,
                                                                            monkeypatch):
    """A whole cycle, as on two hosts (the OMA's worker serving the export on
    TCP with TLS-PSK, the agent's worker and API with the credentials it
    was given), lands the replica; with only its own key withdrawn (the
    OMA's still good), its next copy is refused at the handshake as
    vma-<name>: its copies present its identity, not the order's."""
    from celery import Celery

    from replication import dispatch
    from replication.choices import JobStatus
    from replication.models import Agent, CopyAttempt, VirtualMachine, VMDisk
    from replication.platforms import local_provider
    from replication.services.inventory import register_image_vm
    from replication.services.jobs import start_replication
    from tests.helpers import (
        Judge,
        replica_sha256,
        start_agent_api,
        start_worker,
        stop_site,
        wait_for_job,
        wait_until,
    )
    from vma_agent import task_names

    name = f"psk-cy{os.getpid() % 10000}"  # broker users are per server: unique to this run
    psk = tmp_path / "export.psk"
    psk.write_text(f"oma:{secrets.token_hex(32)}\n")
    psk.chmod(0o600)
    export_env = {"OMA_EXPORT_TLS_PSK_FILE": str(psk), "OMA_EXPORT_LISTEN": f"127.0.0.1:{free_port()}"}
    settings.OMA_EXPORT_TLS_PSK_FILE, settings.OMA_EXPORT_LISTEN = export_env.values()
    a = approved(client, tmp_path, name)
    env = read_env(a["env_file"])
    token_file = tmp_path / "api.token"
    token_file.write_text("token-of-psk-cy")
    api_url = f"http://127.0.0.1:{free_port()}"
    agent_env = {"VMA_AGENT_NAME": name, "VMA_URL": api_url, "VMA_TOKEN": "token-of-psk-cy",
                 "VMA_PROGRESS_PREFIX": f"vma:progress:psk-cy-{os.getpid()}"}
    Agent.objects.filter(name=name).update(api_url=api_url, token_file=str(token_file))
    oma_app = Celery("oma-test-psk", broker=rabbit, set_as_current=False)
    monkeypatch.setattr(dispatch, "publish", lambda task_name, args=(), *, queue=task_names.OMA_QUEUE, **options:
                        oma_app.send_task(task_name, args=list(args), queue=queue, **options))
    redis_env = {"TEST_VMA_REDIS_URL": settings.VMA_REDIS_URL}
    image = make_image(tmp_path / "cy.img", 8 * MiB, [(0, 3 * MiB)], seed=21)
    api = oma_worker = agent_worker = judge = None
    try:
        api = start_agent_api(name, agent_env)
        oma_worker = start_worker("oma", "oma-psk", extra_env={"TEST_CELERY_BROKER_URL": rabbit, **redis_env,
                                                               **export_env})
        agent_worker = start_worker("agent", name, extra_env={
            **agent_env, **redis_env, "TEST_CELERY_BROKER_URL": a["broker_url"],
            **{key: env[key] for key in ("VMA_MESSAGE_KEY_FILE", "VMA_EXPORT_PSK_FILE", "VMA_EXPORT_TLS_USERNAME")}})
        judge = Judge()
        vm = register_image_vm("vm-psk", [str(image)], agent=name)
        first = wait_for_job(start_replication(vm).id, timeout=120)
        assert first.status == JobStatus.COMPLETED, first.error_message
        assert replica_sha256(first.disks.get()) == sha256(image)

        assert export_keys.withdraw(name)
        second = start_replication(VirtualMachine.objects.get(pk=vm.pk))

        def refused_as_itself() -> str:
            reasons = [*VMDisk.objects.filter(job=second).values_list("error_message", flat=True),
                       *CopyAttempt.objects.filter(disk__job=second).values_list("reason", flat=True)]
            return next((r for r in reasons if f"nbds://vma-{name}@" in r and "gnutls_handshake" in r), "")

        wait_until(refused_as_itself, 120, "the second cycle's copy refused at the export as the agent itself")
    finally:
        stop_site(judge, (agent_worker, oma_worker), api)
        oma_app.close()
        local_provider().stop_export_server()  # the TLS one this test's OMA worker started

"""Agents behind a firewall: the outbound tunnel, with a real sshd (the
OMA's own sshd for agents, started by scripts/lib.sh ensure_agent_sshd) and
real ssh (the agent's tunnel keeper, python -m vma_agent.tunnel). Both ends
are on this host: the agent's API listens on 127.0.0.1 only, and the OMA
reads it at its tunnel port, which only the agent's reverse forward opens."""

import base64
import contextlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest
import requests
from django.conf import settings

from replication.models import Agent
from replication.services import agents as agent_service
from replication.services import tunnels
from tests.helpers import PROJECT_ROOT, MiB, free_port, make_image, sha256, wait_until
from vma_agent.client import ProgressUnavailable

pytestmark = [pytest.mark.integration, pytest.mark.django_db]

TUNNEL_UP_TIMEOUT_S = 30


@pytest.fixture(scope="module")
def agent_sshd():
    """The OMA's sshd for agents, as scripts/lib.sh starts it, on a free port
    with its own directory."""
    directory = Path(settings.TEST_ROOT) / f"agent-ssh-{secrets.token_hex(3)}"
    port = free_port()
    env = {**os.environ, "AGENT_SSH_DIR": str(directory), "AGENT_SSH_PORT": str(port),
           "AGENT_SSH_LISTEN": "127.0.0.1"}
    out = subprocess.run(["bash", "-c", "source scripts/lib.sh && ensure_agent_sshd"], cwd=PROJECT_ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"the agents' sshd did not start: {out.stdout}{out.stderr}"
    yield directory, port
    pid = int((directory / "sshd.pid").read_text())
    os.kill(pid, signal.SIGTERM)


@pytest.fixture(autouse=True)
def tunnel_settings(settings, agent_sshd):
    directory, port = agent_sshd
    low = free_port()
    settings.AGENT_SSH_DIR = directory
    settings.AGENT_SSH_PORT = port
    settings.AGENT_TUNNEL_PORTS = f"{low}-{min(low + 20, 65535)}"
    # The broker, and MariaDB standing for a port an agent may NOT open.
    settings.AGENT_TUNNEL_PERMIT_OPEN = ["127.0.0.1:6379"]
    return settings


def new_agent(tmp_path, name) -> tuple[Agent, Path]:
    key = tmp_path / f"{name}_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{name}@site", "-f", str(key)], check=True)
    agent = Agent.objects.create(name=name, public_key=key.with_suffix(".pub").read_text())
    return agent, key


class KeeperProcess:
    """python -m vma_agent.tunnel in its own process, its log in a file."""

    def __init__(self, tmp_path, agent, key, api_port, remote_port=None, extra=()):
        self.log_path = tmp_path / f"tunnel-{agent.name}-{secrets.token_hex(2)}.log"
        command = [sys.executable, "-m", "vma_agent.tunnel", "--oma-host", "127.0.0.1",
                   "--ssh-port", str(settings.AGENT_SSH_PORT), "--user", settings.AGENT_SSH_USER,
                   "--key", str(key), "--remote-port", str(remote_port or agent.tunnel_port),
                   "--api-port", str(api_port), "--backoff-min", "0.2", "--backoff-max", "1", *extra]
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(command, cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text()

    def ssh_pid(self) -> int | None:
        """The ssh it runs now (its child), if any."""
        if self.proc.poll() is not None:
            raise AssertionError(f"the tunnel keeper exited:\n{self.log()}")
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        return int(children[0]) if children else None

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(timeout=30)


@pytest.fixture
def keepers():
    started = []

    def start(*args, **kwargs):
        started.append(KeeperProcess(*args, **kwargs))
        return started[-1]

    yield start
    for keeper in started:
        keeper.stop()


def post_progress(api_url, job_id, done):
    body = {"stage": "Transfer", "status": "in_progress", "seq": done, "bytes_transferred": done,
            "total_bytes": 1000, "percent": done / 10, "throughput_bps": 10, "job_id": job_id, "disk_id": "disk-1"}
    response = requests.post(f"{api_url}/api/v1/progress/{job_id}/update", data=json.dumps(body), timeout=10,
                             headers={"Content-Type": "application/json",
                                      "Authorization": f"Bearer {settings.VMA_TOKEN}"})
    assert response.status_code == 200, response.text


def progress_through(agent, job_id):
    """What the OMA's client of this agent reads, or None while it cannot."""
    try:
        return agent_service.client(agent).get(job_id)
    except ProgressUnavailable:
        return None


def done(record) -> int | None:
    return record["disks"]["disk-1"]["bytes_transferred"] if record else None


def listeners(port) -> str:
    return subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout


def new_job_id():
    return f"job-20261207-150000.000-{secrets.token_hex(3)}"


def test_the_oma_reads_an_agents_progress_only_through_its_tunnel(vma_server, tmp_path, keepers):
    api_port = int(vma_server.rsplit(":", 1)[1])
    # The agent's API listens on loopback only: nothing off this host reaches it.
    assert re.search(rf"127\.0\.0\.1:{api_port}\b", listeners(api_port))
    assert not re.search(rf"(0\.0\.0\.0|\*|\[::\]):{api_port}\b", listeners(api_port))

    agent, key = new_agent(tmp_path, "site-a")
    spec = tunnels.open_tunnel_for(agent)
    agent.refresh_from_db()
    assert agent.channel == Agent.Channel.TUNNEL and agent.tunnel_port == spec["remote_port"]
    assert agent.api_url == f"http://127.0.0.1:{agent.tunnel_port}" and agent.tunnel_port != api_port
    line = tunnels.authorized_keys_path().read_text()
    assert f'permitlisten="127.0.0.1:{agent.tunnel_port}"' in line and line.rstrip().endswith("oma-agent:site-a")

    job_id = new_job_id()
    post_progress(vma_server, job_id, 250)  # the agent's copy loop, on its own host
    assert progress_through(agent, job_id) is None  # no tunnel yet: the OMA has no way in

    broker_port = free_port()
    keeper = keepers(tmp_path, agent, key, api_port, extra=["--forward", f"{broker_port}:6379"])
    record = wait_until(lambda: progress_through(agent, job_id), TUNNEL_UP_TIMEOUT_S, "progress through the tunnel")
    assert done(record) == 250
    # The same connection carries the agent's way to the broker (local forward).
    ping = subprocess.run(["redis-cli", "-p", str(broker_port), "ping"], capture_output=True, text=True, timeout=30)
    assert ping.stdout.strip() == "PONG"
    assert "tunnel opening to oma-agents@127.0.0.1" in keeper.log()


def test_a_killed_tunnel_is_reopened_by_itself_and_progress_flows_again(vma_server, tmp_path, keepers):
    api_port = int(vma_server.rsplit(":", 1)[1])
    agent, key = new_agent(tmp_path, "site-b")
    tunnels.open_tunnel_for(agent)
    job_id = new_job_id()
    post_progress(vma_server, job_id, 100)
    keeper = keepers(tmp_path, agent, key, api_port)
    wait_until(lambda: progress_through(agent, job_id), TUNNEL_UP_TIMEOUT_S, "the tunnel")
    first_ssh = keeper.ssh_pid()

    os.kill(first_ssh, signal.SIGKILL)  # the connection drops
    wait_until(lambda: progress_through(agent, job_id) is None, TUNNEL_UP_TIMEOUT_S, "the tunnel to drop")
    post_progress(vma_server, job_id, 600)
    wait_until(lambda: done(progress_through(agent, job_id)) == 600, TUNNEL_UP_TIMEOUT_S,
               "progress through the re-opened tunnel")
    assert keeper.ssh_pid() not in (None, first_ssh)
    assert "tunnel closed after" in keeper.log() and "re-opening (attempt 2)" in keeper.log()

    assert keeper.stop() == 0  # SIGTERM: a clean exit, its ssh ended with it
    assert "tunnel keeper stopped" in keeper.log()
    wait_until(lambda: not listeners(agent.tunnel_port), TUNNEL_UP_TIMEOUT_S, "the tunnel's end to close")


def test_a_key_not_in_authorized_keys_is_refused(tmp_path):
    stranger, key = new_agent(tmp_path, "stranger")  # a record, but never approved: no line
    stranger.tunnel_port = free_port()
    from vma_agent.tunnel import parse_args, ssh_command

    command = ssh_command(parse_args(["--oma-host", "127.0.0.1", "--ssh-port", str(settings.AGENT_SSH_PORT),
                                      "--key", str(key), "--remote-port", str(stranger.tunnel_port),
                                      "--api-port", "8000"]))
    out = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert out.returncode == 255 and "Permission denied (publickey)" in out.stderr
    assert not listeners(stranger.tunnel_port)


def test_an_agent_may_listen_only_on_its_own_port_and_open_only_the_broker(tmp_path, keepers):
    a, key_a = new_agent(tmp_path, "site-c")
    b, _ = new_agent(tmp_path, "site-d")
    tunnels.open_tunnel_for(a)
    tunnels.open_tunnel_for(b)
    assert a.tunnel_port != b.tunnel_port
    from vma_agent.tunnel import parse_args, ssh_command

    # A asks for B's port: the OMA refuses the forward and ssh gives up.
    command = ssh_command(parse_args(["--oma-host", "127.0.0.1", "--ssh-port", str(settings.AGENT_SSH_PORT),
                                      "--key", str(key_a), "--remote-port", str(b.tunnel_port),
                                      "--api-port", "8000"]))
    out = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert out.returncode == 255 and f"remote port forwarding failed for listen port {b.tunnel_port}" in out.stderr
    assert not listeners(b.tunnel_port)

    # Its own port, with a local forward to MariaDB (not permitted): the
    # tunnel stands, but that channel is refused (MariaDB would greet first).
    sock_port = free_port()
    keeper = keepers(tmp_path, a, key_a, 8000, extra=["--forward", f"{sock_port}:3306"])
    wait_until(lambda: listeners(a.tunnel_port) and listeners(sock_port), TUNNEL_UP_TIMEOUT_S, "A's tunnel")
    with socket.create_connection(("127.0.0.1", sock_port), timeout=10) as sock:
        assert sock.recv(64) == b""
    assert keeper.ssh_pid() is not None


def test_a_revoked_agents_session_ends_and_its_tunnel_is_refused(vma_server, tmp_path, keepers):
    api_port = int(vma_server.rsplit(":", 1)[1])
    agent, key = new_agent(tmp_path, "site-e")
    other, _ = new_agent(tmp_path, "site-f")
    tunnels.open_tunnel_for(agent)
    tunnels.open_tunnel_for(other)
    job_id = new_job_id()
    post_progress(vma_server, job_id, 300)
    keeper = keepers(tmp_path, agent, key, api_port)
    wait_until(lambda: progress_through(agent, job_id), TUNNEL_UP_TIMEOUT_S, "the tunnel")

    assert tunnels.close_tunnel_for(agent) is True  # its open session was ended
    lines = tunnels.authorized_keys_path().read_text()
    assert "oma-agent:site-e" not in lines and "oma-agent:site-f" in lines  # the other agent keeps its line
    wait_until(lambda: "Permission denied (publickey)" in keeper.log(), TUNNEL_UP_TIMEOUT_S,
               "the keeper's re-open refused")
    assert progress_through(agent, job_id) is None
    assert tunnels.close_tunnel_for(other) is False  # no session open: only its line goes
    assert "oma-agent:site-f" not in tunnels.authorized_keys_path().read_text()


def test_bad_keys_and_bad_forwards_are_refused_with_the_reason(tmp_path):
    agent = Agent.objects.create(name="site-g", public_key='command="sh" ssh-ed25519 AAAA x')
    with pytest.raises(tunnels.TunnelError, match="not an OpenSSH public key"):
        tunnels.open_tunnel_for(agent)
    rsa_blob = base64.b64encode(b"\x00\x00\x00\x07ssh-rsa\x00\x00\x00\x01\x01").decode()
    agent.public_key = f"ssh-ed25519 {rsa_blob} x"  # an RSA key's data labelled ed25519
    with pytest.raises(tunnels.TunnelError, match="not a ssh-ed25519 key"):
        tunnels.open_tunnel_for(agent)
    agent.refresh_from_db()
    assert agent.tunnel_port is None and agent.channel == Agent.Channel.DIRECT

    key = tmp_path / "k"
    key.write_text("x")
    out = subprocess.run([sys.executable, "-m", "vma_agent.tunnel", "--oma-host", "h", "--key", str(key),
                          "--remote-port", "20000", "--api-port", "8000", "--forward", "5672"],
                         cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "'5672' is not LOCAL_PORT:[HOST:]PORT" in out.stderr


def test_the_agent_writes_the_oma_export_through_its_tunnel(tmp_path, keepers, tunnel_settings):
    """The NBD data path, outbound only: the agent's NBD client writes the
    OMA's export (nbdkit on 127.0.0.1 at the OMA) through the tunnel's local
    forward, which the OMA permits for that port only; the target is
    sha256-equal to the source."""
    export_port = free_port()
    tunnel_settings.AGENT_TUNNEL_PERMIT_OPEN = ["127.0.0.1:6379", f"127.0.0.1:{export_port}"]
    volumes = tmp_path / "oma-volumes"
    volumes.mkdir()
    target = volumes / "migration-vol-1"
    target.write_bytes(b"")
    os.truncate(target, 8 * MiB)
    source = make_image(tmp_path / "source.img", 8 * MiB, [(0, MiB), (5 * MiB, 512 * 1024)], seed=7)
    # Only the OMA's side listens on the export port: the agent's end of the
    # forward needs its own number here, as both sides share this host.
    agent_port = free_port()
    export = subprocess.Popen(["nbdkit", "-f", "--ipaddr", "127.0.0.1", "--port", str(export_port), "file",
                               f"dir={volumes}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: listeners(export_port), 30, "the OMA's export server")
        agent, key = new_agent(tmp_path, "site-h")
        spec = tunnels.open_tunnel_for(agent)
        assert {"name": "", "to": f"127.0.0.1:{export_port}", "local_port": export_port} in spec["forwards"]
        keepers(tmp_path, agent, key, 8000, extra=["--forward", f"{agent_port}:{export_port}"])
        wait_until(lambda: listeners(agent_port), TUNNEL_UP_TIMEOUT_S, "the agent's end of the export forward")
        out = subprocess.run(["nbdcopy", str(source), f"nbd://127.0.0.1:{agent_port}/migration-vol-1"],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert sha256(target) == sha256(source)
    finally:
        export.terminate()
        export.wait(30)


@pytest.mark.django_db(transaction=True)
def test_a_replication_whose_agent_reaches_the_broker_only_through_its_tunnel(celery_worker_process, vcenter,
                                                                                tmp_path, keepers):
    """A full VMware cycle whose agent worker knows the broker only as its
    end of the tunnel (127.0.0.1:<local forward>): its work order arrives,
    and its outcome goes back, through the one SSH connection; the
    replica is sha256-equal to the source."""
    from replication.choices import JobStatus
    from replication.services import vmware as vmware_service
    from replication.services.jobs import start_replication
    from simulators.vcenter import fill_image, vm_spec
    from tests.helpers import replica_sha256, start_worker, stop_worker, wait_for_job

    agent, key = new_agent(tmp_path, "site-tunnel")
    tunnels.open_tunnel_for(agent)
    broker_port = free_port()
    keepers(tmp_path, agent, key, int(settings.VMA_URL.rsplit(":", 1)[1]),
            extra=["--forward", f"{broker_port}:6379"])
    wait_until(lambda: listeners(broker_port), TUNNEL_UP_TIMEOUT_S, "the agent's end of the broker forward")
    db = urlsplit(settings.CELERY_BROKER_URL).path  # the test's Redis database, e.g. /14
    broker = f"redis://127.0.0.1:{broker_port}{db}"

    sim, record = vcenter(vm_spec("tunnel01", capacities=[16 * MiB]), name="vc-tunnel")
    live = sim.vms["tunnel01"]["disks"]["2000"]
    fill_image(live, [(0, 3 * MiB), (9 * MiB, MiB)], seed=61)
    (vm,) = vmware_service.discover(record, ["tunnel01"], agent=agent.name)
    worker = start_worker("agent", "agent-tunnel", extra_env={"VMA_AGENT_NAME": agent.name,
                                                              "TEST_CELERY_BROKER_URL": broker})
    try:
        job = wait_for_job(start_replication(vm).id, timeout=180)
        assert job.status == JobStatus.COMPLETED, job.error_message
        (disk,) = job.disks.all()
        assert replica_sha256(disk) == sha256(live)
    finally:
        stop_worker(worker)
    # The agent's worker connected to its end of the tunnel, never to the OMA's broker port.
    log = worker.log_path.read_text(errors="replace")
    assert re.search(rf"Connected to redis://\S*127\.0\.0\.1:{broker_port}/", log), log[-2000:]


# Enrolment sets the tunnel up: pairing code to revocation, end to end ----------------------

def test_the_spec_names_the_broker_and_the_export_by_default(tunnel_settings, tmp_path):
    """With no AGENT_TUNNEL_PERMIT_OPEN, an agent may open the broker agents
    are given (AGENT_BROKER_URL) and the export port (OMA_EXPORT_LISTEN),
    each at the same port number on its own host."""
    tunnel_settings.AGENT_TUNNEL_PERMIT_OPEN = []
    tunnel_settings.AGENT_BROKER_URL = "amqp://127.0.0.1:5673/oma"
    tunnel_settings.OMA_EXPORT_LISTEN = "127.0.0.1:10899"
    agent, _ = new_agent(tmp_path, "site-spec")
    spec = tunnels.open_tunnel_for(agent)
    assert spec["forwards"] == [{"name": "broker", "to": "127.0.0.1:5673", "local_port": 5673},
                                {"name": "export", "to": "127.0.0.1:10899", "local_port": 10899}]
    assert spec["host_key"].startswith("ssh-ed25519 ") and spec["remote_port"] == agent.tunnel_port
    line = tunnels.authorized_keys_path().read_text()
    assert 'permitopen="127.0.0.1:5673",permitopen="127.0.0.1:10899"' in line


def agent_host_env(state: Path, prefix: str) -> dict:
    """The agent host's environment: the project's own settings (not the
    tests'), no database, its progress store in the test Redis under a prefix
    of its own; agent.env (read by vma_agent.run) gives the rest."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("DATABASE_URL", "TEST_CELERY_BROKER_URL", "VMA_TOKEN", "VMA_URL", "CELERY_BROKER_URL")}
    return {**env, "DJANGO_SETTINGS_MODULE": "oma_site.settings", "SECRET_KEY": secrets.token_hex(32),
            "VMA_REDIS_URL": settings.CELERY_BROKER_URL, "VMA_PROGRESS_PREFIX": prefix,
            "TMPDIR": str(Path(settings.TEST_ROOT) / "tmp")}


@pytest.mark.django_db(transaction=True)
def test_an_enrolled_agent_is_reached_only_through_the_tunnel_set_up_at_approval(live_server, tunnel_settings,
                                                                                  tmp_path, monkeypatch):
    """Pairing code -> the agent host enrols (python -m vma_agent.enrol over
    HTTP) -> approval authorizes its key for its own port and the broker ->
    python -m vma_agent.run opens the tunnel and starts its API (on
    127.0.0.1 only) and its worker (on the real RabbitMQ, through the
    tunnel) -> the OMA's poller reads its progress at the tunnel's end ->
    revocation ends its session at once: the tunnel is refused, its
    credentials too, and nothing reaches its API any more."""
    from django.core.management import call_command

    from replication.choices import AgentState
    from replication.models import AgentAuditEntry, VMDisk
    from replication.services import enrolment, progress
    from tests.test_agents import _replicating
    from tests.test_enrolment import broker_users, rabbitmqctl
    from tests.test_progress_poller import update

    vhost = f"oma-test-tunnel-{os.getpid()}-{secrets.token_hex(2)}"
    rabbitmqctl("add_vhost", vhost)
    monkeypatch.setattr("replication.services.jobs.enqueue_prepare", lambda *args: None)
    monkeypatch.setattr(progress, "_feeds", {})
    tunnel_settings.AGENT_BROKER_URL = f"amqp://127.0.0.1:5672/{vhost}"
    tunnel_settings.AGENT_TUNNEL_PERMIT_OPEN = []  # the broker agents are given, as in production
    name, state = "tun-site", tmp_path / "agent-state"
    api_port, broker_port = free_port(), free_port()  # this host is the OMA too: 5672 is taken here
    agent_host = None
    try:
        code = enrolment.new_pairing_code("os:test")
        enrol = subprocess.Popen([sys.executable, "-m", "vma_agent.enrol", "--oma", live_server.url, "--code", code,
                                  "--name", name, "--state-dir", str(state), "--poll-s", "0.2", "--wait-s", "120",
                                  "--api-port", str(api_port), "--broker-port", str(broker_port)],
                                 cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_until(lambda: Agent.objects.filter(name=name).exists(), 60, "the agent's enrolment")
            call_command("agent", "approve", name)
            out, err = enrol.communicate(timeout=60)
        finally:
            enrol.kill()
        assert enrol.returncode == 0, err
        assert "tunnel.json" in out

        agent = Agent.objects.get(name=name)
        assert agent.state == AgentState.ACTIVE and agent.channel == Agent.Channel.TUNNEL
        assert agent.api_url == f"http://127.0.0.1:{agent.tunnel_port}" and agent.tunnel_port != api_port
        line = tunnels.authorized_keys_path().read_text()
        assert (f'permitlisten="127.0.0.1:{agent.tunnel_port}",permitopen="127.0.0.1:5672",command="/bin/false" '
                in line) and line.rstrip().endswith(f"oma-agent:{name}")
        config = json.loads((state / "tunnel.json").read_text())
        assert config == {"oma_host": "localhost", "ssh_port": settings.AGENT_SSH_PORT,
                          "user": settings.AGENT_SSH_USER, "key": str(state / "id_ed25519"),
                          "remote_port": agent.tunnel_port, "api_port": api_port,
                          "forward": [f"{broker_port}:127.0.0.1:5672"], "known_hosts": str(state / "known_hosts")}
        host_key = (Path(settings.AGENT_SSH_DIR) / "ssh_host_ed25519_key.pub").read_text().split()[:2]
        assert (state / "known_hosts").read_text().split() == [f"[localhost]:{settings.AGENT_SSH_PORT}", *host_key]
        env = dict(item.split("=", 1) for item in (state / "agent.env").read_text().splitlines())
        assert env["CELERY_BROKER_URL"].startswith(f"amqp://{quote(agent.broker_user, safe='')}:")
        assert agent.broker_user == enrolment.broker_user_of(name)
        assert f"@127.0.0.1:{broker_port}/" in env["CELERY_BROKER_URL"]
        assert env["VMA_TOKEN"] == Path(agent.token_file).read_text() and env["VMA_API_PORT"] == str(api_port)

        job = _replicating("vm-tun", name, tmp_path)
        log_path = tmp_path / "agent-host.log"
        with open(log_path, "w") as log:
            agent_host = subprocess.Popen([sys.executable, "-m", "vma_agent.run", "--state-dir", str(state),
                                           "--concurrency", "1"], cwd=PROJECT_ROOT, stdout=log,
                                          stderr=subprocess.STDOUT, env=agent_host_env(state, f"vma:progress:{name}"),
                                          start_new_session=True)  # its tunnel, API and worker: one group to end

        def host_log() -> str:
            assert agent_host.poll() is None, log_path.read_text()[-3000:]
            return log_path.read_text(errors="replace")

        # The agent's copy loop posts to its own API, on its own host, with its token.
        def posted() -> bool:
            host_log()
            try:
                return requests.post(f"http://127.0.0.1:{api_port}/api/v1/progress/{job.id}/update",
                                     json=update(1, 300, disk_id="disk-2000"), timeout=5,
                                     headers={"Authorization": f"Bearer {env['VMA_TOKEN']}"}).status_code == 200
            except requests.RequestException:
                return False

        wait_until(posted, 60, "the agent's API")
        # Its API listens on loopback only; the OMA's end is sshd's (the agent's reverse forward).
        assert re.search(rf"127\.0\.0\.1:{api_port}\b", listeners(api_port))
        assert not re.search(rf"(0\.0\.0\.0|\*|\[::\]):{api_port}\b", listeners(api_port))
        assert f"Listening at: http://127.0.0.1:{api_port}" in host_log(), "served by gunicorn, not runserver"

        def polled() -> bool:
            host_log()
            progress.poll_once()
            return VMDisk.objects.get(job=job).bytes_done == 300

        wait_until(polled, TUNNEL_UP_TIMEOUT_S, "the poller's read through the tunnel")
        owner = subprocess.run(["ss", "-ltnpH", f"sport = :{agent.tunnel_port}"], capture_output=True, text=True,
                               check=True).stdout
        assert '"sshd"' in owner
        agent.refresh_from_db()
        assert agent.last_seen_at is not None and agent.last_error == ""
        # Its worker reached the broker at its end of the tunnel, as its own user.
        user = re.escape(agent.broker_user)
        wait_until(lambda: re.search(rf"Connected to amqp://{user}:\*\*@127\.0\.0\.1:{broker_port}/",
                                     host_log()), 60, "the worker's broker connection through the tunnel")
        assert "tunnel opening to oma-agents@localhost" in host_log()
        assert agent.broker_user in rabbitmqctl("list_connections", "user", "--no-table-headers").split()

        call_command("agent", "revoke", name)

        # Its session was ended at once: the OMA's end of its tunnel is gone,
        # and the same tunnel, asked for again, is refused.
        wait_until(lambda: not listeners(agent.tunnel_port), TUNNEL_UP_TIMEOUT_S, "the revoked agent's tunnel to drop")
        from vma_agent.tunnel import parse_args, ssh_command

        again = subprocess.run(ssh_command(parse_args(["--config", str(state / "tunnel.json")])),
                               capture_output=True, text=True, timeout=60)
        assert again.returncode == 255 and "Permission denied (publickey)" in again.stderr
        with pytest.raises(ProgressUnavailable):
            agent_service.client(Agent.objects.get(name=name)).get(job.id)
        progress.poll_once()
        assert VMDisk.objects.get(job=job).bytes_done == 300
        assert agent.broker_user not in broker_users()
        refused = requests.get(f"{live_server.url}/api/agents/enrol/{name}/", timeout=10,
                               headers={"Authorization": f"Pairing {code}"})
        assert refused.status_code == 403 and refused.json()["state"] == "revoked"
        actions = list(AgentAuditEntry.objects.filter(agent__name=name).order_by("at", "id")
                       .values_list("action", "detail"))
        assert [action for action, _ in actions] == ["enrolled", "tunnel-authorized", "approved",
                                                     "credentials-fetched", "tunnel-closed", "revoked"]
        assert f"127.0.0.1:{agent.tunnel_port}" in actions[1][1] and "may open 127.0.0.1:5672" in actions[1][1]
        assert "its open session ended" in actions[4][1]
        assert agent.tunnel_port and f"oma-agent:{name}" not in tunnels.authorized_keys_path().read_text()

        # The agent host stops cleanly (or has already stopped: its worker's login refused).
        agent_host.terminate()
        agent_host.wait(60)
        assert "agent host stopped" in log_path.read_text()
        assert not listeners(api_port) and not listeners(broker_port)
    finally:
        if agent_host is not None:  # the group: a failed test leaves no tunnel, API or worker behind
            with contextlib.suppress(ProcessLookupError):
                os.killpg(agent_host.pid, signal.SIGKILL)
            agent_host.wait()
        for user in broker_users():
            if user == enrolment.broker_user_of(name):
                subprocess.run(["rabbitmqctl", "-q", "delete_user", user], capture_output=True, timeout=60)
        rabbitmqctl("delete_vhost", vhost)


def test_an_approval_whose_tunnel_cannot_be_set_up_is_refused_with_the_reason(tunnel_settings, tmp_path):
    """No free tunnel port: the agent stays pending, with no key line and no
    broker user (nothing after the tunnel was tried), the refusal audited."""
    from django.core.management import call_command
    from django.core.management.base import CommandError

    from replication.choices import AgentState
    from replication.models import AgentAuditEntry
    from replication.services import enrolment
    from vma_agent.enrol import agent_key

    code = enrolment.new_pairing_code("os:test")
    enrolment.enrol(code, "site-full", agent_key(tmp_path / "state", "site-full"), "1", "127.0.0.1")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        taken = busy.getsockname()[1]
        tunnel_settings.AGENT_TUNNEL_PORTS = f"{taken}-{taken}"
        with pytest.raises(CommandError, match=f"tunnel cannot be set up: no free tunnel port left in "
                                               f"AGENT_TUNNEL_PORTS {taken}-{taken}"):
            call_command("agent", "approve", "site-full")
    agent = Agent.objects.get(name="site-full")
    assert agent.state == AgentState.PENDING and agent.broker_user == "" and agent.tunnel_port is None
    assert "oma-agent:site-full" not in tunnels.authorized_keys_path().read_text()
    assert AgentAuditEntry.objects.filter(agent=agent, action="tunnel-refused",
                                          detail__startswith="no free tunnel port").exists()


def test_the_agent_host_refuses_to_run_before_it_enrolled(tmp_path):
    out = subprocess.run([sys.executable, "-m", "vma_agent.run", "--state-dir", str(tmp_path / "none")],
                         cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "agent.env: no such file (enrol first" in out.stderr
    (tmp_path / "agent.env").write_text("PROCESS_ROLE=agent\nnot a setting\n")
    out = subprocess.run([sys.executable, "-m", "vma_agent.run", "--state-dir", str(tmp_path)],
                         cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "agent.env:2: not KEY=VALUE" in out.stderr
    out = subprocess.run([sys.executable, "-m", "vma_agent.tunnel", "--config", str(tmp_path / "agent.env")],
                         cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--config" in out.stderr

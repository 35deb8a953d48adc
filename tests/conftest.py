import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import redis
import requests
from django.conf import settings

from replication.choices import JOB_TERMINAL
from replication.models import ReplicationJob
from replication.platforms import get_provider
from tests.helpers import NbdkitProcess, wait_until

PROJECT_ROOT = Path(__file__).resolve().parent.parent
WORKER_START_TIMEOUT_S = 60


@pytest.fixture(scope="session", autouse=True)
def data_plane_root():
    """Fresh volume and run directories for the session; the target export
    server a test started is stopped at the end."""
    shutil.rmtree(settings.TEST_ROOT, ignore_errors=True)
    settings.OMA_RUN_DIR.mkdir(parents=True)
    settings.OMA_VOLUME_DIR.mkdir(parents=True)
    settings.OMA_SECRETS_DIR.mkdir(mode=0o700, parents=True)
    (Path(settings.TEST_ROOT) / "tmp").mkdir()
    yield settings.TEST_ROOT
    get_provider().stop_export_server()


@pytest.fixture
def sockdir():
    """A short directory for test servers' Unix sockets."""
    path = Path(settings.TEST_ROOT) / f"s{time.monotonic_ns() % 10**9}"
    path.mkdir(parents=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def serve(sockdir):
    """Start nbdkit servers (serve("--readonly", "file", path)); all are
    stopped when the test ends."""
    servers = []

    def start(*args):
        servers.append(NbdkitProcess(sockdir, *args))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def worker_env() -> dict:
    # TMPDIR puts the worker's private source-export sockets under TEST_ROOT,
    # where source_exports_running() looks for leftovers of this run only.
    return {**os.environ, "DJANGO_SETTINGS_MODULE": "oma_site.test_settings", "OMA_TEST_WORKER": "1",
            "TMPDIR": str(Path(settings.TEST_ROOT) / "tmp"),
            "VMA_URL": settings.VMA_URL, "VMA_TOKEN": settings.VMA_TOKEN}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def vma_server(django_db_setup, data_plane_root):
    """The project's web server (manage.py runserver) in its own process on a
    free port: the VMA progress API over real HTTP, on the test Redis.
    settings.VMA_URL points at it for this process and the worker. It
    trusts loopback (VMA_TRUST_LOOPBACK) as an agent set up for MigrateKit
    OSSEA's token-less clients does: what that allows is tested over HTTP,
    and our own clients must work there with their token alone."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = Path(settings.TEST_ROOT) / "vma-server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "manage.py", "runserver", "--noreload", "--skip-checks", f"127.0.0.1:{port}"],
            cwd=PROJECT_ROOT, env={**worker_env(), "VMA_TRUST_LOOPBACK": "true"}, stdout=log,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + WORKER_START_TIMEOUT_S
    def answers() -> bool:
        if proc.poll() is not None:
            raise AssertionError("it exited")
        try:
            return requests.get(f"{url}/api/v1/openapi.json", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    try:
        wait_until(answers, max(deadline - time.monotonic(), 0), "the vma server", interval=0.1)
    except AssertionError:
        proc.kill()
        pytest.fail(f"vma server did not start:\n{log_path.read_text()[-3000:]}")
    previous, settings.VMA_URL = settings.VMA_URL, url
    yield url
    settings.VMA_URL = previous
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture
def vma_store():
    """The agent's progress store as the server sees it (same Redis, same prefix)."""
    from vma_agent.api import get_store

    return get_store()


def start_worker(role: str, name: str, concurrency: int = 2, extra_env: dict | None = None) -> subprocess.Popen:
    """A real Celery worker process (prefork) on the real Redis, in one role:
    "oma" (queue oma, the test database) or "agent" (its agent's queue, no
    database at all: no DATABASE_URL, and Django's dummy backend raises on
    any ORM access). In a process group of its own, so kill_worker() takes
    its pool children and their nbdkit sources with it, as a crash would."""
    log_path = Path(settings.TEST_ROOT) / f"worker-{name}.log"
    env = {**worker_env(), "PROCESS_ROLE": role, **(extra_env or {})}
    if role == "agent":
        env.pop("DATABASE_URL", None)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "oma_site", "worker", "-c", str(concurrency), "-E", "-l", "info",
             "--without-gossip", "--without-mingle", "-n", f"{name}-{os.getpid()}@%h"],
            cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError("it exited")
        return b" ready." in log_path.read_bytes()

    try:
        wait_until(ready, WORKER_START_TIMEOUT_S, f"the celery {role} worker", interval=0.2)
    except AssertionError:
        proc.kill()
        pytest.fail(f"celery {role} worker did not start:\n{log_path.read_text()[-3000:]}")
    proc.log_path = log_path
    return proc


def kill_worker(proc: subprocess.Popen) -> None:
    """SIGKILL the worker's whole process group: no cleanup code runs."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def stop_worker(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGQUIT)  # cold shutdown: do not wait for tasks
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def celery_worker_process(django_db_setup, data_plane_root, vma_server):
    """The OMA's worker (orchestration, on the test database) and the local
    agent's worker (copies, with no database), as on two hosts."""
    redis.Redis.from_url(settings.CELERY_BROKER_URL).flushdb()
    oma = start_worker("oma", "test-oma")
    agent = start_worker("agent", "test-agent")
    yield oma
    stop_worker(agent)
    stop_worker(oma)


def wait_for_job(job_id: str, timeout: float = 120) -> ReplicationJob:
    def ended() -> ReplicationJob | None:
        job = ReplicationJob.objects.get(pk=job_id)
        return job if job.status in JOB_TERMINAL else None

    try:
        return wait_until(ended, timeout, f"job {job_id} to end", interval=0.2)
    except AssertionError:
        job = ReplicationJob.objects.get(pk=job_id)
        raise AssertionError(f"job {job_id} still {job.status} ({job.current_operation}) after {timeout} s") from None


def agent_bytes_copied(job_id: str, disk_key: str) -> int:
    """What the agent's progress API says a disk's copy has done so far."""
    response = requests.get(f"{settings.VMA_URL}/api/v1/progress/{job_id}", timeout=10,
                            headers={"Authorization": f"Bearer {settings.VMA_TOKEN}"})
    if response.status_code != 200:
        return 0
    return int((response.json().get("disks", {}).get(disk_key) or {}).get("bytes_transferred") or 0)


def source_exports_running() -> list[str]:
    """Command lines of read-only source servers (nbdkit, or qemu-nbd for
    qcow2 sources) still alive."""
    out = subprocess.run(["pgrep", "-af", "(nbdkit.*--readonly|qemu-nbd.*--read-only)"], capture_output=True,
                         text=True).stdout
    return [line for line in out.splitlines() if f"{settings.TEST_ROOT}/tmp/vma-src-" in line]


class PollerThread:
    """The OMA progress poller running passes in a thread of the test process
    (what beat does every PROGRESS_POLL_INTERVAL_S), stoppable and restartable."""

    def __init__(self, interval_s: float = 0.3):
        self.interval_s = interval_s
        self.passes = 0
        self._stop = threading.Event()
        self._thread = None

    def start(self) -> "PollerThread":
        from replication.services.progress import poll_once

        def run():
            from django.db import connection

            try:
                while not self._stop.is_set():
                    poll_once()
                    self.passes += 1
                    self._stop.wait(self.interval_s)
            finally:
                connection.close()

        self._stop.clear()
        self._thread = threading.Thread(target=run, name="test-progress-poller", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)


@pytest.fixture
def progress_poller(vma_server):
    poller = PollerThread().start()
    yield poller
    poller.stop()


@pytest.fixture
def vcsim_factory(tmp_path):
    """Start test vCenters: vcsim_factory(spec, **kwargs) -> a running
    tests.vcsim.VCenterSimulator (kwargs as VCenterSimulator.start); all are
    stopped at teardown."""
    from tests.vcsim import VCenterSimulator

    started = []

    def start(spec: dict, **kwargs):
        # Its password file where a vCenter record may point (OMA_SECRETS_DIR).
        sim = VCenterSimulator.start(tmp_path / f"vcsim{len(started)}", spec, password_dir=settings.OMA_SECRETS_DIR,
                                     **kwargs)
        started.append(sim)
        return sim

    yield start
    for sim in started:
        sim.stop()


@pytest.fixture
def vcenter(vcsim_factory):
    """Start a vCenter simulator with these VMs (tests.vcsim.vm_spec) and
    record it as a vCenter; its images live where the agent's image-dir
    snapshot source looks for them. Returns (simulator, VCenter)."""
    from replication.services import vmware as vmware_service

    def start(*vms, name="vc1", **simulator_options):
        data_dir = Path(settings.VMA_SNAPSHOT_IMAGE_DIR) / name
        shutil.rmtree(data_dir, ignore_errors=True)
        sim = vcsim_factory({"vms": list(vms)}, data_dir=data_dir, **simulator_options)
        record = vmware_service.register_vcenter(name, sim.host, sim.username, sim.thumbprint, port=sim.port,
                                                 password_file=str(sim.password_file))
        return sim, record

    return start

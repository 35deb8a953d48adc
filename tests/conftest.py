"""The suite's fixtures: the data-plane directories, nbdkit servers, the
agent's web server, the OMA and agent workers, the progress poller and
vCenter simulators. Helpers that are not fixtures are in tests/helpers.py."""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
import requests
from django.conf import settings

from replication.platforms import get_provider
from tests.helpers import (
    PROJECT_ROOT,
    WORKER_START_TIMEOUT_S,
    NbdkitProcess,
    PollerThread,
    free_port,
    start_worker,
    stop_worker,
    wait_until,
    worker_env,
)


@pytest.fixture(scope="session", autouse=True)
def data_plane_root():
    """Fresh volume and run directories for the session; the target export
    server a test started, and any cycle's layer server a test left serving
    (one that ended mid-cycle), are stopped at the end."""
    shutil.rmtree(settings.TEST_ROOT, ignore_errors=True)
    settings.OMA_RUN_DIR.mkdir(parents=True)
    settings.OMA_VOLUME_DIR.mkdir(parents=True)
    settings.OMA_SECRETS_DIR.mkdir(mode=0o700, parents=True)
    (Path(settings.TEST_ROOT) / "tmp").mkdir()
    yield settings.TEST_ROOT
    get_provider().stop_export_server()
    stop_layer_servers_under(Path(settings.TEST_ROOT))


def stop_layer_servers_under(root: Path) -> list[int]:
    """SIGTERM to every qemu-nbd whose command line names a path under
    `root` (this session's test root only: other sessions' roots differ)."""
    needle, stopped = f"{root}/".encode(), []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                argv = Path(f"/proc/{entry.name}/cmdline").read_bytes().split(b"\0")
                if argv[0].endswith(b"qemu-nbd") and any(needle in arg for arg in argv):
                    os.kill(int(entry.name), signal.SIGTERM)
                    stopped.append(int(entry.name))
    return stopped


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


@pytest.fixture
def progress_poller(vma_server):
    poller = PollerThread().start()
    yield poller
    poller.stop()


@pytest.fixture
def vcsim_factory(tmp_path):
    """Start test vCenters: vcsim_factory(spec, **kwargs) -> a running
    simulators.vcenter.VCenterSimulator (kwargs as VCenterSimulator.start); all are
    stopped at teardown."""
    from simulators.vcenter import VCenterSimulator

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
    """Start a vCenter simulator with these VMs (simulators.vcenter.vm_spec) and
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


@pytest.fixture
def browser_page(monkeypatch):
    """A page in a fresh headless Chromium (Debian's, by Playwright), 1400 px wide, accepting confirmations."""
    # Playwright's sync API runs an event loop in this thread; the test's own
    # ORM calls are still plain synchronous code.
    from playwright.sync_api import sync_playwright

    from tests.browser import ARTIFACTS, CHROMIUM, CHROMIUM_FLAGS

    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    assert Path(CHROMIUM).exists(), "Debian's chromium is missing: scripts/setup.sh installs it"
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_context(viewport={"width": 1400, "height": 900}).new_page()
        page.on("dialog", lambda dialog: dialog.accept())  # the confirmation of cancel
        yield page
        browser.close()


@pytest.fixture
def cloud_sim(tmp_path):
    """A CloudStack simulator and a secret file holding its secret key (in OMA_SECRETS_DIR): (sim, secret)."""
    from django.conf import settings as django_settings

    from simulators.cloudstack import CloudStackSimulator

    sim = CloudStackSimulator(tmp_path / "cloudstack", tmp_path / "by-id")
    secret = django_settings.OMA_SECRETS_DIR / f"cloud-secret-{tmp_path.name}"
    secret.write_text(sim.secret + "\n")
    secret.chmod(0o600)
    try:
        yield sim, secret
    finally:
        secret.unlink(missing_ok=True)
        sim.stop()

"""What the tests share besides fixtures: waiting on a condition, sparse
raw images with known content, small nbdkit servers, the boot disk, users
with a role, and real worker processes, the agent's progress as it answers,
and the progress poller in a thread."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
from django.conf import settings

from simulators.boot_disk import boot_disk_builder
from vma_agent import nbdkit

MiB = 1024 * 1024
PROJECT_ROOT = Path(__file__).resolve().parent.parent
WORKER_START_TIMEOUT_S = 60


def command(*args) -> str:
    """A management command's output (CommandError raised as is)."""
    from django.core.management import call_command

    out = io.StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


def failover(vm_name: str, *args) -> dict:
    """`failover VM ... --wait --json`, its JSON report."""
    return json.loads(command("failover", vm_name, *args, "--wait", "--json"))


def domains() -> list[str]:
    """The names of every libvirt domain on qemu:///system."""
    import libvirt

    conn = libvirt.open("qemu:///system")
    try:
        return [d.name() for d in conn.listAllDomains()]
    finally:
        conn.close()


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05):
    """Poll `predicate` until it returns something true (returned), failing
    with `what` after `timeout` seconds. The predicate may raise to stop
    early (a process that died). The one way the tests wait on a condition."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def make_image(path: Path, size: int, data_ranges: list[tuple[int, int]], seed: int = 1) -> Path:
    """A sparse raw image of `size` bytes with random data only in data_ranges."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, length in data_ranges:
            f.seek(offset)
            f.write(rng.randbytes(length))
    return path


def sha256(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            digest.update(chunk)
    return digest.hexdigest()


def layer_sha256(handle: Path | str, size: int | None = None) -> str:
    """sha256 of what a recovery point's layer holds for its disk, read
    through its whole chain (a qcow2 layer over earlier layers and the raw
    replica), the first `size` bytes (default: all): the disk as a failover
    boots it."""
    handle = Path(handle)
    with open(handle, "rb") as f:
        is_qcow2 = f.read(4) == b"QFI\xfb"
    if not is_qcow2:
        return sha256(handle) if size is None else sha256_prefix(handle, size)
    out = Path(settings.TEST_ROOT) / "tmp" / f"chain-{time.monotonic_ns()}.raw"
    try:
        subprocess.run(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", str(handle), str(out)],
                       check=True, capture_output=True, timeout=300)
        return sha256(out) if size is None else sha256_prefix(out, size)
    finally:
        out.unlink(missing_ok=True)


def sha256_prefix(path: Path | str, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        left = size
        while left and (chunk := f.read(min(4 * MiB, left))):
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def replica_sha256(disk) -> str:
    """sha256 of a completed cycle's disk (a VMDisk) in the recovery point
    that cycle sealed: the replica as a failover from that point boots it."""
    layer = disk.job.recovery_point.layers.get(disk_key=disk.disk_key)
    return layer_sha256(layer.handle, disk.capacity_bytes)


class NbdkitProcess:
    """An nbdkit serving one export on a Unix socket, started and killed by a test."""

    def __init__(self, sockdir: Path, *args: str):
        self.socket = sockdir / f"nbd-{os.getpid()}-{time.monotonic_ns()}.sock"
        self.log = open(sockdir / "nbdkit-test.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            ["nbdkit", "--foreground", "--exit-with-parent", "--unix", str(self.socket), *args],
            stdout=subprocess.DEVNULL, stderr=self.log,
        )
        def serving() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"test nbdkit {args} did not start")
            return self.socket.exists() and nbdkit.socket_accepts(self.socket)

        wait_until(serving, 10, f"test nbdkit {args} to serve", interval=0.02)

    @property
    def uri(self) -> str:
        return nbdkit.unix_uri(self.socket)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        nbdkit.stop_process(self.proc)
        self.log.close()


def slow_nbd_source(sockdir: Path, image: Path, delay: str) -> NbdkitProcess:
    """A read-only NBD source answering one request at a time, each `delay`
    late (nbdkit's noparallel and delay filters): a copy lasts long enough to
    watch however many connections the engine opens."""
    return NbdkitProcess(sockdir, "--readonly", "--filter=noparallel", "--filter=delay", "file", str(image),
                         "serialize=all-requests", f"rdelay={delay}")


def completed_cycle_on(tmp_path, name, monkeypatch):
    """A VM whose last cycle completed, its replica a real file, without a
    worker: the failover then runs in this process (enqueueing captured)."""
    from replication.choices import JobStatus
    from replication.services import jobs
    from replication.services.inventory import register_image_vm

    monkeypatch.setattr("replication.services.jobs.enqueue_prepare", lambda *args: None)
    monkeypatch.setattr("replication.services.failover._enqueue", lambda job, task_name: None)
    disk = tmp_path / f"{name}.img"
    boot_disk_builder().build_boot_disk(disk, "D")
    vm = register_image_vm(name, [str(disk)])
    job = jobs.start_replication(vm)
    assert job.enter_stage("Initializing", JobStatus.PREPARING)
    assert job.enter_stage("Transfer", JobStatus.REPLICATING)
    vm_disk = job.disks.get()
    replica = tmp_path / f"{name}-replica.img"
    replica.write_bytes(disk.read_bytes())
    type(vm_disk.target_volume).objects.filter(pk=vm_disk.target_volume_id).update(path=str(replica))
    assert vm_disk.start_attempt("t") and vm_disk.complete(bytes_total=1, bytes_zeroed=0, throughput_bps=1)
    assert job.transition(JobStatus.FINALIZING)
    jobs.commit_and_complete(job)
    return vm


def user_with_role(username: str, role: str | None, password: str = "s3cret-pass"):
    """A user holding one role (viewer, operator or administrator; None: no role)."""
    from django.contrib.auth.models import User

    from replication.roles import grant

    user = User.objects.create_user(username, password=password)
    if role is not None:
        grant(user, role)
    return user


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


def start_agent_api(name: str, env: dict) -> subprocess.Popen:
    """An agent's progress API as on its own host (the project's web server,
    manage.py runserver, in its own process) with `env` (VMA_AGENT_NAME,
    VMA_URL naming its port, VMA_TOKEN, VMA_PROGRESS_PREFIX...), once it
    answers its health check."""
    port = env["VMA_URL"].rsplit(":", 1)[1]
    log_path = Path(settings.TEST_ROOT) / f"agent-api-{name}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "manage.py", "runserver", "--noreload", "--skip-checks", f"127.0.0.1:{port}"],
            cwd=PROJECT_ROOT, env={**worker_env(), **env}, stdout=log, stderr=subprocess.STDOUT)

    def answers() -> bool:
        assert proc.poll() is None, log_path.read_text()[-3000:]
        try:
            return requests.get(f"{env['VMA_URL']}/api/v1/health", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    wait_until(answers, 60, f"agent {name}'s API", interval=0.1)
    proc.log_path = log_path
    return proc


def kill_worker(proc: subprocess.Popen) -> None:
    """SIGKILL the worker's whole process group: no cleanup code runs."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def stop_site(judge, workers, api) -> None:
    """The end of a test that ran an agent site for real: its Judge stopped,
    the workers still running stopped, its API server terminated (any of
    them None when the test failed before starting it)."""
    if judge is not None:
        judge.stop()
    for worker in workers:
        if worker is not None and worker.poll() is None:
            stop_worker(worker)
    if api is not None:
        api.terminate()
        api.wait(10)


def stop_worker(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGQUIT)  # cold shutdown: do not wait for tasks
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_for_job(job_id: str, timeout: float = 120):
    """Wait until the job ends; the job, or an AssertionError with where it stands."""
    from replication.choices import JOB_TERMINAL
    from replication.models import ReplicationJob

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

    def start(self) -> PollerThread:
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


class Judge:
    """The progress poller and the reaper in a thread, a pass every 0.3 s,
    as beat runs them."""

    def __init__(self, interval_s: float = 0.3):
        from replication.services import progress, reaper

        self._stop = threading.Event()

        def run():
            from django.db import connection

            try:
                while not self._stop.wait(interval_s):
                    progress.poll_once()
                    reaper.reap()
            finally:
                connection.close()

        self._thread = threading.Thread(target=run, name="test-judge", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


def cloud_form_data(sim, secret, **changes) -> dict:
    """The cloud form (replication.forms.CloudForm) filled for a CloudStack simulator, with `changes`."""
    data = {"name": "cloud1", "api_url": sim.endpoint, "api_key": sim.api_key, "secret_file": str(secret),
            "secret_env": "", "zone_id": sim.zone["id"], "disk_offering_id": sim.disk_offering["id"],
            "service_offering_id": sim.service_offering["id"], "network_id": sim.network["id"],
            "template_id": sim.template["id"], "oma_vm_id": sim.oma_vm["id"], "device_dir": str(sim.by_id_dir)}
    data.update(changes)
    return data

"""Test data: sparse raw images with known content, and small nbdkit servers."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import time
from pathlib import Path

from vma_agent import nbdkit

MiB = 1024 * 1024


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


def boot_disk_builder():
    """scripts/make_boot_disk.py as a module: build_boot_disk(path, marker),
    set_marker(path, marker) (a script, not a package, so loaded by path)."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "scripts" / "make_boot_disk.py"
    spec = importlib.util.spec_from_file_location("make_boot_disk", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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

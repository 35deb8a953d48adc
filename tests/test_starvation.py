"""Progress keeps flowing while every copy slot is busy.

The demo's process layout, as scripts/demo.sh starts it: the agent's copy
worker with two slots (-Q vma.<agent> -c 2), an OMA worker (-Q oma), beat,
and the progress poller as its own process (manage.py poll_progress), on
the test database and Redis, with the agent API (vma_server). Two disks copy
at once under a bandwidth limit, so both slots copy for about 12 s; the
database's progress (VMDisk.bytes_done and ReplicationJob.bytes_transferred)
must advance at least every PROGRESS_POLL_INTERVAL_S + 2 s the whole time.
In the old layout (one `worker -B -c 2` with beat queueing the poll into the
same pool) the poll waited behind the copies and nothing moved until the
first copy ended."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.conf import settings

from replication.choices import DiskStatus, JobStatus
from replication.models import ReplicationJob, VMDisk
from replication.services.inventory import register_image_vm
from replication.services.jobs import start_replication
from tests.helpers import PROJECT_ROOT, MiB, make_image, start_worker, wait_for_job, wait_until, worker_env

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

AGENT = "starve"  # a queue of its own: no other test's worker takes these copies
POLL_INTERVAL_S = 2.0
DATA_PER_DISK = 12 * MiB
LIMIT_BPS = 1 * MiB  # per disk: about 12 s of copying


def start_process(name: str, *args: str, role: str = "oma") -> subprocess.Popen:
    log = Path(settings.TEST_ROOT) / f"starvation-{name}.log"
    env = {**worker_env(), "PROCESS_ROLE": role, "PROGRESS_POLL_INTERVAL_S": str(POLL_INTERVAL_S)}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, *args], cwd=PROJECT_ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    proc.log_path = log
    return proc


def stop_process(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture
def demo_layout(vma_server):
    """What scripts/demo.sh starts besides the web server: the agent's copy
    worker (-c 2, its own queue), an OMA worker, beat, the poller process."""
    started = []
    try:
        started.append(start_worker("agent", "starve-agent", 2, extra_env={"VMA_AGENT_NAME": AGENT}))
        started.append(start_worker("oma", "starve-oma", 2))
        started.append(start_process("beat", "-m", "celery", "-A", "oma_site", "beat", "-l", "info",
                                     "-s", str(Path(settings.TEST_ROOT) / "starvation-celerybeat-schedule")))
        poller = start_process("poller", "manage.py", "poll_progress")
        started.append(poller)
        # Its start (Django loaded) can take seconds on a busy machine: the
        # copies must not run before anything polls them.
        wait_until(lambda: b"progress poller: a pass every" in poller.log_path.read_bytes(), 120,
                   "the poller process to start")
        yield poller
    finally:
        for proc in started:
            stop_process(proc)


def test_progress_advances_while_both_copy_slots_are_busy(demo_layout, tmp_path):
    images = [make_image(tmp_path / f"starve{i}.img", 64 * MiB, [(4 * MiB, DATA_PER_DISK)], seed=i)
              for i in range(2)]
    vm = register_image_vm("vm-starve", [str(path) for path in images], agent=AGENT)
    job = start_replication(vm, bandwidth_limit_bps=LIMIT_BPS)
    bound_s = POLL_INTERVAL_S + 2

    # Watch the database from the moment both disks copy until the first one
    # ends: every time the disks' or the job's byte count moves.
    deadline = time.monotonic() + 120

    def both_copying() -> bool:
        assert ReplicationJob.objects.get(pk=job.id).status not in (JobStatus.FAILED, JobStatus.CANCELLED)
        return VMDisk.objects.filter(job=job, status=DiskStatus.COPYING).count() >= 2

    wait_until(both_copying, 120, "the two copies to run at the same time")
    copying_since = time.monotonic()
    disk_moves, job_moves = [copying_since], [copying_since]
    last_disks = last_job = None
    while True:
        rows = list(VMDisk.objects.filter(job=job).values_list("status", "bytes_done"))
        job_done = ReplicationJob.objects.values_list("bytes_transferred", flat=True).get(pk=job.id)
        now = time.monotonic()
        if any(status != DiskStatus.COPYING for status, _ in rows):
            break
        disks_done = sum(done for _, done in rows)
        if last_disks is not None and disks_done > last_disks:
            disk_moves.append(now)
        if last_job is not None and job_done > last_job:
            job_moves.append(now)
        last_disks, last_job = disks_done, job_done
        assert now < deadline, "the copies did not end"
        time.sleep(0.05)  # the sampling period of this watch, not a wait
    copying_until = time.monotonic()
    disk_moves.append(copying_until)
    job_moves.append(copying_until)

    log = demo_layout.log_path
    for what, moves in (("VMDisk.bytes_done", disk_moves), ("ReplicationJob.bytes_transferred", job_moves)):
        gaps = [b - a for a, b in zip(moves, moves[1:], strict=False)]
        assert len(moves) - 2 >= 3, (
            f"{what} moved only {len(moves) - 2} times in {copying_until - copying_since:.1f} s of copying "
            f"(poller log: {log})")
        assert max(gaps) <= bound_s, (
            f"{what} stood still for {max(gaps):.1f} s while both slots copied (bound {bound_s} s); "
            f"gaps {[round(g, 1) for g in gaps]} (poller log: {log})")

    assert wait_for_job(job.id).status == JobStatus.COMPLETED

"""The agent stands apart, as on its own host in the customer's VMware site:
its worker has no database at all (no DATABASE_URL; any ORM access raises)
and works from work orders alone, reporting through its progress API and
outcome tasks; the OMA's worker does every database write. A full and an
incremental VMware cycle on the vCenter simulator, with the agent killed
mid-copy and a new one resuming from the checkpoint the first reported."""

import subprocess
import sys

import pytest

from replication.choices import JobStatus, SyncType
from replication.models import CopyAttempt, VMDisk
from replication.services import vmware as vmware_service
from replication.services.jobs import start_replication
from simulators.vcenter import fill_image, vm_spec
from tests.faults.harness import wait_until
from tests.helpers import (
    PROJECT_ROOT,
    Judge,
    MiB,
    kill_worker,
    replica_sha256,
    sha256,
    start_worker,
    stop_worker,
    wait_for_job,
    worker_env,
)

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

AGENT = "apart"
HEARTBEAT_TIMEOUT_S = 3


def test_an_agent_process_has_no_database():
    env = {**worker_env(), "PROCESS_ROLE": "agent", "VMA_AGENT_NAME": AGENT}
    env.pop("DATABASE_URL", None)
    code = ("import django; django.setup()\n"
            "from django.conf import settings; from replication.models import ReplicationJob\n"
            "print(settings.DATABASES['default']['ENGINE'], settings.CELERY_TASK_QUEUES)\n"
            "try:\n    ReplicationJob.objects.count()\nexcept Exception as exc:\n    print('refused:', exc)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "django.db.backends.dummy" in out.stdout and "vma.apart" in out.stdout and "'oma'" not in out.stdout
    assert "refused: settings.DATABASES is improperly configured" in out.stdout


def test_vmware_cycles_with_the_agent_apart_and_killed_mid_copy(celery_worker_process, vcenter, settings):
    settings.HEARTBEAT_TIMEOUT_S = HEARTBEAT_TIMEOUT_S
    agent_env = {"VMA_AGENT_NAME": AGENT, "HEARTBEAT_TIMEOUT_S": str(HEARTBEAT_TIMEOUT_S),
                 "COPY_LIMIT_BPS": str(6 * MiB)}
    sim, record = vcenter(vm_spec("apart01", capacities=[96 * MiB, 8 * MiB]), name="vc-apart")
    live = sim.vms["apart01"]["disks"]
    fill_image(live["2000"], [(0, 30 * MiB)], seed=41)
    fill_image(live["2001"], [(MiB, 3 * MiB)], seed=42)
    (vm,) = vmware_service.discover(record, ["apart01"], agent=AGENT)
    first = start_worker("agent", "agent-apart-1", extra_env=agent_env)
    judge = Judge()
    second = None
    try:
        job = start_replication(vm)
        disk = VMDisk.objects.get(job=job, disk_key="disk-2000")
        wait_until(lambda: VMDisk.objects.get(pk=disk.pk).checkpoint_bytes >= 8 * MiB, 60,
                   "a checkpoint of 8 MiB reported by the agent")
        kill_worker(first)
        second = start_worker("agent", "agent-apart-2", extra_env=agent_env)
        job = wait_for_job(job.id, timeout=120)
        assert job.status == JobStatus.COMPLETED, job.error_message
        for d in job.disks.all():
            assert replica_sha256(d) == sha256(live[str(d.source_disk.device_key)]), d
        runs = list(CopyAttempt.objects.filter(disk=disk).order_by("number"))
        assert [r.outcome for r in runs] == ["lost", "completed"]
        assert runs[0].checkpoint_bytes >= 8 * MiB
        assert runs[1].resumed_from >= runs[0].checkpoint_bytes  # it did not start over
        assert ":" in runs[1].worker and VMDisk.objects.get(pk=disk.pk).attempts == 2

        fill_image(live["2000"], [(50 * MiB, 100_000)], seed=43)
        job = wait_for_job(start_replication(vm, SyncType.INCREMENTAL).id, timeout=120)
        assert job.status == JobStatus.COMPLETED, job.error_message
        assert {d.sync_type for d in job.disks.all()} == {SyncType.INCREMENTAL}
        assert job.disks.get(disk_key="disk-2001").bytes_total == 0
        for d in job.disks.all():
            assert replica_sha256(d) == sha256(live[str(d.source_disk.device_key)]), d
    finally:
        judge.stop()
        kill_worker(first)
        if second is not None:
            stop_worker(second)
    # The agents' own logs: they ran only agent tasks, and never touched a database.
    for worker in (first, second):
        text = worker.log_path.read_text(errors="replace")
        assert "replication." not in " ".join(line for line in text.splitlines() if "Task " in line)
        assert "ImproperlyConfigured" not in text

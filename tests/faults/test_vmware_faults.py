"""Fault injection on VMware sources (the vCenter simulator, real worker
processes, real nbdkit): a source killed in the middle of an incremental,
and an incremental whose worker is killed halfway then rerun after more
writes. Snapshots must be gone, changeIds must not advance past data that
was not written, and every changed block must arrive."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import pytest

from replication import tasks
from replication.choices import JobStatus, SyncType
from replication.models import ChangeIdRecord, CopyAttempt, JobEvent, ReplicationJob, SourceDisk, VMDisk
from replication.services import vmware as vmware_service
from replication.services.jobs import cancel_job, start_replication
from replication.services.orders import agent_client
from simulators.vcenter import fill_image, vm_spec
from tests.faults.harness import (
    CaseFigures,
    leftovers,
    max_concurrent_of,
    non_terminal_rows,
    record,
    settle,
    sha256_match,
    wait_until,
)
from tests.helpers import MiB, wait_for_job

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def snapshot_source_pids(job_id: str) -> list[int]:
    """The nbdkit processes serving the job's snapshot disks."""
    moref = ReplicationJob.objects.values_list("snapshot_moref", flat=True).get(pk=job_id)
    if not moref:
        return []
    out = subprocess.run(["pgrep", "-f", f"/snapshots/{moref}/"], capture_output=True, text=True).stdout
    return [int(pid) for pid in out.split()]


def snapshots_left(record_: object, moref: str) -> list[str]:
    with vmware_service.client_for(record_) as client:
        return [s.name for s in client.vm_info(moref).snapshots]


def wait_for_no_snapshots(vcenter_record, moref: str, timeout: float = 30) -> float:
    started = time.monotonic()
    wait_until(lambda: not snapshots_left(vcenter_record, moref), timeout, "the job's snapshot removed", 0.2)
    return time.monotonic() - started


def bytes_done(job) -> int:
    """The job's copy progress as the poller last wrote it from the agent's reports."""
    return sum(VMDisk.objects.filter(job_id=job.pk).values_list("bytes_done", flat=True))


def reported_bytes(job_id: str, disk_key: str) -> int:
    """What the agent's API last heard of the disk's copy (bytes done)."""
    record = agent_client(ReplicationJob.objects.get(pk=job_id)).get(job_id) or {}
    return int(((record.get("disks") or {}).get(disk_key) or {}).get("bytes_transferred") or 0)


def committed_change_ids(vm) -> dict:
    return dict(SourceDisk.objects.filter(vm=vm).values_list("disk_key", "change_id"))


def live_images(sim, name):
    return {f"disk-{key}": path for key, path in sim.vms[name]["disks"].items()}


def test_source_killed_mid_incremental_removes_the_snapshot_and_advances_nothing(workers, vcenter, progress_poller):
    """5 (snapshots). Kill the snapshot's source nbdkit (the agent's) in an
    incremental."""
    sim, vc = vcenter(vm_spec("vm-src-cbt", [48 * MiB, 4 * MiB]))
    live = live_images(sim, "vm-src-cbt")
    fill_image(live["disk-2000"], [(0, 8 * MiB)], seed=1)
    workers.pair("cbt-src", COPY_LIMIT_BPS=str(8 * MiB))
    (vm,) = vmware_service.discover(vc, ["vm-src-cbt"])
    full = wait_for_job(start_replication(vm).id, timeout=120)
    assert full.status == JobStatus.COMPLETED, full.error_message
    before, history = committed_change_ids(vm), ChangeIdRecord.objects.count()

    fill_image(live["disk-2000"], [(i * 4 * MiB, MiB) for i in range(12)], seed=2)
    fill_image(live["disk-2001"], [(MiB, 3000)], seed=3)
    job = start_replication(vm, SyncType.INCREMENTAL)
    wait_until(lambda: bytes_done(job) > 2 * MiB and snapshot_source_pids(job.id), 60, "copy under way")
    moref = job.vm.moref
    killed = time.monotonic()
    for pid in snapshot_source_pids(job.id):
        os.kill(pid, signal.SIGKILL)
    job = wait_for_job(job.id, timeout=60)
    detect_s = time.monotonic() - killed
    cleanup_s = wait_for_no_snapshots(vc, moref)
    settle([job])
    advanced = committed_change_ids(vm) != before or ChangeIdRecord.objects.count() != history
    left, stuck = len(leftovers()), non_terminal_rows([job])

    retry = wait_for_job(start_replication(vm, SyncType.INCREMENTAL).id, timeout=120)
    settle([retry])
    figures = CaseFigures(
        "5 source nbdkit killed (snapshot)", sha256_match=sha256_match(retry, live),
        max_concurrent_copies=max_concurrent_of([job, retry]), leftovers=left + len(leftovers()),
        non_terminal_rows=stuck + non_terminal_rows([retry]), detect_s=round(detect_s, 2),
        note=f"snapshot removed {cleanup_s:.1f} s after; changeId advanced: {advanced}",
        extra={"snapshots_left": len(snapshots_left(vc, moref))})
    figures.result = ("pass" if job.status == JobStatus.FAILED and retry.status == JobStatus.COMPLETED
                      and not advanced else "FAIL")
    record(figures)
    assert job.status == JobStatus.FAILED
    assert re.search(r"disk-2000: read failed at offset \d+", job.error_message), job.error_message
    assert not advanced
    assert retry.status == JobStatus.COMPLETED, retry.error_message
    assert retry.disks.get(disk_key="disk-2000").bytes_total == 12 * MiB  # every change, against the old changeId
    assert figures.sha256_match and figures.leftovers == 0 and figures.non_terminal_rows == 0
    assert figures.extra["snapshots_left"] == 0 and figures.max_concurrent_copies == 1


def test_incremental_killed_halfway_then_more_writes_then_rerun_gets_every_block(workers, vcenter, progress_poller):
    """8. An incremental's agent worker is SIGKILLed halfway; the operator
    cancels it, the guest writes more, and the rerun copies both sets of
    changes."""
    sim, vc = vcenter(vm_spec("vm-incr-kill", [64 * MiB + 4097, 2 * MiB]))
    live = live_images(sim, "vm-incr-kill")
    fill_image(live["disk-2000"], [(0, 4 * MiB)], seed=1)
    _, first = workers.pair("incr-a", COPY_LIMIT_BPS=str(8 * MiB), REAPER_TIMEOUT_S="3")
    (vm,) = vmware_service.discover(vc, ["vm-incr-kill"])
    assert wait_for_job(start_replication(vm).id, timeout=120).status == JobStatus.COMPLETED
    before = committed_change_ids(vm)

    changed_a = [(i * 4 * MiB + 12345, MiB) for i in range(16)]  # 16 MiB spread over the disk
    fill_image(live["disk-2000"], changed_a, seed=2)
    job = start_replication(vm, SyncType.INCREMENTAL)
    wait_until(lambda: bytes_done(job) >= 7 * MiB, 60, "half the changes copied")
    first.kill()
    second = workers.agent("incr-b", COPY_LIMIT_BPS=str(8 * MiB))
    cancel_job(job.id, "worker lost; cancelled by the operator")
    cleanup_s = wait_for_no_snapshots(vc, vm.moref)
    # The reaper pass as beat runs it: a task on the OMA's worker (which also
    # sweeps the dead agent's source export from the shared temporary directory).
    wait_until(lambda: tasks.reap_stale.delay() and non_terminal_rows([job]) == 0, 30,
               "the killed copy's row closed by the reaper", 1.0)
    assert committed_change_ids(vm) == before

    changed_b = [(MiB, 5000), (64 * MiB + 4096, 1)]  # more writes, including the disk's last byte
    fill_image(live["disk-2000"], changed_b, seed=3)
    fill_image(live["disk-2001"], [(0, 10)], seed=4)
    rerun = wait_for_job(start_replication(vm, SyncType.INCREMENTAL).id, timeout=180)
    settle([job, rerun])
    second.stop()
    figures = CaseFigures(
        "8 incremental killed halfway, more writes, rerun", sha256_match=sha256_match(rerun, live),
        max_concurrent_copies=max_concurrent_of([job, rerun]), leftovers=len(leftovers()),
        non_terminal_rows=non_terminal_rows([job, rerun]),
        resume_s=round((rerun.completed_at - rerun.created_at).total_seconds(), 2),
        note=f"resume s: the rerun from start to end; snapshot removed {cleanup_s:.1f} s after the cancel; "
             f"rerun copied {rerun.disks.get(disk_key='disk-2000').bytes_total // 1024} KiB of disk-2000",
        extra={"snapshots_left": len(snapshots_left(vc, vm.moref))})
    figures.result = "pass" if rerun.status == JobStatus.COMPLETED and figures.sha256_match else "FAIL"
    record(figures)
    assert rerun.status == JobStatus.COMPLETED, rerun.error_message
    assert figures.sha256_match
    assert all(d.sync_type == SyncType.INCREMENTAL for d in rerun.disks.all())
    assert figures.leftovers == 0, leftovers()
    assert figures.non_terminal_rows == 0 and figures.extra["snapshots_left"] == 0
    assert figures.max_concurrent_copies == 1


def test_worker_killed_mid_incremental_resumes_from_its_checkpoint_on_the_same_snapshot(
        workers, vcenter, reaper_thread):
    """1 (snapshots). SIGKILL the worker halfway through an incremental: the
    reaper hands the disk to a new run, which asks vCenter for the same
    changed areas of the same snapshot and resumes from the checkpoint."""
    sim, vc = vcenter(vm_spec("vm-resume-cbt", [64 * MiB]))
    live = live_images(sim, "vm-resume-cbt")
    fill_image(live["disk-2000"], [(0, MiB)], seed=1)
    # 4 MiB/s: the committed cursor trails the reads by at most about a
    # second of copying (flush, then checkpoint, every 0.5 s), 4 MiB.
    _, first = workers.pair("resume-a", COPY_LIMIT_BPS=str(4 * MiB))
    (vm,) = vmware_service.discover(vc, ["vm-resume-cbt"])
    assert wait_for_job(start_replication(vm).id, timeout=120).status == JobStatus.COMPLETED
    changed = [(i * 4 * MiB, 2 * MiB) for i in range(16)]  # 32 MiB changed
    fill_image(live["disk-2000"], changed, seed=2)

    job = start_replication(vm, SyncType.INCREMENTAL)
    wait_until(lambda: bytes_done(job) >= 14 * MiB, 60, "half the changes copied")
    snapshot = ReplicationJob.objects.get(pk=job.id).snapshot_moref
    killed = time.time()
    first.kill()
    # What the killed run had read: at least what it last reported (it reports every 0.25 s).
    read_by_kill = reported_bytes(job.id, "disk-2000")
    workers.agent("resume-b", COPY_LIMIT_BPS=str(4 * MiB))
    job = wait_for_job(job.id, timeout=120)
    settle([job])
    runs = list(CopyAttempt.objects.filter(disk__job=job).order_by("number"))
    requeued = JobEvent.objects.filter(job=job, message__contains="silent for").first()
    figures = CaseFigures(
        "1 worker SIGKILL mid-incremental (snapshot)", sha256_match=sha256_match(job, live),
        bytes_recopied=read_by_kill + runs[-1].bytes_read - 32 * MiB,
        max_concurrent_copies=max_concurrent_of([job]), leftovers=len(leftovers()),
        non_terminal_rows=non_terminal_rows([job]), resume_s=round(runs[-1].started_at.timestamp() - killed, 2),
        detect_s=round(requeued.at.timestamp() - killed, 2) if requeued else None,
        note=f"32 MiB changed of 64 MiB, {read_by_kill // MiB} MiB reported when the agent was killed; "
             f"resumed at offset {runs[-1].resumed_from} on snapshot {snapshot}; recopied = reported by the "
             "killed run + read by the new one - 32 MiB",
        extra={"snapshots_left": len(snapshots_left(vc, vm.moref))})
    figures.result = "pass" if job.status == JobStatus.COMPLETED and figures.sha256_match else "FAIL"
    record(figures)
    assert job.status == JobStatus.COMPLETED, job.error_message
    assert figures.sha256_match
    assert [r.outcome for r in runs] == ["lost", "completed"]
    assert requeued is not None and "resuming from offset" in requeued.message
    assert runs[0].checkpoint_bytes > 0 and runs[1].resumed_from >= runs[0].checkpoint_bytes
    assert job.disks.get().bytes_total == 32 * MiB  # the same changed areas, not a full copy
    # The new run read exactly the changed data above the offset it resumed from.
    above = sum(max(0, offset + length - max(offset, runs[1].resumed_from)) for offset, length in changed)
    assert runs[1].bytes_read == above, (runs[1].bytes_read, above)
    assert figures.bytes_recopied < 8 * MiB, figures
    assert figures.max_concurrent_copies == 1 and figures.leftovers == 0 and figures.non_terminal_rows == 0
    assert figures.extra["snapshots_left"] == 0


def test_vcenter_steps_run_on_the_agent_and_volume_steps_on_the_oma(workers, vcenter):
    """With the OMA and the agent as separate workers (as on two hosts, only
    the agent reaching the vCenter), every step runs where it must: the
    agent, which has no database at all, runs the work orders (preflight,
    CBT and snapshot; the copies; the snapshot's removal); the OMA runs the
    job's steps and records every outcome."""
    sim, vc = vcenter(vm_spec("vm-split", [4 * MiB]))
    fill_image(live_images(sim, "vm-split")["disk-2000"], [(0, MiB)], seed=1)
    oma, agent = workers.pair("split")
    (vm,) = vmware_service.discover(vc, ["vm-split"])
    job = wait_for_job(start_replication(vm).id, timeout=60)
    assert job.status == JobStatus.COMPLETED, job.error_message
    assert sha256_match(job, live_images(sim, "vm-split"))
    # The snapshot's removal is the agent's last task; its outcome the OMA's,
    # and so is the retention of the recovery point the cycle sealed.
    wait_until(lambda: {"replication.snapshot_removed", "replication.retain_points"} <= set(oma.tasks_succeeded()),
               30, "the removal's outcome recorded and retention run")

    assert set(agent.tasks_succeeded()) == {"vma.prepare_source", "vma.copy_disk", "vma.remove_snapshot"}
    assert set(oma.tasks_succeeded()) == {"replication.prepare_job", "replication.source_prepared",
                                          "replication.disk_copied", "replication.snapshot_removed",
                                          "replication.job_ended", "replication.retain_points"}
    # The agent's worker has no database: its settings as it sees them.
    probe = agent.django("from django.conf import settings\n"
                         "from replication.models import ReplicationJob\n"
                         "print(settings.PROCESS_ROLE, settings.DATABASES['default']['ENGINE'])\n"
                         "try:\n    ReplicationJob.objects.count()\nexcept Exception as exc:\n"
                         "    print('refused:', type(exc).__name__)\n")
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split("\n")[:2] == ["agent django.db.backends.dummy", "refused: ImproperlyConfigured"]
    assert "ImproperlyConfigured" not in agent.log_text()

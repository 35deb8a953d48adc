"""A copy that runs past its task's soft time limit (the OMA sizes it from
the disk and sends it with the order; Celery raises it by a signal in the
middle of the agent's copy loop) stops its copy threads before their
connections close and reports a failed outcome with the reason; the OMA
fails the disk and the job, and nothing is left running."""

from __future__ import annotations

import pytest

from replication.choices import DiskStatus, JobStatus
from replication.models import CopyAttempt
from replication.services.inventory import register_image_vm
from replication.services.jobs import start_replication
from tests.faults.harness import CaseFigures, leftovers, non_terminal_rows, record, settle
from tests.helpers import MiB, make_image, wait_for_job

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def test_copy_past_its_soft_time_limit_fails_cleanly_with_the_reason(workers, tmp_path):
    image = make_image(tmp_path / "slow.img", 32 * MiB, [(0, 32 * MiB)], seed=21)
    # Soft limit 2 s (base 2 s + capacity at an absurd minimum rate); the copy needs 8 s at 4 MiB/s.
    # The limits are the OMA's settings (it sends them with the order); the rate is the agent's.
    _, worker = workers.pair("time-limit", COPY_LIMIT_BPS=str(4 * MiB), COPY_TIME_LIMIT_BASE_S="2",
                             COPY_MIN_THROUGHPUT_BPS=str(10**15), COPY_TIME_LIMIT_GRACE_S="30")
    job = wait_for_job(start_replication(register_image_vm("vm-time-limit", [str(image)])).id, timeout=60)
    settle([job])
    disk = job.disks.get()
    (attempt,) = CopyAttempt.objects.filter(disk=disk)
    figures = CaseFigures("6c copy past its soft time limit", leftovers=len(leftovers()),
                          non_terminal_rows=non_terminal_rows([job]), note=f"reason: {job.error_message[:90]}")
    figures.result = "pass" if job.status == JobStatus.FAILED and "time limit" in job.error_message else "FAIL"
    record(figures)
    assert job.status == JobStatus.FAILED
    assert job.error_message == "disk-2000: copy exceeded its time limit (2 s)"
    assert disk.status == DiskStatus.FAILED and attempt.outcome == CopyAttempt.Outcome.FAILED
    # The cursor committed before it stopped, as the agent's outcome reported it.
    assert 0 < attempt.checkpoint_bytes < 32 * MiB
    assert attempt.reason == "copy exceeded its time limit (2 s)" and attempt.worker
    assert figures.leftovers == 0 and figures.non_terminal_rows == 0
    assert "Segmentation fault" not in worker.log_text() and "WorkerLostError" not in worker.log_text()

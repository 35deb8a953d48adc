import re

import pytest

from replication.choices import DiskStatus, JobStatus, Stage
from replication.models import ReplicationJob, new_job_id, transfer_percent
from replication.services.inventory import register_image_vm
from replication.services.jobs import ReplicationError, cancel_job, fail_job, start_replication
from tests.helpers import MiB, make_image

pytestmark = pytest.mark.django_db


@pytest.fixture
def vm(tmp_path, monkeypatch):
    # These tests exercise state only: enqueueing is recorded, not sent.
    monkeypatch.setattr("replication.services.jobs.enqueue_prepare", lambda *args: None)
    return register_image_vm("vm-state", [str(make_image(tmp_path / "a.img", MiB, [(0, 4096)]))])


def test_job_id_has_migratekits_form():
    assert re.fullmatch(r"job-\d{8}-\d{6}\.\d{3}-[0-9a-f]{6}", new_job_id())


def test_transfer_maps_copy_onto_30_to_100_percent():
    assert transfer_percent(0, 100) == 30
    assert transfer_percent(50, 100) == 65
    assert transfer_percent(100, 100) == 100
    assert transfer_percent(0, 0) == 100, "a cycle with nothing to copy ends at 100 %"


def test_start_creates_job_disks_and_one_volume_per_disk(vm):
    job = start_replication(vm)
    assert job.status == JobStatus.PENDING
    disk = job.disks.get()
    assert disk.status == DiskStatus.PENDING
    assert disk.target_volume.source_disk == vm.disks.get()
    assert disk.target_volume.export_name.startswith("migration-vol-")


def test_one_active_job_per_vm(vm):
    job = start_replication(vm)
    with pytest.raises(ReplicationError, match=f"already has an active job {job.id}"):
        start_replication(vm)
    fail_job(job.id, "boom")
    second = start_replication(vm)
    assert second.disks.get().target_volume == job.disks.get().target_volume, "volumes are reused"


def test_incremental_of_an_image_vm_is_refused(vm):
    with pytest.raises(ReplicationError, match="only a full copy"):
        start_replication(vm, "incremental")
    assert not ReplicationJob.objects.exists()


def test_terminal_states_are_final(vm):
    job = start_replication(vm)
    assert job.complete() is False, "pending cannot jump to completed"
    assert cancel_job(job.id) is True
    job.refresh_from_db()
    assert job.status == JobStatus.CANCELLED and job.current_operation == Stage.CANCELLED
    assert job.disks.get().status == DiskStatus.CANCELLED
    assert job.fail("late error") is False
    assert job.enter_stage(Stage.INITIALIZING, JobStatus.PREPARING) is False
    job.refresh_from_db()
    assert job.status == JobStatus.CANCELLED and job.error_message == "cancelled by the operator"


def test_a_copy_run_is_numbered_once(vm):
    disk = start_replication(vm).disks.get()
    stale_copy = disk.__class__.objects.get(pk=disk.pk)
    assert disk.start_attempt("task-a") is True
    assert stale_copy.start_attempt("task-b") is False  # it read the disk before the first run started
    disk.refresh_from_db()
    assert disk.attempts == 1 and disk.celery_task_id == "task-a" and disk.status == DiskStatus.COPYING


def test_job_stages_follow_the_ossea_omas_percentages(vm):
    job = start_replication(vm)
    assert job.enter_stage(Stage.INITIALIZING, JobStatus.PREPARING)
    assert job.progress_percent == 5
    job.set_stage(Stage.SETTING_UP_NBD)
    job.refresh_from_db()
    assert job.progress_percent == 20
    assert job.enter_stage(Stage.TRANSFER, JobStatus.REPLICATING)
    assert job.progress_percent == 30


def test_change_id_is_committed_only_for_a_written_disk_and_only_once(vm):
    job = start_replication(vm)
    disk = job.disks.get()
    disk.__class__.objects.filter(pk=disk.pk).update(change_id="52 aa-bb/7", previous_change_id="52 aa-bb/6")
    disk.refresh_from_db()
    with pytest.raises(ValueError, match="cannot be committed"):
        disk.commit_change_id()
    assert vm.disks.get().change_id == ""
    assert disk.start_attempt("t")
    assert disk.complete(bytes_total=1, bytes_zeroed=0, throughput_bps=1)
    assert disk.commit_change_id() is True
    assert disk.commit_change_id() is False  # a finalize run twice records it once
    assert vm.disks.get().change_id == "52 aa-bb/7"
    (record,) = vm.disks.get().change_id_history.all()
    assert (record.job_id, record.previous_change_id, record.change_id) == (job.id, "52 aa-bb/6", "52 aa-bb/7")


def test_a_silent_copy_is_judged_lost_only_once_the_database_has_been_up_long_enough(vm, settings):
    from datetime import timedelta

    from django.db import connection
    from django.utils import timezone

    from replication.models import CopyAttempt, VMDisk, database_up_since

    job = start_replication(vm)
    disk = job.disks.get()
    assert disk.start_attempt("first")
    VMDisk.objects.filter(pk=disk.pk).update(heartbeat_at=timezone.now() - timedelta(hours=1))
    disk.refresh_from_db()
    if connection.vendor == "mysql":
        # Just after a restart, every heartbeat looks old: the server refused
        # them, the copy may well be alive. Pretend the server started recently.
        up_for = (timezone.now() - database_up_since()).total_seconds()
        settings.HEARTBEAT_TIMEOUT_S = up_for + 600
        assert VMDisk.lost_before(timezone.now(), database_up_since()) is None
    settings.HEARTBEAT_TIMEOUT_S = 60
    assert disk.heartbeat_at < VMDisk.lost_before(timezone.now(), database_up_since())
    read_before = VMDisk.objects.get(pk=disk.pk)
    assert disk.start_attempt("second", taking_over=True)
    assert disk.attempts == 2 and disk.celery_task_id == "second"
    assert read_before.start_attempt("third", taking_over=True) is False  # another reaper pass lost the race
    assert list(CopyAttempt.objects.filter(disk=disk).values_list("number", "outcome")) == [
        (1, CopyAttempt.Outcome.LOST), (2, CopyAttempt.Outcome.RUNNING)]

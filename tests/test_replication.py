"""End to end: a real Celery worker process, real Redis, real nbdkit source
and target servers, real libnbd. Data is checked by content."""


import pytest

from replication.choices import DISK_TERMINAL, DiskStatus, JobStatus
from replication.models import ReplicationJob, TargetVolume, VMDisk
from replication.services.inventory import register_image_vm
from replication.services.jobs import start_replication
from tests.helpers import (
    MiB,
    NbdkitProcess,
    make_image,
    replica_sha256,
    sha256,
    slow_nbd_source,
    source_exports_running,
    wait_for_job,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def two_disk_vm(tmp_path, name="vm-two-disks"):
    data_disk = make_image(tmp_path / "d0.img", 12 * MiB + 4097, [(0, 9 * MiB), (12 * MiB, 4097)], seed=1)
    sparse_disk = make_image(tmp_path / "d1.img", 40 * MiB + 333,
                             [(3 * MiB + 5, 70_000), (40 * MiB - 10, 343)], seed=2)
    return register_image_vm(name, [str(data_disk), str(sparse_disk)]), [data_disk, sparse_disk]


def assert_nothing_left_running(job):
    """A terminal job's copies stop within seconds and leave no source export."""
    assert job.status in {JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED}
    wait_until(lambda: not job.disks.exclude(status__in=DISK_TERMINAL).exists(), 10,
               f"every disk of {job.id} to end")
    wait_until(lambda: not source_exports_running(), 10, "the source exports to close")


def test_two_disk_vm_replicates_byte_for_byte(celery_worker_process, tmp_path):
    vm, images = two_disk_vm(tmp_path)
    job = wait_for_job(start_replication(vm).id)

    assert job.status == JobStatus.COMPLETED, job.error_message
    assert job.progress_percent == 100.0
    disks = list(job.disks.order_by("disk_key"))
    assert [d.disk_key for d in disks] == ["disk-2000", "disk-2001"]
    for disk, image in zip(disks, images, strict=True):
        assert disk.status == DiskStatus.COMPLETED
        assert disk.progress_percent == 100.0
        assert disk.bytes_done == disk.bytes_total
        assert replica_sha256(disk) == sha256(image)
        assert disk.target_volume.export_name == f"migration-vol-{disk.target_volume.volume_uuid}"
    assert job.total_bytes == sum(d.bytes_total for d in disks)
    assert job.bytes_transferred == job.total_bytes
    # Progress measures data to copy, not capacity: the sparse disk is mostly holes.
    assert disks[1].bytes_total < disks[1].capacity_bytes // 4
    assert job.completed_at and job.started_at
    statuses = [s for i, s in enumerate(job.events.values_list("status", flat=True)) if i == 0 or s != prev(job, i)]
    assert statuses == ["pending", "preparing", "replicating", "finalizing", "completed"]
    assert list(job.events.filter(status="preparing").values_list("stage", flat=True)) == [
        "Initializing", "Setting up NBD", "Preparing Migration"]
    assert_nothing_left_running(job)


def prev(job, index):
    return job.events.values_list("status", flat=True)[index - 1]


def test_second_replication_reuses_volumes_and_follows_source_changes(celery_worker_process, tmp_path):
    vm, images = two_disk_vm(tmp_path, "vm-reused")
    first = wait_for_job(start_replication(vm).id)
    assert first.status == JobStatus.COMPLETED, first.error_message
    volumes_before = set(TargetVolume.objects.values_list("volume_uuid", flat=True))

    # Data removed from the source must disappear from the target too.
    make_image(images[0], 12 * MiB + 4097, [(6 * MiB, MiB)], seed=9)
    second = wait_for_job(start_replication(vm).id)

    assert second.status == JobStatus.COMPLETED, second.error_message
    assert set(TargetVolume.objects.values_list("volume_uuid", flat=True)) == volumes_before
    for disk, image in zip(second.disks.order_by("disk_key"), images, strict=True):
        assert replica_sha256(disk) == sha256(image)


def test_missing_source_image_fails_the_job_with_the_reason(celery_worker_process, tmp_path):
    vm, images = two_disk_vm(tmp_path, "vm-lost-image")
    images[1].unlink()
    job = wait_for_job(start_replication(vm).id)

    assert job.status == JobStatus.FAILED
    assert "disk-2001" in job.error_message and "does not exist" in job.error_message
    assert job.disks.get(disk_key="disk-2001").status == DiskStatus.FAILED
    assert_nothing_left_running(job)


def test_source_server_gone_before_copy_fails_the_job(celery_worker_process, tmp_path, sockdir):
    image = make_image(tmp_path / "src.img", 4 * MiB, [(0, MiB)])
    server = NbdkitProcess(sockdir, "--readonly", "file", str(image))
    vm = register_image_vm("vm-refusing", [server.uri])
    server.stop()
    job = wait_for_job(start_replication(vm).id)

    assert job.status == JobStatus.FAILED
    assert job.error_message.startswith("disk-2000: cannot connect to nbd+unix://")
    assert_nothing_left_running(job)


def test_source_killed_mid_copy_fails_the_job_and_stops_the_other_disk(celery_worker_process, progress_poller,
                                                                      tmp_path, sockdir):
    slow_image = make_image(tmp_path / "slow.img", 64 * MiB, [(0, 64 * MiB)], seed=4)
    other_image = make_image(tmp_path / "other.img", 64 * MiB, [(0, 64 * MiB)], seed=5)
    slow, other = slow_nbd_source(sockdir, slow_image, "100ms"), slow_nbd_source(sockdir, other_image, "300ms")
    try:
        vm = register_image_vm("vm-dying-source", [slow.uri, other.uri])
        job = start_replication(vm)
        wait_until(lambda: VMDisk.objects.filter(job=job, disk_key="disk-2000", bytes_done__gt=0).exists(), 60,
                   "the copy to start")
        slow.kill()
        job = wait_for_job(job.id, timeout=60)
        assert_nothing_left_running(job)
    finally:
        slow.stop()
        other.stop()

    assert job.status == JobStatus.FAILED
    assert job.error_message.startswith("disk-2000: read failed at offset ")
    assert job.disks.get(disk_key="disk-2000").status == DiskStatus.FAILED
    # The healthy disk's copy noticed the job's end and stopped itself.
    assert job.disks.get(disk_key="disk-2001").status == DiskStatus.CANCELLED
    assert not ReplicationJob.objects.filter(status=JobStatus.REPLICATING).exists()

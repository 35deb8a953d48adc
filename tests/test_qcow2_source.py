"""qcow2 images as change-tracking sources: each cycle's writes recorded in
a qemu persistent dirty bitmap, read through qemu-nbd. Real qemu-img,
qemu-io and qemu-nbd, real OMA and agent workers; data checked by sha256
against the image's guest-visible content (qemu-img convert -O raw)."""

import os
import subprocess
from pathlib import Path

import pytest

from replication.choices import JobStatus, SourceKind, SyncType
from replication.services.inventory import InventoryError, register_image_vm
from replication.services.jobs import ReplicationError, cancel_job, start_replication
from tests.helpers import (
    MiB,
    agent_bytes_copied,
    make_image,
    replica_sha256,
    sha256,
    source_exports_running,
    wait_for_job,
    wait_until,
)
from vma_agent import qcow2

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]
KiB = 1024


def qemu_io(image, *commands):
    args = ["qemu-io", "-f", "qcow2"]
    for command in commands:
        args += ["-c", command]
    done = subprocess.run([*args, str(image)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr + done.stdout


def raw_sha256(image, tmp_path):
    raw = tmp_path / "guest-view.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image), str(raw)], check=True)
    return sha256(raw)


def replicate(vm, sync_type=SyncType.INCREMENTAL, **options):
    job = wait_for_job(start_replication(vm, sync_type, **options).id)
    assert job.status == JobStatus.COMPLETED, job.error_message
    return job, job.disks.get()


def test_qcow2_cycles_copy_only_the_dirty_clusters_and_a_failed_cycles_writes_come_next(
        celery_worker_process, tmp_path):
    image = tmp_path / "guest.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", str(image), "24M"], check=True, capture_output=True)
    qemu_io(image, "write -P 0x11 0 8M", "write -P 0x22 12M 1M")
    vm = register_image_vm("qcow-vm", [str(image)])
    assert vm.source_kind == SourceKind.QCOW2 and vm.disks.get().capacity_bytes == 24 * MiB

    first, disk = replicate(vm)  # the first cycle is full, whatever was asked
    assert disk.sync_type == SyncType.FULL and "no committed dirty bitmap yet" in disk.full_copy_reason
    assert replica_sha256(disk) == raw_sha256(image, tmp_path)
    assert vm.disks.get().change_id == f"oma-{first.id}"

    # The guest writes (qemu-io): 4 KiB inside one 64 KiB cluster, a whole
    # cluster, and 4 KiB across a cluster boundary: 4 clusters dirty.
    qemu_io(image, "write -P 0x33 1052672 4k", "write -P 0x44 10M 64k", "write -P 0x55 20903936 4k")
    job, disk = replicate(vm)
    assert disk.sync_type == SyncType.INCREMENTAL
    assert disk.bytes_total == 4 * 64 * KiB, disk.bytes_total  # only the dirty clusters
    assert replica_sha256(disk) == raw_sha256(image, tmp_path)
    assert vm.disks.get().change_id == f"oma-{job.id}"
    # The bitmap this cycle copied stays, frozen, until the next cycle drops it.
    assert {name: b["recording"] for name, b in qcow2.bitmaps(str(image)).items()} == {
        f"oma-{first.id}": False, f"oma-{job.id}": True}

    job, disk = replicate(vm)  # nothing written since
    assert disk.bytes_total == 0 and replica_sha256(disk) == raw_sha256(image, tmp_path)

    # A cycle that ends before its copy does: its writes must come with the next one.
    qemu_io(image, "write -P 0x66 2M 4M")
    base = vm.disks.get().change_id
    failed = start_replication(vm, SyncType.INCREMENTAL, bandwidth_limit_bps=MiB)
    wait_until(lambda: agent_bytes_copied(failed.id, "disk-2000") >= MiB, 60, "the copy under way")
    assert cancel_job(failed.id)
    # qemu-nbd holds the image's lock while it serves: the guest writes once the copy has stopped.
    wait_until(lambda: not source_exports_running(), 30, "the cancelled copy's source export to close")
    qemu_io(image, "write -P 0x77 15M 64k")
    job, disk = replicate(vm)
    assert disk.bytes_total == 4 * MiB + 64 * KiB, disk.bytes_total
    assert replica_sha256(disk) == raw_sha256(image, tmp_path)
    # The failed cycle's bitmap was folded into the committed one, and removed.
    assert {name: b["recording"] for name, b in qcow2.bitmaps(str(image)).items()} == {
        base: False, f"oma-{job.id}": True}


def test_a_raw_image_stays_full_only_with_the_reason_and_mixed_disks_are_refused(db, tmp_path):
    raw = make_image(tmp_path / "raw.img", MiB, [(0, MiB)])
    vm = register_image_vm("raw-vm", [str(raw)])
    assert vm.source_kind == SourceKind.IMAGE
    with pytest.raises(ReplicationError, match="raw image source without change tracking; only a full copy"):
        start_replication(vm, SyncType.INCREMENTAL)
    image = tmp_path / "a.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", str(image), "1M"], check=True, capture_output=True)
    with pytest.raises(InventoryError, match="all raw .* or all qcow2"):
        register_image_vm("mixed-vm", [str(raw), str(image)])
    vmdk = tmp_path / "a.vmdk"
    subprocess.run(["qemu-img", "create", "-f", "vmdk", str(vmdk), "1M"], check=True, capture_output=True)
    with pytest.raises(InventoryError, match="is vmdk, neither raw nor qcow2"):
        register_image_vm("vmdk-vm", [str(vmdk)])


def test_a_guest_holding_the_image_for_a_moment_is_waited_out(tmp_path):
    """A writer's hold on the image's lock (a guest's burst) delays a cycle's
    bitmap step instead of failing the cycle."""
    image = tmp_path / "held.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", str(image), "1M"], check=True, capture_output=True)
    # qemu-io holds the image (and its write lock) for 1.5 s, then exits.
    holder = subprocess.Popen(["qemu-io", "-f", "qcow2", "-c", "sleep 1500", str(image)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def holding() -> bool:
        """qemu-io has the image open (qemu takes its locks as it opens it)."""
        try:
            return any(os.readlink(fd) == str(image) for fd in Path(f"/proc/{holder.pid}/fd").iterdir())
        except OSError:  # not started yet, or an fd closed as we looked
            return False

    try:
        wait_until(holding, 10, "qemu-io to hold the image open")
        qcow2.freeze(str(image), "", "oma-job-held")  # waits until it lets go, then succeeds
        assert holder.wait(10) == 0
    finally:
        holder.kill()
        holder.wait()
    assert qcow2.bitmaps(str(image))["oma-job-held"]["recording"] is True

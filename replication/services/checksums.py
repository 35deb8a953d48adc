"""Verify a VM's replicas: the sha256 of each image-file disk against its
local target volume. `manage.py checksums` compares at once; the VM's
settings page starts the same comparison as a task and shows its outcome
(a ChecksumRun)."""

from __future__ import annotations

import hashlib

from replication import dispatch
from replication.models import ChecksumRun, VirtualMachine
from replication.services.inventory import is_nbd_uri
from vma_agent import task_names

READ_BYTES = 4 * 1024 * 1024
MATCH, MISMATCH, NOT_COMPARABLE = "match", "mismatch", "not comparable"


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(READ_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def compare(vm: VirtualMachine) -> list[dict]:
    """One entry per disk: {disk, source, target, verdict}; an NBD source or a
    disk without a local volume is not comparable here."""
    disks = []
    for disk in vm.disks.select_related("target_volume").order_by("disk_key"):
        volume = getattr(disk, "target_volume", None)
        if is_nbd_uri(disk.locator) or volume is None or not volume.path:
            disks.append({"disk": disk.disk_key, "source": "", "target": "", "verdict": NOT_COMPARABLE})
            continue
        source, target = file_sha256(disk.locator), file_sha256(volume.path)
        disks.append({"disk": disk.disk_key, "source": source, "target": target,
                      "verdict": MATCH if source == target else MISMATCH})
    return disks


def start(vm: VirtualMachine, actor: str) -> ChecksumRun:
    """A comparison run as a task on the OMA's queue; the run says how it ended."""
    run = ChecksumRun.objects.create(vm=vm, actor=actor[:100])
    dispatch.enqueue_on_commit(task_names.COMPARE_CHECKSUMS, [run.pk], what="the checksum comparison",
                               subject=vm.name, on_failure=lambda reason: run.finish(error=reason))
    return run


def run(run_id: int) -> None:
    """The task's body: compare and record the outcome (an unreadable file: failed, with the reason)."""
    checksum_run = ChecksumRun.objects.select_related("vm").get(pk=run_id)
    try:
        disks = compare(checksum_run.vm)
    except OSError as exc:
        checksum_run.finish(error=f"cannot read a disk: {exc}")
        return
    checksum_run.finish(disks)

"""The OMA <-> agent contract: an outcome travels as a dict and comes back
as it was; a malformed order or outcome is refused where it crosses the
boundary, naming the field and the reason; one rule says which snapshots
are orphans."""

import json

import pytest

from vma_agent.contract import (
    CopyOrder,
    DiskCopied,
    FrozenDisk,
    OrderError,
    OutcomeError,
    SnapshotRef,
    SourcePowered,
    SourcePrepared,
    VCenterRef,
)
from vma_agent.vmware import SnapshotInfo, VMInfo, orphan_snapshots, snapshot_name

VCENTER = VCenterRef(name="vc1", host="vc.example", port=443, username="u", thumbprint="AB:CD")


def wire(message) -> dict:
    """As Celery's JSON carries it."""
    return json.loads(json.dumps(message.as_dict()))


def test_outcomes_and_orders_survive_the_wire():
    prepared = SourcePrepared(snapshot_moref="snapshot-1", snapshot_name="oma-repl-job-1", removed_orphans=["s-0"],
                              shape={"cpus": 2}, cbt_enabled=True,
                              disks={"disk-2000": FrozenDisk(change_id="52 a/3", backing_file="[ds] a.vmdk",
                                                             device_key=2000)})
    copied = DiskCopied(status="completed", worker="vma:1", resume_from=4096, resume_checkpoint=8192,
                        resume_differed_at=4096, bytes_total=10, bytes_zeroed=0, throughput_bps=5)
    order = CopyOrder(job_id="job-1", disk_key="disk-2000", attempt=2, export_name="migration-vol-x", source_locator="",
                      target_uri="nbd://t", capacity_bytes=1 << 20, sync_type="full",
                      snapshot=SnapshotRef(VCENTER, "vm-1", "snapshot-1", 2000, "[ds] a.vmdk", "*"))
    assert SourcePrepared.from_dict(wire(prepared)) == prepared
    assert DiskCopied.from_dict(wire(copied)) == copied
    assert CopyOrder.from_dict(wire(order)) == order
    # Fields left empty stay off the wire; the reader gets them back as None.
    assert "resume_compared" not in wire(copied) and DiskCopied.from_dict(wire(copied)).resume_compared is None
    assert copied.checkpoint_resumed == 8192
    # A newer side may send fields this one does not know.
    assert SourcePowered.from_dict({"how": "powered on", "seconds": 1, "later": True}).how == "powered on"


@pytest.mark.parametrize("data, reason", [
    ({"bytes_total": 1}, "missing 1 required positional argument: 'status'"),
    ({"status": "exploded"}, "DiskCopied.status must be one of completed, failed"),
    ({"status": "completed", "bytes_total": 1}, "a completed DiskCopied needs bytes_total, bytes_zeroed"),
    ({"status": "failed", "bytes_read": "12"}, "DiskCopied.bytes_read must be int, not str '12'"),
    ({"status": "failed", "bytes_read": True}, "DiskCopied.bytes_read must be int, not bool"),
    ("completed", "DiskCopied must be a JSON object, not str"),
])
def test_a_malformed_outcome_is_refused_with_the_reason(data, reason):
    with pytest.raises(OutcomeError, match=reason):
        DiskCopied.from_dict(data)


def test_a_malformed_nested_outcome_or_order_is_refused():
    with pytest.raises(OutcomeError, match="FrozenDisk.device_key must be int"):
        SourcePrepared.from_dict({"disks": {"disk-2000": {"change_id": "", "backing_file": "", "device_key": "2000"}}})
    with pytest.raises(OrderError, match="CopyOrder.attempt must be int, not str"):
        CopyOrder.from_dict({"job_id": "j", "disk_key": "d", "attempt": "1", "export_name": "e", "source_locator": "",
                             "target_uri": "t", "capacity_bytes": 1, "sync_type": "full"})
    with pytest.raises(OrderError, match="VCenterRef.port must be int"):
        SnapshotRef.from_dict({"vcenter": {**VCENTER.as_dict(), "port": "443"}, "vm_moref": "vm-1",
                               "snapshot_moref": "s", "device_key": 1, "backing_file": "", "against_change_id": "*"})


@pytest.mark.django_db  # a well-formed outcome's sender is checked against its job's agent
def test_the_oma_task_refuses_a_malformed_outcome_before_any_service_reads_it(monkeypatch):
    from replication import tasks

    called = []
    monkeypatch.setattr("replication.services.jobs.disk_copied", lambda *args: called.append(args))
    with pytest.raises(OutcomeError, match="DiskCopied.status"):
        tasks.disk_copied.run("job-1", "disk-2000", 1, {"status": 3})
    assert called == []
    tasks.disk_copied.run("job-1", "disk-2000", 1, {"status": "failed", "reason": "boom"})
    assert called == [("job-1", "disk-2000", 1, DiskCopied(status="failed", reason="boom"))]


def test_an_orphan_is_a_snapshot_of_ours_whose_job_is_not_running():
    info = VMInfo(moref="vm-1", name="web01", uuid="", power_state="", firmware="", guest_os="", cbt_enabled=True,
                  disks=[], nics=[], snapshots=[SnapshotInfo(snapshot_name("job-running"), "s-1"),
                                               SnapshotInfo(snapshot_name("job-ended"), "s-2"),
                                               SnapshotInfo("before-upgrade", "s-3")])
    assert [s.moref for s in orphan_snapshots(info, {"job-running"})] == ["s-2"]
    assert [s.moref for s in orphan_snapshots(info, set())] == ["s-1", "s-2"]

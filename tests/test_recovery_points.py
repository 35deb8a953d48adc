"""Recovery points with real parts: the vCenter simulator with a bootable
disk, real OMA and agent workers, qemu-nbd layers, libvirt and QEMU (TCG
where KVM cannot run a guest), each boot checked on the guest's own console.

The day the product exists for: the VMware site is lost while a cycle is
copying. The cut-off cycle must leave the last point untouched, a test
failover must boot it beside the stuck cycle, and a live failover with the
source site lost must boot it with nothing asked of the lost site; an agent
that comes back afterwards must not be able to write anywhere."""

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from replication.choices import FailoverStatus, JobStatus, SyncType, VMState
from replication.models import (
    CopyAttempt,
    FailoverJob,
    ProtectionGroup,
    RecoveryPoint,
    ReplicationJob,
    VirtualMachine,
    VMContext,
)
from replication.services import vmware as vmware_service
from replication.services.jobs import start_replication
from simulators.boot_disk import boot_disk_builder
from simulators.vcenter import vm_spec
from tests.helpers import (
    MiB,
    agent_bytes_copied,
    layer_sha256,
    replica_sha256,
    sha256,
    start_worker,
    stop_worker,
    wait_for_job,
    wait_until,
)
from tests.test_failover_live import command, domains, failover, isolated_network  # noqa: F401 (a fixture)

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

boot_disk = boot_disk_builder()
DISK_BYTES = 96 * MiB


def boot_vm(vcenter, tmp_path, name: str, marker: str):
    """A VM in the vCenter simulator whose disk is the bootable test disk
    showing `marker`, discovered: (VM, its live disk image)."""
    sim, record = vcenter(vm_spec(name, [DISK_BYTES], cbt=True, firmware="bios", cpus=1, memory_mib=256))
    live = Path(sim.vms[name]["disks"]["2000"])
    boot_disk.build_boot_disk(tmp_path / "boot.img", marker)
    with open(tmp_path / "boot.img", "ab") as f:
        f.truncate(DISK_BYTES)
    live.write_bytes((tmp_path / "boot.img").read_bytes())
    (vm,) = vmware_service.discover(record, [name])
    return sim, vm, live


def layer_servers() -> list[str]:
    """qemu-nbd processes serving a cycle's layer, by command line."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmdline and cmdline[0].endswith(b"qemu-nbd"):
            found.append(b" ".join(cmdline).decode(errors="replace"))
    return found


@pytest.fixture
def workers(django_db_setup, data_plane_root, vma_server):
    """The OMA's worker and the agent's, the agent's killable on its own."""
    import redis
    from django.conf import settings

    redis.Redis.from_url(settings.CELERY_BROKER_URL).flushdb()
    procs = {"oma": start_worker("oma", "rp-oma"), "agent": start_worker("agent", "rp-agent")}
    yield procs
    for proc in procs.values():
        if proc.poll() is None:
            with_signal(proc, signal.SIGCONT)
            stop_worker(proc)


def with_signal(proc, sig) -> None:
    os.killpg(proc.pid, sig)


def write_guest_data(live: Path, marker: str, mib: int) -> None:
    """The guest writes its marker and `mib` MiB more, spread over the disk."""
    boot_disk.set_marker(live, marker)
    with open(live, "r+b") as f:
        for i in range(mib):
            f.seek(32 * MiB + i * (DISK_BYTES - 40 * MiB) // mib)
            f.write(os.urandom(MiB))


def test_the_site_lost_mid_cycle_still_fails_over_to_the_last_point_and_a_returning_agent_writes_nowhere(
        workers, vcenter, tmp_path, settings, isolated_network):  # noqa: F811
    sim, vm, live = boot_vm(vcenter, tmp_path, "dr01", "A")
    full = wait_for_job(start_replication(vm).id, timeout=240)
    assert full.status == JobStatus.COMPLETED, full.error_message
    point_a = full.recovery_point
    a_sha = replica_sha256(full.disks.get())
    assert a_sha == sha256(live)

    # The guest writes B and 24 MiB more; a slow incremental starts copying them.
    write_guest_data(live, "B", 24)
    cycle = start_replication(vm, SyncType.INCREMENTAL, bandwidth_limit_bps=2 * MiB)
    wait_until(lambda: agent_bytes_copied(cycle.id, "disk-2000") >= 3 * MiB, 120, "3 MiB of the incremental")
    # The site goes dark: the agent's host is cut off mid-copy (frozen, as a
    # partition leaves it: it may come back) and vCenter is gone.
    with_signal(workers["agent"], signal.SIGSTOP)
    sim.stop()
    assert ReplicationJob.objects.get(pk=cycle.id).status == JobStatus.REPLICATING

    # A test failover runs beside the stuck cycle and boots the last point: marker A.
    command("set_boot_check", "dr01", "--regex", "BOOT-MARKER: A", "--timeout", "240")
    test = failover("dr01", "--test")
    assert test["boot_verified"] and test["console_match"].endswith("BOOT-MARKER: A"), test
    assert test["recovery_point"] == point_a.pk
    command("failover_end", "dr01")
    assert test["destination_vm"] not in domains()

    command("network_map", "VM Network", isolated_network)
    # The live failover with the source site lost: the cycle fenced, no power
    # order, no final cycle, point A on the production side.
    live_report = failover("dr01", "--live", "--source-lost", "--yes")
    assert live_report["status"] == FailoverStatus.SUCCEEDED, live_report
    assert live_report["console_match"].endswith("BOOT-MARKER: A")
    names = [s["name"] for s in live_report["steps"]]
    assert "shut down source" not in names and "final incremental" not in names, names
    assert live_report["downtime_s"] > 0
    fenced = ReplicationJob.objects.get(pk=cycle.id)
    assert fenced.status == JobStatus.CANCELLED and "source site is lost" in fenced.error_message
    assert not [s for s in layer_servers() if cycle.id in s], layer_servers()
    assert VMContext.of(vm).state == VMState.FAILED_OVER_LIVE
    assert list(RecoveryPoint.sealed(vm)) == [point_a]

    # The agent comes back and goes on with its copy: its export is gone, it
    # writes nowhere; point A and the running VM's disks are as they were.
    with_signal(workers["agent"], signal.SIGCONT)
    wait_until(lambda: fenced_attempt_ended(cycle.id), 120, "the returning agent's copy to give up")
    assert layer_sha256(point_a.layers.get().handle, DISK_BYTES) == a_sha
    overlay = FailoverJob.objects.get(pk=live_report["id"]).protection[0]
    assert backing_of(overlay) == point_a.layers.get().handle

    # Rollback leaves nothing behind: no domain, no overlay, no layer server.
    rollback = json.loads(command("rollback", "dr01", "--wait", "--json"))
    assert rollback["status"] == FailoverStatus.SUCCEEDED, rollback
    power = {s["name"]: s for s in rollback["steps"]}["power on source"]
    assert power["detail"].startswith("not asked"), power
    assert live_report["destination_vm"] not in domains()
    assert not Path(overlay).exists()
    assert not [s for s in layer_servers() if cycle.id in s]
    assert replica_sha256(full.disks.get()) == a_sha


def fenced_attempt_ended(job_id: str) -> bool:
    return CopyAttempt.objects.filter(disk__job_id=job_id, ended_at__isnull=False).exists()


def backing_of(image: str) -> str:
    info = subprocess.run(["qemu-img", "info", "-U", "--output=json", image], capture_output=True, text=True,
                          check=True, timeout=60)
    return json.loads(info.stdout).get("backing-filename", "")


def test_cycles_go_on_during_a_test_failover_and_retention_keeps_three_points_that_each_boot_their_marker(
        workers, vcenter, tmp_path, settings):
    sim, vm, live = boot_vm(vcenter, tmp_path, "rp01", "1")
    # Its group keeps 3 points (no schedule: the test starts each cycle).
    VirtualMachine.objects.filter(pk=vm.pk).update(group=ProtectionGroup.objects.create(name="keep3", points_keep=3))
    cycles, marks = [], {}
    for marker in "12345":
        if marker != "1":
            write_guest_data(live, marker, 2)
        job = wait_for_job(start_replication(vm, SyncType.INCREMENTAL).id, timeout=240)
        assert job.status == JobStatus.COMPLETED, job.error_message
        cycles.append(job)
        marks[job.recovery_point.pk] = (marker, sha256(live))
        if marker == "2":
            # The test VM boots point 2 and keeps running while cycles 3-5 complete.
            command("set_boot_check", "rp01", "--regex", "BOOT-MARKER: 2", "--timeout", "240")
            test = failover("rp01", "--test")
            assert test["console_match"].endswith("BOOT-MARKER: 2"), test
            assert VMContext.of(vm).state == VMState.READY_FOR_FAILOVER  # not paused
    assert [c.disks.get().sync_type for c in cycles] == [SyncType.FULL] + [SyncType.INCREMENTAL] * 4
    # Point 2 is in use: retention keeps it (and point 1 under it) past the policy.
    kept = {p.pk for p in RecoveryPoint.sealed(vm)}
    assert cycles[1].recovery_point.pk in kept and len(kept) == 5
    command("failover_end", "rp01")
    wait_until(lambda: RecoveryPoint.sealed(vm).count() == 3, 60, "retention to expire the two oldest points")

    kept = list(RecoveryPoint.sealed(vm).order_by("frozen_at"))
    assert [p.job_id for p in kept] == [c.id for c in cycles[2:]]
    for point in kept:
        marker, source_sha = marks[point.pk]
        assert layer_sha256(point.layers.get().handle, DISK_BYTES) == source_sha, marker
    files = {Path(p.layers.get().handle) for p in kept}
    used = sum(f.stat().st_blocks * 512 for f in files)
    changed = sum(p.changed_bytes for p in kept[1:])
    assert used <= DISK_BYTES + changed + 4 * MiB, (used, changed)  # 4 MiB: qcow2 metadata
    for point in kept:
        marker, _ = marks[point.pk]
        command("set_boot_check", "rp01", "--regex", f"BOOT-MARKER: {marker}", "--timeout", "240")
        report = failover("rp01", "--test", "--point", str(point.pk))
        assert report["console_match"].endswith(f"BOOT-MARKER: {marker}"), report
        command("failover_end", "rp01")

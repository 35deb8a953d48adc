"""Drills: a group's VMs test-failed-over in turn by real workers, booted by
libvirt and QEMU (TCG where KVM cannot run a guest) from overlays over
their replicas, verified on the guest's own console, the tests ended; pass
or fail with the recovery time, shown on the dashboard."""

import json
from pathlib import Path

import pytest
from django.core.management import CommandError

from replication.choices import DrillStatus, JobStatus, VMState
from replication.models import DrillRun, VirtualMachine, VMContext
from replication.services import scheduler
from replication.services.jobs import start_replication
from simulators.boot_disk import boot_disk_builder
from tests.helpers import command, sha256, user_with_role, wait_for_job

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]
boot_disk = boot_disk_builder()


@pytest.fixture(autouse=True)
def no_leftover_test_vms():
    from replication.platforms import get_destination

    destination = get_destination()
    for name in destination.list_vms("oma-test-"):
        destination.destroy(name)
    yield
    assert destination.list_vms("oma-test-") == []  # every drill ended its test



def test_a_drill_rehearses_each_vm_in_turn_and_records_pass_fail_and_recovery_time(celery_worker_process,
                                                                                      tmp_path, client):
    replicas = {}
    for name, marker in [("dr-a", "A"), ("dr-b", "B"), ("dr-c", "C")]:
        disk = tmp_path / f"{name}.img"
        boot_disk.build_boot_disk(disk, marker)
        command("add_vm", name, "--disk", str(disk), "--memory-mib", "256")
        job = wait_for_job(start_replication(VirtualMachine.objects.get(name=name)).id)
        assert job.status == JobStatus.COMPLETED, job.error_message
        replicas[name] = Path(job.disks.get().target_volume.path)
        command("set_boot_check", name, "--regex", r"BOOT-MARKER: \w+", "--timeout", "180")
    # dr-c's boot check can never match: its drill must fail, with the console's word for it.
    command("set_boot_check", "dr-c", "--regex", "NO-SUCH-MARKER", "--timeout", "20")
    before = {name: sha256(path) for name, path in replicas.items()}
    command("group", "create", "drilled")
    command("group", "add", "drilled", "dr-a", "dr-b", "dr-c")
    out = command("group", "update", "drilled", "--drill-every", "1d")
    assert "drills every 86400 s" in out
    task = scheduler.ProtectionGroup.objects.get(name="drilled").drill_task
    assert task.task == "replication.drill_due" and task.interval.every == 86400 and task.enabled

    with pytest.raises(CommandError, match="a VM failed its drill"):
        command("drill", "run", "drilled", "--wait", "--timeout", "600")
    runs = {run.vm.name: run for run in DrillRun.objects.select_related("vm", "failover")}
    assert {name: run.status for name, run in runs.items()} == {
        "dr-a": DrillStatus.PASSED, "dr-b": DrillStatus.PASSED, "dr-c": DrillStatus.FAILED}
    for name, marker in [("dr-a", "A"), ("dr-b", "B")]:
        run = runs[name]
        assert run.note.endswith(f"BOOT-MARKER: {marker}") and run.rto_s > 0
        assert run.rto_s == pytest.approx((run.failover.completed_at - run.failover.created_at).total_seconds(),
                                          abs=0.01)
        assert run.failover.status == "ended"  # the drill ended its test
    assert "NO-SUCH-MARKER" in runs["dr-c"].note and runs["dr-c"].rto_s is None
    # One at a time: each VM's test started after the previous one's ended.
    ordered = sorted(runs.values(), key=lambda run: run.started_at)
    assert [run.vm.name for run in ordered] == ["dr-a", "dr-b", "dr-c"]
    for earlier, later in zip(ordered, ordered[1:], strict=False):
        assert earlier.ended_at <= later.started_at
    for name, path in replicas.items():
        assert sha256(path) == before[name]  # a rehearsal never writes into the replica
        assert VMContext.of(VirtualMachine.objects.get(name=name)).state == VMState.READY_FOR_FAILOVER

    listed = json.loads(command("drill", "list", "drilled", "--json"))
    assert {entry["vm"]: entry["status"] for entry in listed} == {"dr-a": "passed", "dr-b": "passed",
                                                                  "dr-c": "failed"}
    client.force_login(user_with_role("viewer", "viewer"))
    page = client.get("/").content.decode()
    assert page.count('data-drill="passed"') == 2 and page.count('data-drill="failed"') == 1
    rpo = client.get("/api/rpo/").json()
    assert {vm["vm"]: vm["last_drill"]["status"] for vm in rpo["vms"]} == {
        "dr-a": "passed", "dr-b": "passed", "dr-c": "failed"}

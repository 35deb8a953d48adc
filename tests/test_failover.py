"""Test failover end to end with real parts: a bootable disk (built from
Debian packages by scripts/make_boot_disk.py) replicated by a real worker
pair, booted by libvirt and QEMU (TCG where KVM cannot run a guest) from
qcow2 overlays over the replica, verified on the guest's own serial
console; ending the test leaves the replica byte-identical."""

import json
from pathlib import Path

import pytest
from django.core.management import CommandError

from replication.choices import FailoverStatus, JobStatus, VMState
from replication.models import FailoverJob, VirtualMachine, VMContext
from replication.services.inventory import register_image_vm
from replication.services.jobs import start_replication
from simulators.boot_disk import boot_disk_builder
from tests.helpers import PROJECT_ROOT, command, completed_cycle_on, sha256, wait_for_job, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

boot_disk = boot_disk_builder()


@pytest.fixture(autouse=True)
def no_leftover_test_vms():
    """Test VMs an earlier, interrupted run left on the destination would make
    these tests' failovers refuse their names: remove them first."""
    from replication.platforms import get_destination

    destination = get_destination()
    for name in destination.list_vms("oma-test-vm-"):
        destination.destroy(name)



def replicate(vm):
    job = wait_for_job(start_replication(vm).id, timeout=120)
    assert job.status == JobStatus.COMPLETED, job.error_message
    return job


def run_test_failover(vm_name, *extra) -> dict:
    return json.loads(command("failover", vm_name, "--test", "--wait", "--json", *extra))


def domain_info(name: str) -> list:
    """libvirt's [state, max memory KiB, memory KiB, vCPUs, CPU time]."""
    import libvirt

    conn = libvirt.open("qemu:///system")
    try:
        return conn.lookupByName(name).info()
    finally:
        conn.close()


def destination_domains() -> list[str]:
    import libvirt

    conn = libvirt.open("qemu:///system")
    try:
        return [d.name() for d in conn.listAllDomains()]
    finally:
        conn.close()


def test_a_test_failover_boots_the_replica_and_ending_it_leaves_the_replica_as_it_was(
        celery_worker_process, tmp_path, settings):
    disk = tmp_path / "boot.img"
    boot_disk.build_boot_disk(disk, "A")
    command("add_vm", "vm-boot", "--disk", str(disk), "--cpus", "2", "--memory-mib", "384")
    vm = VirtualMachine.objects.get(name="vm-boot")
    job = replicate(vm)
    assert (job.vm_shape["cpus"], job.vm_shape["memory_mib"], job.vm_shape["disks"]) == (2, 384, ["disk-2000"])
    replica = Path(job.disks.get().target_volume.path)
    before = sha256(replica)
    command("set_boot_check", "vm-boot", "--regex", r"BOOT-MARKER: \w+", "--timeout", "180")

    report = run_test_failover("vm-boot")

    assert report["boot_verified"] is True and report["status"] == FailoverStatus.SUCCEEDED, report
    assert report["console_match"].endswith("BOOT-MARKER: A")
    assert [s["name"] for s in report["steps"]] == ["preflight", "protect volumes", "define VM", "start VM",
                                                    "verify boot"]
    assert all(s["status"] == "done" and s["seconds"] is not None for s in report["steps"])
    assert report["state"] == VMState.READY_FOR_FAILOVER  # protection goes on beside the test
    assert report["destination_vm"] in destination_domains()
    # The VM runs with the shape its cycle recorded: 2 vCPUs, 384 MiB.
    assert domain_info(report["destination_vm"])[1:4:2] == [384 * 1024, 2]
    # A cycle runs beside the test VM: it adds a point of its own; the test's point is untouched.
    beside = replicate(vm)
    assert beside.recovery_point.pk != report["recovery_point"] == job.recovery_point.pk
    assert sha256(replica) == before
    with pytest.raises(CommandError, match="already has a test failover"):
        command("failover", "vm-boot", "--test")

    command("failover_end", "vm-boot")
    assert sha256(replica) == before
    assert report["destination_vm"] not in destination_domains()
    assert VMContext.of(vm).state == VMState.READY_FOR_FAILOVER
    assert list(Path(settings.FAILOVER_DIR).glob("*.qcow2")) == []

    # The guest's next state replicates, and the next test boots it.
    boot_disk.set_marker(disk, "B")
    replicate(vm)
    report = run_test_failover("vm-boot")
    assert report["console_match"].endswith("BOOT-MARKER: B"), report
    command("failover_end", "vm-boot")
    history = [c.to_state for c in VMContext.of(vm).changes.all()]
    # add_vm records the registration (the VM discovered), then the three cycles; tests move nothing.
    assert history == [VMState.DISCOVERED, VMState.REPLICATING, VMState.READY_FOR_FAILOVER, VMState.REPLICATING,
                       VMState.READY_FOR_FAILOVER, VMState.REPLICATING, VMState.READY_FOR_FAILOVER]


def test_a_boot_that_does_not_verify_fails_with_the_console_and_cleans_up(celery_worker_process, tmp_path,
                                                                            settings):
    disk = tmp_path / "boot.img"
    boot_disk.build_boot_disk(disk, "C")
    vm = register_image_vm("vm-noboot", [str(disk)])
    replica = Path(replicate(vm).disks.get().target_volume.path)
    before = sha256(replica)
    command("set_boot_check", "vm-noboot", "--regex", "NEVER-PRINTED", "--timeout", "40")

    with pytest.raises(CommandError, match=r"boot not verified \(not within 40 s\): console: never showed "
                                           r"/NEVER-PRINTED/"):
        command("failover", "vm-noboot", "--test", "--wait")

    job = FailoverJob.objects.get(vm=vm)
    assert job.status == FailoverStatus.FAILED and "BOOT-MARKER: C" in job.console_tail
    assert [s.name for s in job.steps.all()][-2:] == ["destroy VM", "discard protections"]
    assert job.destination_vm not in destination_domains()
    assert list(Path(settings.FAILOVER_DIR).glob("*.qcow2")) == []
    assert VMContext.of(vm).state == VMState.READY_FOR_FAILOVER
    assert sha256(replica) == before


def test_a_failover_needs_a_completed_cycle(tmp_path, monkeypatch):
    monkeypatch.setattr("replication.services.jobs.enqueue_prepare", lambda *args: None)
    disk = tmp_path / "boot.img"
    disk.write_bytes(b"\0" * 4096)
    vm = register_image_vm("vm-never", [str(disk)])
    with pytest.raises(CommandError, match="has no recovery point yet: no cycle has completed"):
        command("failover", "vm-never", "--test")
    job = start_replication(vm)
    assert job.status == "pending"
    for kind in ("--test", "--live"):  # its first cycle runs, but no point exists yet
        with pytest.raises(CommandError, match="has no recovery point yet"):
            command("failover", "vm-never", kind)
    with pytest.raises(CommandError, match="no test failover to end"):
        command("failover_end", "vm-never")
    with pytest.raises(CommandError, match="not a regular expression"):
        command("set_boot_check", "vm-never", "--regex", "(")


def test_libvirtd_not_answering_fails_the_failover_with_how_to_start_it(tmp_path, monkeypatch, settings):
    from replication.services import failover

    vm = completed_cycle_on(tmp_path, "vm-nolibvirt", monkeypatch)
    settings.LIBVIRT_URI = f"qemu+unix:///system?socket={tmp_path}/no-libvirtd.sock"
    job = failover.start_failover(vm)
    failover.run_failover(job.pk)
    job.refresh_from_db()
    assert job.status == FailoverStatus.FAILED
    assert "libvirtd is not running" in job.error_message and "libvirtd -d" in job.error_message
    assert [(s.name, s.status) for s in job.steps.all()] == [("preflight", "failed")]  # nothing to undo
    assert VMContext.of(vm).state == VMState.READY_FOR_FAILOVER


def test_preflight_refuses_without_space_for_the_overlays_and_the_api_says_so(tmp_path, monkeypatch, settings,
                                                                               admin_client, client):
    from replication.services import failover

    vm = completed_cycle_on(tmp_path, "vm-nospace", monkeypatch)
    settings.FAILOVER_MIN_FREE_BYTES = 2**62
    job = failover.start_failover(vm)
    failover.run_failover(job.pk)
    job.refresh_from_db()
    assert job.status == FailoverStatus.FAILED and "not enough space for the overlays" in job.error_message
    assert VMContext.of(vm).state == VMState.READY_FOR_FAILOVER

    listed = admin_client.get("/api/failovers/", {"vm": "vm-nospace"}).json()["failovers"]
    assert [(f["id"], f["status"], f["state"]) for f in listed] == [(job.pk, "failed", VMState.READY_FOR_FAILOVER)]
    one = admin_client.get(f"/api/failovers/{job.pk}/").json()
    assert one["steps"][0]["name"] == "preflight" and one["steps"][0]["status"] == "failed"
    assert "not enough space" in one["error"] and one["boot_verified"] is False
    assert admin_client.get(f"/api/failovers/{job.pk + 1000}/").status_code == 404
    assert client.get("/api/failovers/").status_code == 401
    assert admin_client.get("/api/failovers/", {"vm": "nobody"}).json() == {"failovers": []}


def test_a_failover_whose_worker_is_killed_is_undone_by_the_reaper_naming_the_step(tmp_path, monkeypatch,
                                                                                   settings):
    import signal
    import subprocess
    import sys
    from datetime import timedelta

    from django.utils import timezone

    from replication.services import failover
    from tests.helpers import worker_env

    vm = completed_cycle_on(tmp_path, "vm-killed", monkeypatch)
    command("set_boot_check", "vm-killed", "--regex", "NEVER-PRINTED", "--timeout", "600")
    job = failover.start_failover(vm)
    # The failover's task, in a process of its own (as in a worker), killed mid-step.
    runner = subprocess.Popen(
        [sys.executable, "manage.py", "shell", "-c",
         f"from replication.services import failover; failover.run_failover({job.pk})"],
        cwd=PROJECT_ROOT, env={**worker_env(), "PROCESS_ROLE": "oma"}, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    try:
        def verifying() -> bool:
            assert runner.poll() is None, "the failover's process exited"
            return job.steps.filter(name="verify boot").exists()

        wait_until(verifying, 120, "the failover to reach verify boot", interval=0.1)
    finally:
        runner.send_signal(signal.SIGKILL)
        runner.wait()
    job.refresh_from_db()
    assert job.status == FailoverStatus.RUNNING and job.destination_vm in destination_domains()

    later = timezone.now() + timedelta(seconds=settings.REAPER_TIMEOUT_S + 1)
    assert failover.reap_failovers(now=later) == [job.pk]

    job.refresh_from_db()
    assert job.status == FailoverStatus.FAILED and "during verify boot" in job.error_message
    assert job.steps.get(name="verify boot").detail == "interrupted"
    assert job.destination_vm not in destination_domains()
    assert job.protection and not any(Path(p).exists() for p in job.protection)
    assert VMContext.of(vm).state == VMState.READY_FOR_FAILOVER

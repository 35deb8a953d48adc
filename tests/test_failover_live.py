"""A protected VM's whole lifecycle with real parts: a bootable disk (built
from Debian packages by scripts/make_boot_disk.py) as the boot disk of a VM
in the vCenter simulator and of an image VM, replicated by a real worker
pair (OMA worker, agent worker with no database), booted by libvirt and
QEMU (TCG where KVM cannot run a guest) and checked on the guest's own
serial console: test failover, incremental, live failover (the source shut
down through the agent, a final incremental, the VM on the mapped network),
rollback (the source back on, the next cycle incremental)."""

import json
import uuid
from pathlib import Path

import pytest
from django.core.management import CommandError

from replication.choices import FailoverStatus, JobStatus, SyncType, VMState
from replication.models import FailoverJob, VirtualMachine, VMContext
from replication.services import vmware as vmware_service
from replication.services.jobs import ReplicationError, start_replication
from simulators.boot_disk import boot_disk_builder
from simulators.vcenter import vm_spec
from tests.helpers import MiB, command, completed_cycle_on, failover, replica_sha256, sha256, wait_for_job
from vma_agent.contract import SourcePowered

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

boot_disk = boot_disk_builder()
DISK_BYTES = 64 * MiB
MAC = "00:50:56:aa:bb:01"




def replicate(vm, sync_type=SyncType.FULL):
    job = wait_for_job(start_replication(vm, sync_type).id, timeout=180)
    assert job.status == JobStatus.COMPLETED, job.error_message
    return job


def libvirt_conn():
    import libvirt

    return libvirt.open("qemu:///system")


def domains() -> list[str]:
    conn = libvirt_conn()
    try:
        return [d.name() for d in conn.listAllDomains()]
    finally:
        conn.close()


def interfaces(name: str) -> list[tuple[str, str]]:
    """(network, MAC) of each NIC of the domain, as libvirt defined it."""
    import xml.etree.ElementTree as ET

    conn = libvirt_conn()
    try:
        root = ET.fromstring(conn.lookupByName(name).XMLDesc(0))
    finally:
        conn.close()
    return [(i.find("source").get("network"), i.find("mac").get("address"))
            for i in root.iterfind("./devices/interface")]


@pytest.fixture
def isolated_network():
    """A transient libvirt network with no uplink, no address and no DHCP:
    production as far as the mapping is concerned, connected to nothing."""
    name = f"oma-test-{uuid.uuid4().hex[:6]}"
    conn = libvirt_conn()
    net = conn.networkCreateXML(f"<network><name>{name}</name><bridge name='vb-{name[-6:]}' stp='off'/></network>")
    try:
        yield name
    finally:
        net.destroy()
        conn.close()


@pytest.fixture(autouse=True)
def no_leftover_vms():
    from replication.platforms import get_destination

    destination = get_destination()
    for prefix in ("oma-test-boot", "oma-live-boot"):
        for name in destination.list_vms(prefix):
            destination.destroy(name)


def power_state(record, moref: str) -> str:
    with vmware_service.client_for(record) as client:
        return client.vm_info(moref).power_state


def test_vmware_vm_test_failover_then_live_failover_and_rollback(celery_worker_process, vcenter, tmp_path,
                                                                 isolated_network, settings):
    sim, record = vcenter(vm_spec("boot01", [DISK_BYTES], cbt=True, firmware="bios", cpus=1, memory_mib=384))
    moref = sim.vms["boot01"]["moref"]
    live = Path(sim.vms["boot01"]["disks"]["2000"])
    boot_disk.build_boot_disk(tmp_path / "boot.img", "A")
    live.write_bytes((tmp_path / "boot.img").read_bytes())
    (vm,) = vmware_service.discover(record, ["boot01"])

    full = replicate(vm)
    replica = Path(full.disks.get().target_volume.path)
    assert sha256(replica) == sha256(live)

    # Test failover: marker A on the console; ending it leaves the replica as it was.
    before = sha256(replica)
    command("set_boot_check", "boot01", "--regex", "BOOT-MARKER: A", "--timeout", "240")
    report = failover("boot01", "--test")
    assert report["boot_verified"] and report["console_match"].endswith("BOOT-MARKER: A"), report
    command("failover_end", "boot01")
    assert sha256(replica) == before

    # The guest writes marker B; CBT reports the changed area, an incremental copies it.
    boot_disk.set_marker(live, "B")
    incremental = replicate(vm, SyncType.INCREMENTAL)
    assert incremental.disks.get().sync_type == SyncType.INCREMENTAL
    assert 0 < incremental.bytes_transferred < 4 * MiB
    assert replica_sha256(incremental.disks.get()) == sha256(live)
    assert sha256(replica) == before  # the incremental wrote its own layer, not the first point
    command("set_boot_check", "boot01", "--regex", "BOOT-MARKER: B", "--timeout", "240")
    assert failover("boot01", "--test")["console_match"].endswith("BOOT-MARKER: B")
    command("failover_end", "boot01")

    # Live failover: the guest wrote C after the last cycle; only the final
    # incremental can bring it over. Its NIC's network must be mapped first.
    boot_disk.set_marker(live, "C")
    command("set_boot_check", "boot01", "--regex", "BOOT-MARKER: C", "--timeout", "240")
    with pytest.raises(CommandError, match="maps to no destination network"):
        failover("boot01", "--live")
    assert power_state(record, moref) == "poweredOn"  # refused before the source was touched
    command("network_map", "VM Network", isolated_network)
    forecast = json.loads(command("failover", "boot01", "--forecast", "--json"))
    assert forecast["total_s"] is not None and forecast["boot_s"] > 0

    report = failover("boot01", "--live")

    assert report["status"] == FailoverStatus.SUCCEEDED and report["boot_verified"], report
    assert report["console_match"].endswith("BOOT-MARKER: C")
    assert report["state"] == VMState.FAILED_OVER_LIVE
    steps = {s["name"]: s for s in report["steps"]}
    assert list(steps)[:3] == ["preflight", "shut down source", "final incremental"]
    assert steps["shut down source"]["detail"].startswith("guest shutdown (poweredOff)")
    assert all(s["status"] == "done" for s in report["steps"]), report["steps"]
    assert report["downtime_s"] >= sum(steps[n]["seconds"] for n in ("shut down source", "final incremental",
                                                                       "verify boot"))
    assert report["forecast_downtime_s"] > 0
    final = vm.jobs.get(pk=report["final_cycle"])
    assert final.sync_type == SyncType.INCREMENTAL and final.status == JobStatus.COMPLETED
    final = vm.jobs.get(pk=report["final_cycle"])
    assert replica_sha256(final.disks.get()) == sha256(live)  # the rollback point: the source as it went off
    assert power_state(record, moref) == "poweredOff"
    assert interfaces(report["destination_vm"]) == [(isolated_network, MAC)]
    with pytest.raises(ReplicationError, match="roll back first"):
        start_replication(vm, SyncType.INCREMENTAL)
    with pytest.raises(CommandError, match="already has a live failover"):
        command("failover", "boot01", "--test")
    rollback_point = replica_sha256(final.disks.get())

    rollback = json.loads(command("rollback", "boot01", "--wait", "--json"))

    assert rollback["status"] == FailoverStatus.SUCCEEDED, rollback
    assert [s["name"] for s in rollback["steps"]] == ["destroy VM", "revert volumes", "power on source"]
    assert report["destination_vm"] not in domains()
    assert not any(Path(p).exists() for p in vm.failovers.get(pk=report["id"]).protection)
    assert power_state(record, moref) == "poweredOn"
    assert VMContext.of(vm).state == VMState.READY_FOR_FAILOVER
    assert replica_sha256(final.disks.get()) == rollback_point
    assert not FailoverJob.open(vm).exists()
    # The changeIds still hold: the next cycle is incremental, and nothing changed since.
    after = replicate(vm, SyncType.INCREMENTAL)
    assert after.disks.get().sync_type == SyncType.INCREMENTAL and after.bytes_transferred == 0
    assert replica_sha256(after.disks.get()) == sha256(live)
    history = [c.to_state for c in VMContext.of(vm).changes.all()]
    assert history[-6:] == [VMState.REPLICATING, VMState.READY_FOR_FAILOVER, VMState.FAILED_OVER_LIVE,
                            VMState.READY_FOR_FAILOVER, VMState.REPLICATING, VMState.READY_FOR_FAILOVER]


def test_image_vm_live_failover_and_rollback(celery_worker_process, tmp_path):
    disk = tmp_path / "boot.img"
    boot_disk.build_boot_disk(disk, "A")
    command("add_vm", "boot-img", "--disk", str(disk), "--memory-mib", "384")
    vm = VirtualMachine.objects.get(name="boot-img")
    replicate(vm)
    boot_disk.set_marker(disk, "B")  # after the last cycle: the final one must carry it
    command("set_boot_check", "boot-img", "--regex", "BOOT-MARKER: B", "--timeout", "240")
    # virt-v2v-in-place cannot inspect a busybox guest: it says why, and the VM boots unconverted.
    command("set_guest_conversion", "boot-img", "on")

    report = failover("boot-img", "--live")

    assert report["boot_verified"] and report["console_match"].endswith("BOOT-MARKER: B"), report
    steps = {s["name"]: s for s in report["steps"]}
    assert "no power switch" in steps["shut down source"]["detail"]
    assert steps["convert guest"]["status"] == "done"
    assert steps["convert guest"]["detail"] == ("not converted: inspection could not detect the source guest (or "
                                                "physical machine). No root device found in this operating system "
                                                "image."), steps["convert guest"]
    assert [name for name in steps][-5:] == ["protect volumes", "convert guest", "define VM", "start VM",
                                             "verify boot"]
    assert vm.jobs.get(pk=report["final_cycle"]).sync_type == SyncType.FULL
    assert report["forecast_downtime_s"] is None  # no boot of this VM was ever verified
    rollback = json.loads(command("rollback", "boot-img", "--wait", "--json"))
    assert rollback["status"] == FailoverStatus.SUCCEEDED, rollback
    assert VMContext.of(vm).state == VMState.READY_FOR_FAILOVER
    assert report["destination_vm"] not in domains()
    assert not FailoverJob.open(vm).exists()  # nothing left open: the next failover may start


# Faults -------------------------------------------------------------------------

def as_vmware(vm) -> VirtualMachine:
    """The VM as a VMware source, for the OMA's side of a live failover whose
    agent is played by the test (its power orders captured, its answers given)."""
    from django.conf import settings

    from replication.choices import SourceKind
    from replication.models import VCenter

    vcenter = VCenter.objects.create(name=f"vc-{vm.name}", host="vc.invalid", username="u", thumbprint="AA",
                                     password_file=str(settings.OMA_SECRETS_DIR / "nonexistent"))
    VirtualMachine.objects.filter(pk=vm.pk).update(source_kind=SourceKind.VMWARE, vcenter=vcenter, moref="vm-1")
    vm.refresh_from_db()
    return vm


@pytest.fixture
def power_orders(monkeypatch) -> list:
    sent = []
    monkeypatch.setattr("replication.services.orders.send_power",
                        lambda job, action, timeout_s: sent.append((job.pk, action)))
    return sent


def test_an_agent_that_never_answers_the_shutdown_fails_the_failover_and_the_source_is_asked_back_on(
        tmp_path, monkeypatch, power_orders, settings):
    from datetime import timedelta

    from replication.services import failover

    vm = as_vmware(completed_cycle_on(tmp_path, "vm-silent", monkeypatch))
    job = failover.start_failover(vm, "live")
    failover.run_failover(job.pk)
    job.refresh_from_db()
    assert power_orders == [(job.pk, "shut_down")] and job.status == FailoverStatus.RUNNING
    assert job.wait_until is not None

    # Waiting on the agent is not silence, until its deadline.
    assert failover.reap_failovers(now=job.wait_until - timedelta(seconds=1)) == []
    assert failover.reap_failovers(now=job.wait_until + timedelta(seconds=1)) == [job.pk]

    job.refresh_from_db()
    assert job.status == FailoverStatus.FAILED
    assert "the agent did not answer (shut down source)" in job.error_message
    assert power_orders[-1] == (job.pk, "power_on")  # the source may be off: it is asked back on
    assert VMContext.of(vm).state == VMState.READY_FOR_FAILOVER
    # The agent's late answers close their steps and change nothing else.
    failover.source_powered(job.pk, "power_on", SourcePowered(how="already powered on", power_state="poweredOn",
                                                            seconds=0.2))
    failover.source_powered(job.pk, "power_on", SourcePowered(how="already powered on", seconds=0.2))  # twice
    job.refresh_from_db()
    steps = [(s.name, s.status) for s in job.steps.all()]
    assert steps == [("preflight", "done"), ("shut down source", "failed"), ("power on source", "done")]
    assert job.status == FailoverStatus.FAILED


def test_revoking_the_agent_a_failover_waits_on_ends_it_at_once_and_asks_the_agent_nothing_more(
        tmp_path, monkeypatch, power_orders):
    from replication.choices import AgentState
    from replication.models import Agent, AgentAuditEntry
    from replication.services import enrolment, failover

    vm = as_vmware(completed_cycle_on(tmp_path, "vm-revoked", monkeypatch))
    VirtualMachine.objects.filter(pk=vm.pk).update(agent="site-r")
    vm.refresh_from_db()
    agent = Agent.objects.create(name="site-r")
    job = failover.start_failover(vm, "live")
    failover.run_failover(job.pk)
    job.refresh_from_db()
    assert power_orders == [(job.pk, "shut_down")] and job.status == FailoverStatus.RUNNING

    # Revoked while the shutdown is asked: the reaper's pass answers for it
    # (the agent's own answers are refused from now on), long before the deadline.
    agent.transition(AgentState.REVOKED)
    assert enrolment.end_revoked_work() == ["site-r"]
    job.refresh_from_db()
    assert job.status == FailoverStatus.FAILED and "agent site-r revoked" in job.error_message
    steps = {s.name: (s.status, s.detail) for s in job.steps.all()}
    assert steps["shut down source"][0] == "failed" and "revoked" in steps["shut down source"][1]
    assert steps["power on source"] == (
        "failed", "agent site-r is revoked: the OMA no longer asks it to power on vm-revoked")
    assert power_orders == [(job.pk, "shut_down")], "nothing more is asked of a revoked agent"
    assert VMContext.of(vm).state == VMState.READY_FOR_FAILOVER
    assert AgentAuditEntry.objects.get(action="work-ended").detail == (
        "0 job(s) failed, 0 copy run(s) closed, 1 failover(s) answered")
    assert enrolment.end_revoked_work() == []  # answered once

    # A new live failover is refused at the shutdown, naming the way that needs none.
    second = failover.start_failover(vm, "live")
    failover.run_failover(second.pk)
    second.refresh_from_db()
    assert second.status == FailoverStatus.FAILED
    assert "agent site-r is revoked" in second.error_message and "--source-lost" in second.error_message
    assert power_orders == [(job.pk, "shut_down")]


def test_a_final_cycle_that_fails_ends_the_failover_and_powers_the_source_back_on(tmp_path, monkeypatch,
                                                                                  power_orders):
    from replication.services import failover, jobs

    vm = as_vmware(completed_cycle_on(tmp_path, "vm-finalfail", monkeypatch))
    job = failover.start_failover(vm, "live")
    failover.run_failover(job.pk)
    failover.source_powered(job.pk, "shut_down", SourcePowered(how="guest shutdown", power_state="poweredOff",
                                                             seconds=1.5))
    job.refresh_from_db()
    cycle = job.final_cycle
    assert cycle is not None and cycle.sync_type == SyncType.INCREMENTAL
    # No other cycle or failover may run meanwhile.
    with pytest.raises(ReplicationError, match=f"already has an active job {cycle.id}"):
        start_replication(vm, SyncType.INCREMENTAL)
    with pytest.raises(failover.FailoverError, match="already has a live failover"):
        failover.start_failover(vm, "test")
    assert failover.reap_failovers() == []  # its final cycle runs: alive

    jobs.fail_job(cycle.id, "injected: the snapshot failed")
    # Between the cycle's end and the failover's, the open failover refuses a cycle.
    with pytest.raises(ReplicationError, match=f"under live failover {job.pk}"):
        start_replication(vm, SyncType.INCREMENTAL)
    # The news that the cycle ended is queued as a task (captured here): the
    # reaper finds the ended cycle and goes on all the same.
    failover.reap_failovers()

    job.refresh_from_db()
    assert job.status == FailoverStatus.FAILED
    assert f"the final cycle {cycle.id} failed: injected" in job.error_message
    assert power_orders == [(job.pk, "shut_down"), (job.pk, "power_on")]
    assert [s.name for s in job.steps.all()] == ["preflight", "shut down source", "final incremental",
                                                 "power on source"]
    assert VMContext.of(vm).state == VMState.READY_FOR_FAILOVER  # the failed cycle wrote nothing


def test_the_agent_powers_off_a_guest_that_will_not_shut_down_and_powers_it_on(vcenter):
    from replication.services.orders import vcenter_ref
    from vma_agent import steps
    from vma_agent.contract import PowerOrder
    from vma_agent.tasks import agent_config

    sim, record = vcenter(vm_spec("stubborn", [MiB], guest_shutdown="ignored"),
                          vm_spec("notools", [MiB], guest_shutdown="no_tools"))

    def power(name, action, timeout_s=1.0):
        return steps.power_source(PowerOrder(failover_id=1, action=action, vcenter=vcenter_ref(record),
                                             vm_moref=sim.vms[name]["moref"], vm_name=name, timeout_s=timeout_s),
                                  agent_config())

    off = power("stubborn", "shut_down")
    assert off.how == "powered off (the guest was not off 1 s after its shutdown)" and off.seconds >= 1
    assert off.power_state == "poweredOff"
    off = power("notools", "shut_down")
    assert off.how == ("powered off (the guest could not be asked to shut down: vim.fault.ToolsUnavailable: "
                       "VMware Tools is not running in the guest)")
    assert power("notools", "shut_down").how == "already powered off"
    on = power("notools", "power_on")
    assert (on.how, on.power_state) == ("powered on", "poweredOn")
    assert power("notools", "power_on").how == "already powered on"
    bad = steps.power_source(PowerOrder(failover_id=1, action="power_on", vcenter=vcenter_ref(record),
                                        vm_moref="vm-nope", vm_name="gone"), agent_config())
    assert "power on of VM gone failed" in bad.error

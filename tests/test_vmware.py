"""VMware sources end to end: the vCenter simulator (govmomi, built by the
tests, keeping real disk images per snapshot), pyvmomi, a real Celery
worker, real nbdkit sources and targets. Data is checked by content: after
every cycle the target equals the image the snapshot froze."""

import json
import os

import pytest
from django.conf import settings
from django.core.management import CommandError, call_command
from pyVim.task import WaitForTask
from pyVmomi import vim

from replication.choices import DiskStatus, JobStatus, SyncType
from replication.models import ChangeIdRecord, ReplicationJob, SourceDisk, VCenter, VirtualMachine
from replication.services import vmware as vmware_service
from replication.services.inventory import label_disks
from replication.services.jobs import cancel_job, start_replication
from simulators.vcenter import fill_image as fill
from simulators.vcenter import snapshot_image, vm_spec
from simulators.vcenter import write_image as write
from tests.helpers import (
    MiB,
    agent_bytes_copied,
    replica_sha256,
    sha256,
    source_exports_running,
    wait_for_job,
    wait_until,
)
from vma_agent.vmware import VSphereClient, VSphereError

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

BLOCK = 64 * 1024  # the simulator's change-tracking granularity
DISKS = [12 * MiB + 4097, 5 * MiB, 9 * MiB + 511]  # odd sizes: the last blocks are partial


def snapshots_of(record: VCenter, moref: str) -> list[str]:
    with vmware_service.client_for(record) as client:
        return [s.name for s in client.vm_info(moref).snapshots]


def replicate(vm, sync_type=SyncType.FULL, **kwargs) -> ReplicationJob:
    job = wait_for_job(start_replication(vm, sync_type, **kwargs).id, timeout=120)
    wait_until(lambda: not source_exports_running(), 10, "the job's source exports to close")
    return job


def assert_targets_equal_sources(job, live_images, sim=None):
    """Each target equals the image its job's snapshot froze (the simulator
    keeps it under the snapshot's changeId), which is also the live image:
    nothing writes while a job runs."""
    for disk in job.disks.order_by("disk_key"):
        target = replica_sha256(disk)
        assert target == sha256(live_images[str(disk.source_disk.device_key)]), disk
        if sim is not None:
            frozen = snapshot_image(sim, job.vm.name, disk.source_disk.device_key, disk.change_id)
            assert target == sha256(frozen), disk


def test_discovery_records_a_three_disk_vm(vcenter):
    sim, record = vcenter(vm_spec("web01", DISKS), vm_spec("db01", capacities=[MiB], cbt=True))
    out = _call("discover", "--vcenter", "vc1", "--json")
    vms = {vm["name"]: vm for vm in json.loads(out)}
    assert set(vms) >= {"web01", "db01"}
    web = vms["web01"]
    assert web["moref"] == sim.vms["web01"]["moref"]
    assert web["uuid"] == sim.vms["web01"]["uuid"]
    assert web["power_state"] == "poweredOn" and web["firmware"] == "efi"
    assert web["cbt_enabled"] is False and vms["db01"]["cbt_enabled"] is True
    assert [n["mac"] for n in web["nics"]] == ["00:50:56:aa:bb:01"]
    assert web["snapshots"] == []
    assert [(d["disk_key"], d["device_key"], d["unit_number"], d["capacity_bytes"], d["disk_mode"])
            for d in web["disks"]] == [
        ("disk-2000", 2000, 0, DISKS[0], "persistent"), ("disk-2001", 2001, 1, DISKS[1], "persistent"),
        ("disk-2002", 2002, 2, DISKS[2], "persistent")]
    assert all(d["backing_file"].startswith("[") and d["backing_file"].endswith(".vmdk") for d in web["disks"])
    assert [d["discovered_change_id"] for d in vms["db01"]["disks"]] == [""]  # CBT on, no snapshot yet
    # vCenter's own names, stored as it gives them (a real vCenter says
    # "Hard disk 1"; govmomi's simulator names them disk-<controller>-<unit>).
    assert [d["label"] for d in web["disks"]] == ["disk-1000-0", "disk-1000-1", "disk-1000-2"]
    (vm,) = VirtualMachine.objects.filter(name="web01")
    assert [d.label for d in label_disks(vm.disks.all())] == ["disk-1000-0", "disk-1000-1", "disk-1000-2"]
    # Discovering again updates in place.
    _call("discover", "--vcenter", "vc1", "--vm", "web01")
    assert VirtualMachine.objects.filter(name="web01").count() == 1
    assert SourceDisk.objects.filter(vm__name="web01").count() == 3


def test_the_password_never_reaches_the_database_or_a_wrong_thumbprint_or_password(vcenter, tmp_path):
    sim, record = vcenter(vm_spec("web01", capacities=[MiB]))
    password = sim.password_file.read_text()
    record.refresh_from_db()
    assert password not in json.dumps([str(getattr(record, f.attname)) for f in record._meta.fields])
    bad = settings.OMA_SECRETS_DIR / "bad.password"
    bad.write_text("not-the-password")
    with pytest.raises(VSphereError, match="refused the login"):
        vmware_service.register_vcenter("vc-bad-pw", sim.host, sim.username, sim.thumbprint, port=sim.port,
                                        password_file=str(bad))
    wrong = "AB:" * 19 + "CD"
    with pytest.raises(VSphereError, match=f"presented certificate thumbprint {sim.thumbprint}"):
        vmware_service.register_vcenter("vc-bad-tp", sim.host, sim.username, wrong, port=sim.port,
                                        password_file=str(sim.password_file))
    assert not VCenter.objects.filter(name__startswith="vc-bad").exists()


def test_full_copy_then_three_incrementals_match_every_snapshot(celery_worker_process, vcenter):
    # Changed areas come in pages of 1 MiB: every disk spans several.
    sim, record = vcenter(vm_spec("web01", DISKS, cpus=2, memory_mib=768), cbt_page_bytes=MiB)
    live = sim.vms["web01"]["disks"]
    fill(live["2000"], [(0, 3 * MiB), (DISKS[0] - 4097, 4097)], seed=1)
    fill(live["2001"], [(MiB, 200_000)], seed=2)
    fill(live["2002"], [(4 * MiB + 7, 10_000)], seed=3)
    (vm,) = vmware_service.discover(record, ["web01"])
    assert vm.cbt_enabled is False

    # Full copy: CBT is enabled automatically and every disk gets a changeId.
    job = replicate(vm)
    assert job.status == JobStatus.COMPLETED, job.error_message
    assert job.progress_percent == 100.0
    vm.refresh_from_db()
    assert vm.cbt_enabled is True
    assert "changed block tracking enabled" in " ".join(job.events.values_list("message", flat=True))
    # The shape a failover to this cycle boots, as the agent read it with the snapshot.
    assert {k: job.vm_shape[k] for k in ("cpus", "memory_mib", "firmware", "disks")} == {
        "cpus": 2, "memory_mib": 768, "firmware": "efi", "disks": ["disk-2000", "disk-2001", "disk-2002"]}
    assert job.vm_shape["nics"][0]["mac"] == "00:50:56:aa:bb:01"
    assert (vm.cpus, vm.memory_mib) == (2, 768)
    assert_targets_equal_sources(job, live, sim)
    committed = dict(SourceDisk.objects.filter(vm=vm).values_list("disk_key", "change_id"))
    assert set(committed) == {"disk-2000", "disk-2001", "disk-2002"} and all(committed.values())
    assert snapshots_of(record, vm.moref) == []

    # Cycle 1: the last byte of disk 2000 and a block of 2002; 2001 unchanged.
    write(live["2000"], DISKS[0] - 1, b"\xff")
    fill(live["2002"], [(2 * MiB + 100, 5)], seed=4)
    job = replicate(vm, SyncType.INCREMENTAL)
    assert job.status == JobStatus.COMPLETED, job.error_message
    assert job.progress_percent == 100.0
    disks = {d.disk_key: d for d in job.disks.all()}
    assert {d.sync_type for d in disks.values()} == {SyncType.INCREMENTAL}
    assert disks["disk-2000"].bytes_total == DISKS[0] % BLOCK  # only the partial last block
    assert disks["disk-2001"].bytes_total == 0 and disks["disk-2001"].status == DiskStatus.COMPLETED
    assert disks["disk-2002"].bytes_total == BLOCK
    assert_targets_equal_sources(job, live, sim)

    # Cycle 2: data spanning blocks, and zeros over data (a trim).
    fill(live["2001"], [(BLOCK - 10, BLOCK + 20)], seed=5)
    write(live["2000"], MiB, bytes(2 * BLOCK))
    job = replicate(vm, SyncType.INCREMENTAL)
    assert job.status == JobStatus.COMPLETED, job.error_message
    disks = {d.disk_key: d for d in job.disks.all()}
    assert disks["disk-2001"].bytes_total == 3 * BLOCK
    assert disks["disk-2000"].bytes_total == 2 * BLOCK
    assert disks["disk-2002"].bytes_total == 0
    assert_targets_equal_sources(job, live, sim)

    # Cycle 3: nothing changed at all still ends at 100 %.
    job = replicate(vm, SyncType.INCREMENTAL)
    assert job.status == JobStatus.COMPLETED and job.progress_percent == 100.0
    assert job.total_bytes == 0
    assert_targets_equal_sources(job, live, sim)

    history = ChangeIdRecord.objects.filter(source_disk__vm=vm)
    assert history.count() == 3 * 4
    for disk in SourceDisk.objects.filter(vm=vm):
        records = list(history.filter(source_disk=disk).order_by("id"))
        assert records[-1].change_id == disk.change_id
        # Each incremental was computed against the changeId the previous cycle committed.
        assert [r.previous_change_id for r in records[1:]] == [r.change_id for r in records[:-1]]
    assert snapshots_of(record, vm.moref) == []


def test_a_cbt_reset_forces_a_full_copy_with_the_reason(celery_worker_process, vcenter):
    sim, record = vcenter(vm_spec("app01", capacities=[6 * MiB + 1, 2 * MiB]))
    live = sim.vms["app01"]["disks"]
    fill(live["2000"], [(0, MiB)], seed=1)
    (vm,) = vmware_service.discover(record, ["app01"])
    assert replicate(vm).status == JobStatus.COMPLETED
    with vmware_service.client_for(record) as client:
        client.set_change_tracking(vm.moref, False)
        client.set_change_tracking(vm.moref, True)
    fill(live["2001"], [(MiB, 5000)], seed=2)

    job = replicate(vm, SyncType.INCREMENTAL, verify=True)
    assert job.status == JobStatus.COMPLETED, job.error_message
    assert job.verify
    for disk in job.disks.all():
        assert disk.sync_type == SyncType.FULL
        assert "changed block tracking was reset" in disk.full_copy_reason
    assert_targets_equal_sources(job, live)
    assert ChangeIdRecord.objects.filter(job=job, note__contains="reset").count() == 2


def test_an_unreadable_previous_change_id_fails_the_job_instead_of_copying_everything(
        celery_worker_process, vcenter):
    sim, record = vcenter(vm_spec("app02", capacities=[2 * MiB]))
    (vm,) = vmware_service.discover(record, ["app02"])
    assert replicate(vm).status == JobStatus.COMPLETED
    disk = SourceDisk.objects.get(vm=vm)
    bogus = disk.change_id.rsplit("/", 1)[0] + "/999"  # same epoch: not a reset, just unknown
    SourceDisk.objects.filter(pk=disk.pk).update(change_id=bogus)

    job = replicate(vm, SyncType.INCREMENTAL)
    assert job.status == JobStatus.FAILED
    assert "QueryChangedDiskAreas" in job.error_message and bogus in job.error_message
    assert job.disks.get().bytes_done == 0
    assert SourceDisk.objects.get(pk=disk.pk).change_id == bogus
    _wait_for_no_snapshots(record, vm.moref)


def test_a_failure_mid_copy_removes_the_snapshot_and_advances_no_change_id(celery_worker_process, vcenter):
    sim, record = vcenter(vm_spec("app03", capacities=[24 * MiB, 2 * MiB]))
    live = sim.vms["app03"]["disks"]
    fill(live["2000"], [(0, 24 * MiB)], seed=1)
    fill(live["2001"], [(0, MiB)], seed=2)
    (vm,) = vmware_service.discover(record, ["app03"])
    assert replicate(vm).status == JobStatus.COMPLETED
    before = dict(SourceDisk.objects.filter(vm=vm).values_list("disk_key", "change_id"))
    history_before = ChangeIdRecord.objects.count()
    fill(live["2000"], [(0, 24 * MiB)], seed=3)  # everything changes: a slow incremental
    fill(live["2001"], [(0, 4096)], seed=4)

    job = start_replication(vm, SyncType.INCREMENTAL, bandwidth_limit_bps=2 * MiB)
    wait_until(lambda: agent_bytes_copied(job.id, "disk-2000") >= 2 * MiB, 60, "the copy well under way")
    pids = _source_export_of(job.id)
    assert pids, "the copy's source export never started"
    for pid in pids:
        os.kill(pid, 9)

    job = wait_for_job(job.id, timeout=60)
    assert job.status == JobStatus.FAILED
    assert "disk-2000" in job.error_message and "offset" in job.error_message
    assert dict(SourceDisk.objects.filter(vm=vm).values_list("disk_key", "change_id")) == before
    assert ChangeIdRecord.objects.count() == history_before
    _wait_for_no_snapshots(record, vm.moref)

    # A later run copies every change (against the old changeId) and matches.
    job = replicate(vm, SyncType.INCREMENTAL)
    assert job.status == JobStatus.COMPLETED, job.error_message
    assert job.disks.get(disk_key="disk-2000").bytes_total == 24 * MiB
    assert_targets_equal_sources(job, live)


def test_cancel_mid_copy_stops_the_copy_and_removes_the_snapshot(celery_worker_process, vcenter):
    sim, record = vcenter(vm_spec("app04", [32 * MiB]))
    fill(sim.vms["app04"]["disks"]["2000"], [(0, 32 * MiB)], seed=1)
    (vm,) = vmware_service.discover(record, ["app04"])
    job = start_replication(vm, bandwidth_limit_bps=4 * MiB)
    wait_until(lambda: agent_bytes_copied(job.id, "disk-2000") >= 2 * MiB, 60, "the copy under way")
    assert cancel_job(job.id)
    # The copy stops (its disk ends cancelled) long before the 8 s the rest of
    # it would take at 4 MiB/s; how fast is the fault suite's figure.
    wait_until(lambda: not job.disks.filter(status=DiskStatus.COPYING).exists(), 30, "the copy to stop")
    assert agent_bytes_copied(job.id, "disk-2000") < 32 * MiB
    job.refresh_from_db()
    assert job.status == JobStatus.CANCELLED and job.disks.get().status == DiskStatus.CANCELLED
    _wait_for_no_snapshots(record, vm.moref)
    assert SourceDisk.objects.get(vm=vm).change_id == ""
    wait_until(lambda: not source_exports_running(), 10, "the job's source exports to close")


def test_preflight_blocks_independent_disks_missing_privileges_and_operator_snapshots_unless_overridden(
        celery_worker_process, vcenter):
    sim, record = vcenter(
        {**vm_spec("indep01", capacities=[MiB]),
         "disks": [{"capacity_bytes": MiB, "mode": "persistent"},
                   {"capacity_bytes": MiB, "mode": "independent_persistent"}]},
        vm_spec("snapped01", capacities=[MiB]),
        vm_spec("nopriv01", capacities=[MiB], denied_privileges=[
            "VirtualMachine.State.CreateSnapshot", "VirtualMachine.Provisioning.DiskRandomRead"]),
    )
    indep, nopriv, snapped = vmware_service.discover(record, ["indep01", "snapped01", "nopriv01"])
    job = replicate(indep)
    assert job.status == JobStatus.FAILED
    assert "preflight" in job.error_message and "disk-2001 is independent_persistent" in job.error_message
    assert snapshots_of(record, indep.moref) == []

    denied = replicate(nopriv)
    assert denied.status == JobStatus.FAILED
    assert ("lacks privileges VirtualMachine.State.CreateSnapshot, VirtualMachine.Provisioning.DiskRandomRead"
            in denied.error_message), denied.error_message
    assert snapshots_of(record, nopriv.moref) == []

    with vmware_service.client_for(record) as client:
        client.create_snapshot(snapped.moref, "before-upgrade")
    job = replicate(snapped)
    assert job.status == JobStatus.FAILED
    assert "before-upgrade" in job.error_message and "existing-snapshots" in job.error_message

    job = replicate(snapped, overrides=["existing-snapshots"])
    assert job.status == JobStatus.COMPLETED, job.error_message
    assert snapshots_of(record, snapped.moref) == ["before-upgrade"]  # the operator's stays


def test_a_snapshot_vcenter_refuses_fails_the_job_with_its_reason(celery_worker_process, vcenter):
    sim, record = vcenter(vm_spec("locked01", capacities=[MiB], cbt=True, fail_snapshot=True))
    (vm,) = vmware_service.discover(record, ["locked01"])
    job = replicate(vm)
    assert job.status == JobStatus.FAILED
    assert "creating snapshot" in job.error_message and "SnapshotFault" in job.error_message
    assert not job.disks.filter(status=DiskStatus.COPYING).exists()
    assert snapshots_of(record, vm.moref) == []
    assert SourceDisk.objects.get(vm=vm).change_id == ""


def test_admin_discovers_a_vcenters_vms_and_the_job_page_shows_the_copy_plan(
        celery_worker_process, vcenter, admin_client):
    sim, record = vcenter(vm_spec("web04", capacities=[2 * MiB]))
    response = admin_client.post("/admin/replication/vcenter/",
                                 {"action": "discover_vms", "_selected_action": [record.pk]}, follow=True)
    assert [str(m) for m in response.context["messages"]] == ["vc1: 1 VMs recorded"]
    vm = VirtualMachine.objects.get(name="web04")
    job = replicate(vm, SyncType.INCREMENTAL)
    assert job.status == JobStatus.COMPLETED, job.error_message
    page = admin_client.get(f"/jobs/{job.id}/").content.decode()
    assert "no committed changeId yet: the first copy is full" in page
    assert job.snapshot_name in page and "(removed)" in page


def test_replicate_command_runs_full_then_incremental_for_a_vmware_vm(celery_worker_process, vcenter):
    sim, record = vcenter(vm_spec("web06", [3 * MiB + 1]))
    live = sim.vms["web06"]["disks"]
    fill(live["2000"], [(0, MiB)], seed=1)
    _call("discover", "--vcenter", "vc1", "--vm", "web06")
    with pytest.raises(CommandError, match="invalid choice: 'everything'"):
        call_command("replicate", "web06", "--allow", "everything")
    _call("replicate", "web06", "--wait", "--timeout", "120")
    fill(live["2000"], [(2 * MiB, 10)], seed=2)
    job_id = _call("replicate", "web06", "--incremental", "--wait", "--timeout", "120").split()[0]
    job = ReplicationJob.objects.get(pk=job_id)
    assert job.status == JobStatus.COMPLETED and job.disks.get().bytes_total == BLOCK
    assert_targets_equal_sources(job, live)
    out = _call("discover", "--vcenter", "vc1", "--vm", "web06", "--json")
    (disk,) = json.loads(out)[0]["disks"]
    assert disk["committed_change_id"] and disk["discovered_change_id"] == disk["committed_change_id"]


def test_sweeper_removes_orphaned_job_snapshots_only(vcenter):
    sim, record = vcenter(vm_spec("web02", capacities=[MiB]))
    (vm,) = vmware_service.discover(record, ["web02"])
    with vmware_service.client_for(record) as client:
        client.create_snapshot(vm.moref, "oma-repl-job-20260101-000000.000-abcdef")
        client.create_snapshot(vm.moref, "nightly-backup")
    out = _call("sweep_snapshots", "--vcenter", "vc1")
    assert "removed vc1/web02/oma-repl-job-20260101-000000.000-abcdef" in out
    assert "1 orphaned snapshots removed" in out
    assert snapshots_of(record, vm.moref) == ["nightly-backup"]


def test_commands_refuse_bad_input_with_the_reason(vcenter, tmp_path):
    with pytest.raises(CommandError, match="no vCenter named 'nowhere'"):
        call_command("discover", "--vcenter", "nowhere")
    with pytest.raises(CommandError, match="not a SHA-1 thumbprint"):
        call_command("add_vcenter", "vcx", "--host", "127.0.0.1", "--user", "u", "--password-file",
                     str(tmp_path / "pw"), "--thumbprint", "xyz")
    with pytest.raises(CommandError, match="cannot read the password"):
        call_command("add_vcenter", "vcx", "--host", "127.0.0.1", "--user", "u", "--password-file",
                     str(settings.OMA_SECRETS_DIR / "missing"), "--thumbprint", "AB" * 20)
    assert not VCenter.objects.exists()


def _call(*args) -> str:
    from io import StringIO

    out = StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


def _source_export_of(job_id: str) -> list[int]:
    """Pids of the nbdkit serving one of the job's snapshot disks."""
    job = ReplicationJob.objects.get(pk=job_id)
    if not job.snapshot_moref:
        return []
    import subprocess

    out = subprocess.run(["pgrep", "-f", f"snapshots/{job.snapshot_moref}/2000.img"], capture_output=True,
                         text=True).stdout
    return [int(pid) for pid in out.split()]


def _wait_for_no_snapshots(record, moref, timeout=30):
    wait_until(lambda: not snapshots_of(record, moref), timeout, f"the snapshots of {moref} to go", interval=0.2)


def test_vsphere_client_reports_a_vanished_vm(vcenter):
    sim, record = vcenter(vm_spec("web03", capacities=[MiB]))
    with pytest.raises(VSphereError, match="vm-99999"):
        with VSphereClient(vmware_service.connection_for(record)) as client:
            client.vm_info("vm-99999")


# The source's hardware and quiesced snapshots --------------------------------

Device = vim.vm.device
DeviceSpec = vim.vm.device.VirtualDeviceSpec
HARDWARE = ("firmware", "secure_boot", "tpm", "disk_bus", "scsi_model", "nic_model")


def reconfigure(client, moref, **spec):
    WaitForTask(client.vm_ref(moref).ReconfigVM_Task(vim.vm.ConfigSpec(**spec)))


def devices_of(client, moref):
    return list(client.vm_ref(moref).config.hardware.device)


def move_disk(client, moref, disk_key, controller=None, controller_key=None):
    """Put the disk on a new controller (or an existing one) at unit 0."""
    disk = next(d for d in devices_of(client, moref) if d.key == disk_key)
    changes = []
    if controller is not None:
        controller.key = controller_key = -100
        changes.append(DeviceSpec(operation="add", device=controller))
    disk.controllerKey, disk.unitNumber = controller_key, 0
    reconfigure(client, moref, deviceChange=[*changes, DeviceSpec(operation="edit", device=disk)])


def replace_nic(client, moref, nic_type, **changes):
    """The VM's NIC swapped for one of another model with the same MAC."""
    (nic,) = [d for d in devices_of(client, moref) if isinstance(d, Device.VirtualEthernetCard)]
    new = nic_type(key=-101, macAddress=nic.macAddress, addressType="manual", backing=nic.backing)
    reconfigure(client, moref, deviceChange=[DeviceSpec(operation="remove", device=nic),
                                             DeviceSpec(operation="add", device=new)], **changes)


def make_it_a_windows_11_vm(client, moref):
    """As vSphere builds a Windows 11 VM: its boot disk on SATA (AHCI), an
    E1000e NIC, Secure Boot and a vTPM."""
    move_disk(client, moref, 2000, Device.VirtualAHCIController(busNumber=0))
    replace_nic(client, moref, Device.VirtualE1000e, bootOptions=vim.vm.BootOptions(efiSecureBootEnabled=True))
    reconfigure(client, moref, deviceChange=[DeviceSpec(operation="add", device=Device.VirtualTPM(key=-102))])


def set_tools(client, moref, running_status, tools_status):
    """VMware Tools started or stopped in the guest (the vcsim way)."""
    reconfigure(client, moref, extraConfig=[
        vim.option.OptionValue(key="SET.guest.toolsRunningStatus", value=running_status),
        vim.option.OptionValue(key="SET.guest.toolsStatus", value=tools_status)])


def test_discovery_reads_the_sources_hardware_and_the_guests_addresses(vcenter):
    nics = [{"network": "VM Network", "mac": "00:50:56:aa:bb:01", "ips": ["fe80::250:56ff:feaa:bb01", "10.1.2.3",
                                                                          "10.1.2.4"]}]
    sim, record = vcenter(vm_spec("win11", [MiB, MiB], tools="running", nics=nics),
                          vm_spec("bios01", [MiB], firmware="bios"))
    vms = {vm["name"]: vm for vm in json.loads(_call("discover", "--vcenter", "vc1", "--json"))}
    # As the simulator creates them: boot disk on PVSCSI, a VMXNET3, no Secure Boot nor vTPM.
    assert {k: vms["win11"][k] for k in HARDWARE} == {
        "firmware": "efi", "secure_boot": False, "tpm": False, "disk_bus": "scsi", "scsi_model": "vmpvscsi",
        "nic_model": "vmxnet3"}
    # The first IPv4 address VMware Tools reports on the NIC (the IPv6 one comes first).
    assert [(n["mac"], n["ip"]) for n in vms["win11"]["nics"]] == [("00:50:56:aa:bb:01", "10.1.2.3")]
    assert [n["ip"] for n in vms["bios01"]["nics"]] == [""]  # no Tools, no address
    assert vms["bios01"]["firmware"] == "bios"

    win11 = sim.vms["win11"]["moref"]
    with vmware_service.client_for(record) as client:
        make_it_a_windows_11_vm(client, win11)
        # Secure Boot needs EFI firmware: vCenter refuses it on a BIOS VM.
        with pytest.raises(vim.fault.InvalidVmConfig):
            reconfigure(client, sim.vms["bios01"]["moref"], bootOptions=vim.vm.BootOptions(efiSecureBootEnabled=True))
        set_tools(client, win11, "guestToolsNotRunning", "toolsNotRunning")
    vms = {vm["name"]: vm for vm in json.loads(_call("discover", "--vcenter", "vc1", "--json"))}
    assert {k: vms["win11"][k] for k in HARDWARE} == {
        "firmware": "efi", "secure_boot": True, "tpm": True, "disk_bus": "sata", "scsi_model": "",
        "nic_model": "e1000e"}
    # Tools stopped: the address discovery knew is kept for the NIC's MAC.
    assert [(n["mac"], n["ip"]) for n in vms["win11"]["nics"]] == [("00:50:56:aa:bb:01", "10.1.2.3")]
    assert vms["bios01"]["secure_boot"] is False
    vm = VirtualMachine.objects.get(name="win11")
    assert (vm.secure_boot, vm.tpm, vm.disk_bus, vm.nic_model) == (True, True, "sata", "e1000e")
    # What a failover is built from carries them.
    assert {k: vm.shape()[k] for k in HARDWARE} == {k: vms["win11"][k] for k in HARDWARE}


# Each controller vSphere offers -> (disk bus, SCSI model) the destination emulates.
CONTROLLERS = [
    (lambda: Device.VirtualLsiLogicController(busNumber=1, sharedBus="noSharing"), ("scsi", "lsilogic")),
    (lambda: Device.VirtualLsiLogicSASController(busNumber=2, sharedBus="noSharing"), ("scsi", "lsisas1068")),
    (lambda: Device.VirtualBusLogicController(busNumber=3, sharedBus="noSharing"), ("scsi", "lsilogic")),
    (lambda: Device.VirtualNVMEController(busNumber=0), ("", "")),  # no NVMe bus on the destinations
    (lambda: Device.VirtualAHCIController(busNumber=0), ("sata", "")),
]
NICS = [(Device.VirtualE1000, "e1000"), (Device.VirtualVmxnet2, "e1000"), (Device.VirtualPCNet32, "e1000"),
        (Device.VirtualE1000e, "e1000e"), (Device.VirtualVmxnet3, "vmxnet3")]


def test_every_boot_controller_and_nic_model_maps_to_what_the_destination_emulates(vcenter):
    sim, record = vcenter(vm_spec("old01", [MiB, MiB]))
    moref = sim.vms["old01"]["moref"]
    with vmware_service.client_for(record) as client:
        def hardware():
            shape = client.vm_info(moref).shape()
            return (shape["disk_bus"], shape["scsi_model"]), shape["nic_model"], shape["disks"]

        assert hardware() == (("scsi", "vmpvscsi"), "vmxnet3", ["disk-2000", "disk-2001"])
        for make, expected in CONTROLLERS:
            move_disk(client, moref, 2000, make())
            assert hardware()[0] == expected, make()
        move_disk(client, moref, 2000, controller_key=200)  # the VM's first IDE controller
        assert hardware()[0] == ("ide", "")
        for nic_type, expected in NICS:
            replace_nic(client, moref, nic_type)
            assert hardware()[1] == expected, nic_type
        # The boot order names the second disk: it boots first, on its own bus.
        reconfigure(client, moref, bootOptions=vim.vm.BootOptions(
            bootOrder=[vim.vm.BootOptions.BootableDiskDevice(deviceKey=2001)]))
        assert hardware() == (("scsi", "vmpvscsi"), "vmxnet3", ["disk-2001", "disk-2000"])


def timeline(job) -> str:
    return "\n".join(job.events.values_list("message", flat=True))


def test_a_cycle_quiesces_when_vmware_tools_runs_and_says_on_the_job_why_not_otherwise(
        celery_worker_process, vcenter, admin_client):
    sim, record = vcenter(vm_spec("app01", [2 * MiB], tools="running"),
                          vm_spec("app02", [MiB], tools="running", fail_quiesce=True),
                          vm_spec("app03", [MiB]))
    live = sim.vms["app01"]["disks"]
    fill(live["2000"], [(0, MiB)], seed=1)
    app01, app02, app03 = vmware_service.discover(record, ["app01", "app02", "app03"])

    job = replicate(app01)
    assert job.status == JobStatus.COMPLETED, job.error_message
    assert "quiesced snapshot: VMware Tools quiesced the guest" in timeline(job)
    assert "crash-consistent" not in timeline(job)
    assert_targets_equal_sources(job, live, sim)

    # Tools stopped in the guest, and the NIC changed model, since discovery:
    # the cycle's snapshot is crash-consistent and says why; the VM's record
    # follows the hardware the agent read with the snapshot.
    with vmware_service.client_for(record) as client:
        set_tools(client, app01.moref, "guestToolsNotRunning", "toolsNotRunning")
        replace_nic(client, app01.moref, Device.VirtualE1000e)
    fill(live["2000"], [(MiB, 4096)], seed=2)
    job = replicate(app01, SyncType.INCREMENTAL)
    assert job.status == JobStatus.COMPLETED, job.error_message
    reason = "crash-consistent snapshot: VMware Tools is not running in the guest (guestToolsNotRunning)"
    assert reason in timeline(job) and "quiesced snapshot:" not in timeline(job)
    assert_targets_equal_sources(job, live, sim)
    assert job.vm_shape["nic_model"] == "e1000e"
    app01.refresh_from_db()
    assert app01.nic_model == "e1000e"
    page = admin_client.get(f"/jobs/{job.id}/").content.decode()
    assert reason in page

    # Tools running but the guest cannot quiesce: crash-consistent, with vCenter's fault.
    job = replicate(app02)
    assert job.status == JobStatus.COMPLETED, job.error_message
    assert ("crash-consistent snapshot: the quiesced snapshot failed" in timeline(job)
            and "ApplicationQuiesceFault" in timeline(job) and "error during quiescing" in timeline(job))
    assert snapshots_of(record, app02.moref) == []  # the job's one snapshot, removed

    # No Tools at all.
    job = replicate(app03)
    assert job.status == JobStatus.COMPLETED, job.error_message
    assert "crash-consistent snapshot: VMware Tools is not installed in the guest" in timeline(job)


def test_the_snapshot_says_how_consistent_it_is_for_every_tools_state(vcenter):
    sim, record = vcenter(vm_spec("app04", [MiB], tools="running"), vm_spec("off01", [MiB], power_state="poweredOff"))
    moref = sim.vms["app04"]["moref"]

    def snap(vm_moref):
        info = client.vm_info(vm_moref)
        taken = client.take_snapshot(info, "oma-repl-probe")
        (tree,) = client.vm_ref(vm_moref).snapshot.rootSnapshotList
        client.remove_snapshot(taken.moref)
        assert tree.quiesced is taken.quiesced  # as vCenter recorded it
        return taken.quiesced, taken.note

    with vmware_service.client_for(record) as client:
        assert snap(moref) == (True, "quiesced snapshot: VMware Tools quiesced the guest")
        set_tools(client, moref, "guestToolsExecutingScripts", "toolsOk")
        assert snap(moref) == (False, "crash-consistent snapshot: VMware Tools is starting or stopping in the "
                                      "guest (guestToolsExecutingScripts)")
        set_tools(client, moref, "guestToolsNotRunning", "toolsNotInstalled")
        assert snap(moref) == (False, "crash-consistent snapshot: VMware Tools is not installed in the guest")
        assert snap(sim.vms["off01"]["moref"]) == (False, "snapshot of a powered-off VM: its disks are at rest")
        assert client.vm_info(moref).snapshots == []

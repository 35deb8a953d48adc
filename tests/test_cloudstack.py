"""CloudStack as the destination cloud, against simulators/cloudstack.py (a
test double: no CloudStack runs here; it checks signatures and answers with
the real API's shapes and error codes), with real workers, the vCenter
simulator and real NBD exports: the volumes' "devices" are the simulator's
data files, linked where the OMA finds attached volumes."""

import hashlib
import json
import os
from io import StringIO
from pathlib import Path

import pytest
import requests
from django.conf import settings
from django.core.management import CommandError, call_command

from replication.choices import JobStatus, SyncType, VMState
from replication.models import CloudError, CloudStackConfig, VMContext
from replication.platforms.cloudstack.client import CloudClient
from replication.services import vmware as vmware_service
from replication.services.jobs import start_replication
from simulators.cloudstack import GiB
from simulators.vcenter import fill_image, vm_spec
from tests.helpers import MiB, sha256, wait_for_job

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

DISKS = [12 * MiB + 4097, 5 * MiB, 9 * MiB + 511]


@pytest.fixture
def cloud(cloud_sim):
    """conftest's simulator, and every call checked for parameters CloudStack would ignore."""
    yield cloud_sim
    sim, _ = cloud_sim
    assert sim.unknown_params == [], f"parameters CloudStack would ignore: {sim.unknown_params}"


def add_cloud(sim, secret, *extra) -> str:
    out = StringIO()
    call_command("add_cloud", "cloud1", "--api-url", sim.endpoint, "--api-key", sim.api_key, "--secret-file",
                 str(secret), "--zone", sim.zone["id"], "--disk-offering", sim.disk_offering["id"],
                 "--service-offering", sim.service_offering["id"], "--network", sim.network["id"],
                 "--template", sim.template["id"], "--oma-vm", sim.oma_vm["id"], "--device-dir", str(sim.by_id_dir),
                 *extra, stdout=out)
    return out.getvalue()


def sha256_of_first(path, nbytes: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        remaining = nbytes
        while remaining:
            chunk = f.read(min(remaining, MiB))
            if not chunk:
                break
            digest.update(chunk)
            remaining -= len(chunk)
    return digest.hexdigest()


def test_the_config_is_checked_against_the_cloud_and_its_secret_stays_out_of_the_database(cloud, tmp_path):
    sim, secret = cloud
    out = add_cloud(sim, secret)
    assert "cloud cloud1 recorded and active: zone zone1, disk offering custom, service offering medium, " \
           "network prod, template blank-bios, OMA VM oma-appliance" in out
    config = CloudStackConfig.objects.get(name="cloud1")
    assert sim.secret not in json.dumps([str(getattr(config, f.attname)) for f in config._meta.fields])

    wrong = settings.OMA_SECRETS_DIR / f"wrong-secret-{tmp_path.name}"
    wrong.write_text("not-the-secret")
    with pytest.raises(CommandError, match=r"CloudStack listZones: 401 unauthorized \(API key or secret refused\): "
                                           "unable to verify user credentials and/or request signature"):
        call_command("add_cloud", "cloud2", "--api-url", sim.endpoint, "--api-key", sim.api_key, "--secret-file",
                     str(wrong), "--zone", sim.zone["id"], "--disk-offering", sim.disk_offering["id"],
                     "--oma-vm", sim.oma_vm["id"])
    with pytest.raises(CommandError, match="CloudStack has no OMA VM with id nope"):
        call_command("add_cloud", "cloud2", "--api-url", sim.endpoint, "--api-key", sim.api_key, "--secret-file",
                     str(secret), "--zone", sim.zone["id"], "--disk-offering", sim.disk_offering["id"],
                     "--oma-vm", "nope")
    assert list(CloudStackConfig.objects.values_list("name", flat=True)) == ["cloud1"]  # nothing else stored

    # The simulator checks signatures as CloudStack does: a request signed
    # with another secret, or tampered with after signing, is refused.
    client = CloudClient(config)
    assert client.one("listZones", "zone", id=sim.zone["id"])["name"] == "zone1"
    answer = requests.get(sim.endpoint, params={"command": "listZones", "apiKey": sim.api_key, "response": "json",
                                                "signature": "AAAA"}, timeout=5)
    assert answer.status_code == 401
    assert answer.json() == {"listzonesresponse": {"uuidList": [], "errorcode": 401, "cserrorcode": 9999,
                                                   "errortext": "unable to verify user credentials and/or request "
                                                                "signature"}}


def test_a_vmware_vm_replicates_into_cloudstack_volumes_attached_to_the_oma(celery_worker_process, vcenter, cloud,
                                                                          settings):
    sim, secret = cloud
    add_cloud(sim, secret)
    settings.OMA_VOLUME_PROVIDER = "cloudstack"
    vcsim, record = vcenter(vm_spec("web01", DISKS), cbt_page_bytes=MiB)
    live = vcsim.vms["web01"]["disks"]
    fill_image(live["2000"], [(0, 3 * MiB), (DISKS[0] - 4097, 4097)], seed=1)
    fill_image(live["2001"], [(MiB, 200_000)], seed=2)
    fill_image(live["2002"], [(4 * MiB + 7, 10_000)], seed=3)
    (vm,) = vmware_service.discover(record, ["web01"])

    job = wait_for_job(start_replication(vm).id, timeout=180)
    assert job.status == JobStatus.COMPLETED, job.error_message

    volumes = {d.disk_key: d.target_volume for d in job.disks.select_related("target_volume")}
    for disk in job.disks.select_related("target_volume", "source_disk"):
        volume = disk.target_volume
        cloud_volume = sim.volumes[volume.cloud_volume_id]
        # Created at the source's size rounded up to whole GiB (the rounding recorded), attached to the OMA.
        assert (volume.provider, volume.requested_bytes, volume.size_bytes) == ("cloudstack", disk.capacity_bytes,
                                                                                GiB)
        assert cloud_volume["size"] == GiB and cloud_volume["virtualmachineid"] == sim.oma_vm["id"]
        assert volume.path == str(sim.device_path(volume.cloud_volume_id))
        assert volume.device_mapping.device_path == volume.path
        assert sha256_of_first(volume.path, disk.capacity_bytes) == \
            sha256_of_first(live[str(disk.source_disk.device_key)], disk.capacity_bytes)
    attached = CloudClient(CloudStackConfig.active()).call("listVolumes", virtualmachineid=sim.oma_vm["id"])
    assert sorted(v["id"] for v in attached["volume"]) == sorted(v.cloud_volume_id for v in volumes.values())

    fill_image(live["2000"], [(5 * MiB, 300_000)], seed=4)
    fill_image(live["2002"], [(0, 4096)], seed=5)
    incremental = wait_for_job(start_replication(vm, SyncType.INCREMENTAL).id, timeout=180)
    assert incremental.status == JobStatus.COMPLETED, incremental.error_message
    assert {d.disk_key: d.sync_type for d in incremental.disks.all()} == {
        "disk-2000": SyncType.INCREMENTAL, "disk-2001": SyncType.INCREMENTAL, "disk-2002": SyncType.INCREMENTAL}
    for disk in incremental.disks.select_related("target_volume", "source_disk"):
        assert disk.target_volume.pk == volumes[disk.disk_key].pk  # reused, not created again
        assert sha256_of_first(disk.target_volume.path, disk.capacity_bytes) == \
            sha256_of_first(live[str(disk.source_disk.device_key)], disk.capacity_bytes)
    assert sim.calls.count("createVolume") == 3 and sim.calls.count("attachVolume") == 3


def image_vm_on_cloud(tmp_path, name: str, settings):
    from replication.services.inventory import register_image_vm
    from tests.helpers import make_image

    settings.OMA_VOLUME_PROVIDER = "cloudstack"
    disk = make_image(tmp_path / f"{name}.img", 3 * MiB, [(0, MiB)])
    return register_image_vm(name, [str(disk)])


@pytest.mark.parametrize("fault, reason", [
    ("createVolume fails", "prepare failed: CloudStack createVolume: 530 internal error: Failed to create volume "
                           "on primary storage"),
    ("attach hangs", "prepare failed: CloudStack attachVolume: its job"),  # CLOUDSTACK_JOB_TIMEOUT_S in tests: 6 s
    ("zone full", "prepare failed: CloudStack createVolume: 533 insufficient capacity: Insufficient capacity: zone "
                  "zone1 has 0 GB of primary storage left"),
    ("wrong secret", "prepare failed: CloudStack createVolume: 401 unauthorized (API key or secret refused)"),
])
def test_a_cloud_that_refuses_fails_the_job_with_its_reason_and_attaches_nothing_elsewhere(
        celery_worker_process, cloud, tmp_path, settings, fault, reason):
    sim, secret = cloud
    add_cloud(sim, secret)
    if fault == "createVolume fails":
        sim.fail_jobs["createVolume"] = (530, "Failed to create volume on primary storage")
    elif fault == "attach hangs":
        sim.hang_jobs.add("attachVolume")
    elif fault == "zone full":
        sim.zone_capacity_bytes = 0
    else:
        secret.write_text("rotated-elsewhere")
    vm = image_vm_on_cloud(tmp_path, f"vm-{fault.replace(' ', '-')}", settings)
    job = wait_for_job(start_replication(vm).id, timeout=600)
    assert job.status == JobStatus.FAILED
    assert job.error_message.startswith(reason), job.error_message
    # Nothing is attached to any VM but the OMA.
    assert all(v.get("virtualmachineid") in (None, sim.oma_vm["id"]) for v in sim.volumes.values())
    assert not list(sim.by_id_dir.iterdir())  # no device appeared for the OMA either


def test_a_volume_attached_to_another_vm_is_not_taken(cloud, tmp_path, settings):
    from replication.services import volumes as volume_service

    sim, secret = cloud
    add_cloud(sim, secret)
    vm = image_vm_on_cloud(tmp_path, "vm-taken", settings)
    volume = volume_service.volume_for(vm.disks.get())
    client = CloudClient(CloudStackConfig.active())
    other = sim._new_vm("someone-else")
    sim.vms[other["id"]] = other
    made = client.call("createVolume", name="x", zoneid=sim.zone["id"], diskofferingid=sim.disk_offering["id"],
                       size=1)["volume"]
    client.call("attachVolume", id=made["id"], virtualmachineid=other["id"])
    type(volume).objects.filter(pk=volume.pk).update(cloud_volume_id=made["id"])
    volume.refresh_from_db()
    with pytest.raises(CloudError, match=f"CloudStack volume {made['id']} is attached to VM someone-else, not to "
                                         "the OMA"):
        volume_service.provision(volume, 3 * MiB)
    assert sim.volumes[made["id"]]["virtualmachineid"] == other["id"]


def test_drift_between_the_records_and_the_cloud_is_reported(cloud, tmp_path, settings, admin_client):
    from replication.services import volumes as volume_service

    sim, secret = cloud
    add_cloud(sim, secret)
    vm = image_vm_on_cloud(tmp_path, "vm-drift", settings)
    kept = volume_service.volume_for(vm.disks.get())
    volume_service.provision(kept, 3 * MiB)
    kept.refresh_from_db()
    out = StringIO()
    call_command("cloud_drift", stdout=out)
    assert out.getvalue().startswith("1 volume(s) as recorded")

    client = CloudClient(CloudStackConfig.active())
    stray = client.call("createVolume", name="stray", zoneid=sim.zone["id"], diskofferingid=sim.disk_offering["id"],
                        size=1)["volume"]
    client.call("attachVolume", id=stray["id"], virtualmachineid=sim.oma_vm["id"])
    client.call("detachVolume", id=kept.cloud_volume_id)
    client.call("deleteVolume", id=kept.cloud_volume_id)
    out = StringIO()
    with pytest.raises(SystemExit) as exited:
        call_command("cloud_drift", stdout=out)
    assert exited.value.code == 1
    assert f"unknown: {stray['id']} (stray) is attached to the OMA, no record" in out.getvalue()
    assert f"gone: vm-drift/disk-2000 ({kept.export_name}) -> {kept.cloud_volume_id} no longer exists" in \
        out.getvalue()

    page = admin_client.post("/cloud/check/").content.decode()
    assert 'data-cloud-check="ok"' in page and "zone zone1" in page
    assert page.count('data-drift="unknown"') == 1 and page.count('data-drift="gone"') == 1
    assert sim.secret not in page and sim.secret not in admin_client.get("/cloud/").content.decode()


# Failover on CloudStack -------------------------------------------------------------

def failover_json(*args) -> dict:
    out = StringIO()
    try:
        call_command(*args, "--wait", "--json", stdout=out)
    except CommandError:
        pass  # the JSON report is printed all the same; the tests read it
    return json.loads(out.getvalue())


def replicated_on_cloud(cloud, tmp_path, settings, name):
    sim, secret = cloud
    add_cloud(sim, secret)
    vm = image_vm_on_cloud(tmp_path, name, settings)
    job = wait_for_job(start_replication(vm).id, timeout=120)
    assert job.status == JobStatus.COMPLETED, job.error_message
    volume = job.disks.get().target_volume
    return sim, vm, volume, job.disks.get().capacity_bytes


def cloud_state(sim, volume_id: str) -> dict:
    """The volume as CloudStack's API shows it (listVolumes, listSnapshots):
    which VM has it, at which device, its snapshots; and whether the OMA sees
    it as a device."""
    client = CloudClient(CloudStackConfig.active())
    volume = client.one("listVolumes", "volume", id=volume_id)
    snapshots = client.call("listSnapshots", volumeid=volume_id).get("snapshot") or []
    return {"vm": volume.get("vmname"), "device": volume.get("deviceid"),
            "snapshots": sorted(s["name"] for s in snapshots), "device_link": sim.device_path(volume_id).exists()}


def point_snapshots(vm) -> list[str]:
    """The snapshots that are the VM's recovery points (one per completed cycle)."""
    from replication.models import RecoveryPoint

    return [f"point-{p.job_id}" for p in RecoveryPoint.sealed(vm)]


def test_a_cloudstack_test_failover_boots_the_replica_volumes_and_ending_it_reverts_them(
        celery_worker_process, cloud, tmp_path, settings):

    sim, vm, volume, capacity = replicated_on_cloud(cloud, tmp_path, settings, "vm-cloud-test")
    before = sha256(sim.volume_file(volume.cloud_volume_id))

    report = failover_json("failover", vm.name, "--test")

    assert report["status"] == "succeeded" and report["boot_verified"], report
    assert [s["name"] for s in report["steps"]] == ["preflight", "protect volumes", "define VM", "start VM",
                                                    "verify boot"]
    assert report["console_match"] == "CloudStack shows no console: running for 1 s"
    client = CloudClient(CloudStackConfig.active())
    test_vm = client.one("listVirtualMachines", "virtualmachine", name=report["destination_vm"])
    assert test_vm["state"] == "Running"
    # The replica volume itself is the test VM's root disk; the template's root is gone.
    assert cloud_state(sim, volume.cloud_volume_id) == {
        "vm": report["destination_vm"], "device": 0,
        "snapshots": sorted([f"{report['destination_vm']}-{report['id']}-00", *point_snapshots(vm)]),
        "device_link": False}
    assert [v["id"] for v in client.call("listVolumes", virtualmachineid=test_vm["id"])["volume"]] == [
        volume.cloud_volume_id]
    assert not any(v["name"].startswith("ROOT-") for v in client.call("listVolumes", listall=True)["volume"])

    # The guest writes its disk; ending the test reverts the volume to the snapshot.
    with open(sim.volume_file(volume.cloud_volume_id), "r+b") as disk:
        disk.write(b"written by the test VM" * 1000)
    call_command("failover_end", vm.name, stdout=StringIO())

    client = CloudClient(CloudStackConfig.active())
    assert client.one("listVirtualMachines", "virtualmachine", name=report["destination_vm"]) is None
    assert cloud_state(sim, volume.cloud_volume_id) == {"vm": "oma-appliance", "device": 1,
                                                        "snapshots": sorted(point_snapshots(vm)), "device_link": True}
    assert sha256(sim.volume_file(volume.cloud_volume_id)) == before
    from replication.platforms.cloudstack.drift import drift

    assert drift() == {"unknown": [], "gone": [], "elsewhere": [], "in_step": 1}


def test_a_cloudstack_live_failover_then_rollback(celery_worker_process, cloud, tmp_path, settings):

    sim, vm, volume, capacity = replicated_on_cloud(cloud, tmp_path, settings, "vm-cloud-live")
    source = vm.disks.get().locator
    with open(source, "r+b") as disk:  # written after the last cycle: only the final one brings it
        disk.seek(2 * MiB)
        disk.write(b"after the last cycle" * 100)

    report = failover_json("failover", vm.name, "--live")

    assert report["status"] == "succeeded" and report["state"] == "failed_over_live", report
    assert report["downtime_s"] > 0
    assert sha256_of_first(sim.volume_file(volume.cloud_volume_id), capacity) == sha256_of_first(source, capacity)
    rollback_point = sha256(sim.volume_file(volume.cloud_volume_id))
    assert cloud_state(sim, volume.cloud_volume_id)["vm"] == report["destination_vm"]
    with open(sim.volume_file(volume.cloud_volume_id), "r+b") as disk:
        disk.write(b"written in production on the cloud" * 100)

    rollback = failover_json("rollback", vm.name)

    assert rollback["status"] == "succeeded", rollback
    assert report["destination_vm"] not in [v["name"] for v in sim.vms.values()]
    assert cloud_state(sim, volume.cloud_volume_id) == {"vm": "oma-appliance", "device": 1,
                                                        "snapshots": sorted(point_snapshots(vm)), "device_link": True}
    assert sha256(sim.volume_file(volume.cloud_volume_id)) == rollback_point
    again = wait_for_job(start_replication(vm).id, timeout=120)
    assert again.status == JobStatus.COMPLETED, again.error_message


def test_a_cloudstack_failover_that_cannot_deploy_gives_the_volumes_back_to_the_oma(
        celery_worker_process, cloud, tmp_path, settings):
    sim, vm, volume, capacity = replicated_on_cloud(cloud, tmp_path, settings, "vm-cloud-nocap")
    sim.fail_jobs["deployVirtualMachine"] = (533, "Unable to create a deployment for VM: insufficient capacity")

    report = failover_json("failover", vm.name, "--test")

    assert report["status"] == "failed"
    assert report["error"] == ("CloudStack deployVirtualMachine: 533 insufficient capacity: Unable to create a "
                               "deployment for VM: insufficient capacity")
    assert [(s["name"], s["status"]) for s in report["steps"]] == [
        ("preflight", "done"), ("protect volumes", "done"), ("define VM", "failed"), ("destroy VM", "done"),
        ("discard protections", "done")]
    assert cloud_state(sim, volume.cloud_volume_id) == {"vm": "oma-appliance", "device": 1,
                                                        "snapshots": sorted(point_snapshots(vm)), "device_link": True}
    assert report["state"] == "ready_for_failover"


def test_removing_a_vms_replicas_deletes_its_cloud_volumes_and_the_next_cycle_is_full(
        celery_worker_process, cloud, tmp_path, settings, monkeypatch):
    from replication.models import SourceDisk, TargetVolume, VMContext

    sim, vm, volume, capacity = replicated_on_cloud(cloud, tmp_path, settings, "vm-unprotect")
    out = StringIO()
    call_command("remove_replicas", vm.name, "--yes", stdout=out)

    assert f"CloudStack volume {volume.cloud_volume_id} detached and deleted" in out.getvalue()
    assert volume.cloud_volume_id not in sim.volumes and not sim.device_path(volume.cloud_volume_id).exists()
    retired = TargetVolume.objects.get(pk=volume.pk)
    assert retired.retired_at is not None and retired.source_disk is None and retired.path == ""
    assert list(SourceDisk.objects.filter(vm=vm).values_list("change_id", flat=True)) == [""]
    assert VMContext.of(vm).state == "discovered"

    job = wait_for_job(start_replication(vm).id, timeout=120)
    assert job.status == JobStatus.COMPLETED, job.error_message
    fresh = job.disks.get().target_volume
    assert fresh.pk != volume.pk and fresh.cloud_volume_id in sim.volumes
    assert sha256_of_first(fresh.path, capacity) == sha256_of_first(vm.disks.get().locator, capacity)

    monkeypatch.setattr("replication.services.jobs.enqueue_prepare", lambda *args: None)
    running = start_replication(vm)
    with pytest.raises(CommandError, match=f"has a replication cycle running \\({running.id}\\)"):
        call_command("remove_replicas", vm.name, "--yes", stdout=StringIO())
    assert fresh.cloud_volume_id in sim.volumes


def test_a_live_failover_into_a_zone_without_the_memory_is_refused_before_the_source_is_touched(
        celery_worker_process, cloud, tmp_path, settings):
    sim, vm, volume, capacity = replicated_on_cloud(cloud, tmp_path, settings, "vm-cloud-nomem")
    sim.zone_memory_bytes = 256 * MiB

    report = failover_json("failover", vm.name, "--live")

    assert report["status"] == "failed"
    assert report["error"] == "the destination has 256 MiB of memory free; the VM needs 512 MiB"
    assert [s["name"] for s in report["steps"]] == ["preflight"]  # no shutdown, no final cycle
    assert cloud_state(sim, volume.cloud_volume_id)["vm"] == "oma-appliance"


def test_a_cycle_that_fails_mid_copy_on_cloudstack_reverts_the_volume_to_the_last_point(
        celery_worker_process, cloud, tmp_path, settings):
    from replication.models import RecoveryPoint
    from tests.helpers import agent_bytes_copied, make_image, wait_until

    sim, vm, volume, capacity = replicated_on_cloud(cloud, tmp_path, settings, "vm-cloud-cut")
    (point,) = RecoveryPoint.sealed(vm)
    snapshot_id = point.layers.get().handle
    at_point = sha256(sim.volume_file(volume.cloud_volume_id))
    assert sha256(sim.snapshot_file(snapshot_id)) == at_point

    # The source changes everywhere; a slow full cycle starts writing it in place, then the source dies.
    image = Path(vm.disks.get().locator)
    make_image(image, capacity, [(0, capacity)], seed=9)
    job = start_replication(vm, bandwidth_limit_bps=256 * 1024)
    wait_until(lambda: agent_bytes_copied(job.id, "disk-2000") >= 512 * 1024, 60, "half a MiB written in place")
    assert sha256(sim.volume_file(volume.cloud_volume_id)) != at_point
    os.truncate(image, 0)
    job = wait_for_job(job.id, timeout=120)
    assert job.status == JobStatus.FAILED, job.status

    # The volume is the last point again, checked through CloudStack's API and its bytes; it is
    # off the OMA (the fence) until the next cycle attaches it.
    wait_until(lambda: "revertSnapshot" in sim.calls and sha256(sim.volume_file(volume.cloud_volume_id)) == at_point,
               60, "the volume reverted to the point")
    assert cloud_state(sim, volume.cloud_volume_id)["vm"] is None
    client = CloudClient(CloudStackConfig.active())
    listed = client.one("listSnapshots", "snapshot", id=snapshot_id)
    assert (listed["name"], listed["state"]) == (f"point-{point.job_id}", "BackedUp")
    assert "revertSnapshot" in sim.calls
    assert list(RecoveryPoint.sealed(vm)) == [point]
    assert VMContext.of(vm).state == VMState.READY_FOR_FAILOVER
    assert sha256(sim.volume_file(volume.cloud_volume_id)) == at_point  # nothing wrote it since

    make_image(image, capacity, [(0, capacity)], seed=9)
    again = wait_for_job(start_replication(vm).id, timeout=120)
    assert again.status == JobStatus.COMPLETED, again.error_message
    assert sha256_of_first(sim.volume_file(volume.cloud_volume_id), capacity) == sha256(image)  # a GiB volume
    assert cloud_state(sim, volume.cloud_volume_id)["vm"] == "oma-appliance"

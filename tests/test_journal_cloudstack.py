"""The journal of CloudStack target volumes, against simulators/cloudstack.py
(a test double with the real API's commands, shapes, async jobs and rules):
a cycle writes the volume in place through the OMA's export server, its
point is a volume snapshot that really keeps the volume's bytes, a cycle
thrown away reverts the volume to the last point's snapshot (checked by
sha256 through the volume's device and through the API), and expiring a
point deletes its snapshot."""

import hashlib
import uuid
from pathlib import Path

import nbd
import pytest

from replication.models import CloudError, CloudStackConfig
from replication.platforms import get_provider
from replication.platforms.cloudstack.client import CloudClient
from replication.services import volumes as volume_service
from tests.helpers import MiB
from tests.test_cloudstack import add_cloud, cloud, image_vm_on_cloud  # noqa: F401 (the fixture)

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

SIZE = 3 * MiB


def provisioned(cloud, tmp_path, settings, name):  # noqa: F811
    """A VM's disk on a CloudStack volume attached to the OMA, exported."""
    sim, secret = cloud
    add_cloud(sim, secret)
    vm = image_vm_on_cloud(tmp_path, name, settings)
    volume = volume_service.volume_for(vm.disks.get())
    volume_service.provision(volume, SIZE)
    volume.refresh_from_db()
    return sim, volume, get_provider("cloudstack")


def write_through_export(uri: str, seed: int) -> None:
    """What a cycle's copy does: writes the volume through its NBD export."""
    handle = nbd.NBD()
    handle.connect_uri(uri)
    try:
        for offset in (0, MiB + 4096, SIZE - 8192):
            handle.pwrite(hashlib.sha256(f"{seed}-{offset}".encode()).digest() * 128, offset)
        handle.flush()
    finally:
        handle.shutdown()


def sha256_of(path, nbytes: int = SIZE) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(nbytes)).hexdigest()


def snapshots(volume) -> dict[str, dict]:
    """The volume's snapshots as CloudStack's API lists them, by name."""
    rows = CloudClient(CloudStackConfig.active()).call("listSnapshots", volumeid=volume.cloud_volume_id)
    return {s["name"]: s for s in rows.get("snapshot") or []}


def on_the_oma(sim, volume) -> bool:
    row = CloudClient(CloudStackConfig.active()).one("listVolumes", "volume", id=volume.cloud_volume_id)
    return row.get("virtualmachineid") == sim.oma_vm["id"] and sim.device_path(volume.cloud_volume_id).exists()


def test_a_point_is_a_snapshot_of_the_volume_a_cut_off_cycle_reverts_to_it_and_expiry_deletes_it(
        cloud, tmp_path, settings):  # noqa: F811
    sim, volume, provider = provisioned(cloud, tmp_path, settings, "vm-journal")
    first, second, third = (str(uuid.uuid4()) for _ in range(3))

    # The first cycle writes the volume itself and seals it as point A.
    uri = provider.open_layer(volume, first, None)
    assert uri == provider.export_uri(volume.export_name)
    write_through_export(uri, seed=1)
    content_a = sha256_of(volume.path)
    point_a = provider.seal_layer(volume, first, None)
    listed = snapshots(volume)[f"point-{first}"]
    assert (listed["id"], listed["state"], listed["volumeid"]) == (point_a, "BackedUp", volume.cloud_volume_id)
    assert sha256_of(sim.snapshot_file(point_a)) == content_a
    assert provider.layer_bytes(point_a) == int(listed["physicalsize"]) > 0
    # Sealing again (a retry) returns the same snapshot; none taken twice.
    assert provider.seal_layer(volume, first, None) == point_a
    assert sim.calls.count("createSnapshot") == 1
    assert on_the_oma(sim, volume)

    # The second cycle writes over it and is cut off: the volume is point A again.
    write_through_export(provider.open_layer(volume, second, point_a), seed=2)
    assert sha256_of(volume.path) != content_a
    done = provider.discard_layer(volume, second, point_a)
    assert done == (f"CloudStack volume {volume.cloud_volume_id} reverted to snapshot point-{first} ({point_a}); "
                    "detached from the OMA, its export closed until the next cycle")
    # The fence: no device, no export link: a late write of the cut-off cycle lands nowhere.
    assert not on_the_oma(sim, volume) and not Path(volume.path).exists()
    assert sha256_of(sim.volume_file(volume.cloud_volume_id)) == content_a
    assert sim.calls.count("revertSnapshot") == 1
    assert provider.discard_layer(volume, second, point_a) == done  # again: the same volume
    assert sha256_of(sim.volume_file(volume.cloud_volume_id)) == content_a
    provider.open_layer(volume, "next", point_a)  # the next cycle attaches it again
    assert on_the_oma(sim, volume) and sha256_of(volume.path) == content_a
    assert list(snapshots(volume)) == [f"point-{first}"]

    # The third cycle completes as point C; point A expires into it.
    write_through_export(provider.open_layer(volume, third, point_a), seed=3)
    content_c = sha256_of(volume.path)
    point_c = provider.seal_layer(volume, third, point_a)
    assert provider.merge_layers(point_a, point_c, None) == point_c
    assert list(snapshots(volume)) == [f"point-{third}"]
    assert not sim.snapshot_file(point_a).exists()
    assert provider.merge_layers(point_a, point_c, None) == point_c  # again: A is already gone
    assert sha256_of(sim.snapshot_file(point_c)) == content_c

    provider.drop_layer(point_c)
    provider.drop_layer(point_c)  # already gone: fine
    assert snapshots(volume) == {}
    with pytest.raises(CloudError, match=f"CloudStack snapshot {point_c} is gone"):
        provider.layer_bytes(point_c)


def test_the_first_cycle_has_nothing_to_revert_and_bad_handles_are_refused_with_the_reason(
        cloud, tmp_path, settings):  # noqa: F811
    sim, volume, provider = provisioned(cloud, tmp_path, settings, "vm-journal-errors")
    cycle = str(uuid.uuid4())
    write_through_export(provider.open_layer(volume, cycle, None), seed=4)
    written = sha256_of(volume.path)
    assert provider.discard_layer(volume, cycle, None) == \
        f"{volume.export_name}: nothing to revert, the volume holds no point yet (its first cycle)"
    assert sha256_of(volume.path) == written and "revertSnapshot" not in sim.calls

    gone = str(uuid.uuid4())
    with pytest.raises(CloudError, match=f"cannot revert {volume.export_name} to its last point: CloudStack "
                                         f"snapshot {gone} is gone"):
        provider.discard_layer(volume, cycle, gone)

    point = provider.seal_layer(volume, cycle, None)
    client = CloudClient(CloudStackConfig.active())
    other = client.call("createVolume", name="other", zoneid=sim.zone["id"], diskofferingid=sim.disk_offering["id"],
                        size=1)["volume"]
    foreign = client.call("createSnapshot", volumeid=other["id"], name="not-ours")["snapshot"]
    with pytest.raises(CloudError, match=f"CloudStack snapshot {foreign['id']} is of volume {other['id']}, not of "
                                         f"{volume.export_name}'s volume"):
        provider.discard_layer(volume, cycle, foreign["id"])

    # CloudStack itself refuses to revert a volume under a running VM.
    with pytest.raises(CloudError, match="CloudStack revertSnapshot: 431 parameter error: The VM the specified disk "
                                         r"is attached to is not in the shutdown state\."):
        client.call("revertSnapshot", id=point)

    client.call("detachVolume", id=volume.cloud_volume_id)
    client.call("deleteVolume", id=volume.cloud_volume_id)
    with pytest.raises(CloudError, match=f"CloudStack volume {volume.cloud_volume_id} of {volume.export_name} is "
                                         "gone"):
        provider.seal_layer(volume, str(uuid.uuid4()), point)


def test_a_cloud_without_kvm_snapshots_of_running_vms_gets_the_volume_detached_for_the_snapshot(
        cloud, tmp_path, settings):  # noqa: F811
    sim, volume, provider = provisioned(cloud, tmp_path, settings, "vm-journal-kvm")
    sim.kvm_snapshot_enabled = False  # CloudStack's default for kvm.snapshot.enabled
    client = CloudClient(CloudStackConfig.active())
    with pytest.raises(CloudError, match="CloudStack createSnapshot: 530 internal error: KVM Snapshot is not "
                                         "supported for Running VMs"):
        client.call("createSnapshot", volumeid=volume.cloud_volume_id, name="attached")

    cycle = str(uuid.uuid4())
    write_through_export(provider.open_layer(volume, cycle, None), seed=5)
    content = sha256_of(volume.path)
    point = provider.seal_layer(volume, cycle, None)
    assert snapshots(volume)[f"point-{cycle}"]["state"] == "BackedUp"
    assert sha256_of(sim.snapshot_file(point)) == content
    assert on_the_oma(sim, volume) and sha256_of(volume.path) == content
    assert sim.calls.count("detachVolume") == 1 and sim.calls.count("attachVolume") == 2


def test_a_snapshot_whose_job_failed_is_taken_again_by_the_next_seal(cloud, tmp_path, settings):  # noqa: F811
    sim, volume, provider = provisioned(cloud, tmp_path, settings, "vm-journal-retry")
    cycle = str(uuid.uuid4())
    write_through_export(provider.open_layer(volume, cycle, None), seed=6)
    content = sha256_of(volume.path)
    sim.fail_jobs["createSnapshot"] = (530, "Failed to create snapshot due to an internal error creating snapshot")
    with pytest.raises(CloudError, match="CloudStack createSnapshot: 530 internal error: Failed to create snapshot"):
        provider.seal_layer(volume, cycle, None)
    assert snapshots(volume)[f"point-{cycle}"]["state"] == "Error"

    point = provider.seal_layer(volume, cycle, None)
    assert {name: s["state"] for name, s in snapshots(volume).items()} == {f"point-{cycle}": "BackedUp"}
    assert sha256_of(sim.snapshot_file(point)) == content
    with pytest.raises(CloudError, match="CloudStack revertSnapshot: 431 parameter error: Unable to execute API "
                                         "command revertsnapshot due to invalid value. Invalid parameter id "
                                         "value=nope"):
        CloudClient(CloudStackConfig.active()).call("revertSnapshot", id="nope")


def test_a_seal_that_finds_its_snapshot_still_being_taken_waits_for_it(cloud, tmp_path, settings):  # noqa: F811
    """A worker that died after createSnapshot was sent: the next seal finds
    the snapshot listed (Allocated until its job backs it up), waits for it
    and takes no second one."""
    from cs import CloudStack

    sim, volume, provider = provisioned(cloud, tmp_path, settings, "vm-journal-pending")
    cycle = str(uuid.uuid4())
    write_through_export(provider.open_layer(volume, cycle, None), seed=7)
    content = sha256_of(volume.path)
    config = CloudStackConfig.active()
    sent = CloudStack(endpoint=config.api_url, key=config.api_key, secret=config.secret(), fetch_result=False)
    started = sent.createSnapshot(volumeid=volume.cloud_volume_id, name=f"point-{cycle}")
    assert set(started) == {"id", "jobid"}  # an async command answers with its job
    assert provider.seal_layer(volume, cycle, None) == started["id"]
    assert sim.calls.count("createSnapshot") == 1
    assert snapshots(volume)[f"point-{cycle}"]["state"] == "BackedUp"
    assert sha256_of(sim.snapshot_file(started["id"])) == content

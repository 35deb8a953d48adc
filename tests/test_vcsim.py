"""The test vCenter itself, through pyvmomi as the project's client talks to
it: login and certificate pinning, inventory reads, snapshots backed by disk
images, and changed block tracking answered from what really changed."""

import os
import ssl
from pathlib import Path

import pytest
from pyVim.connect import Connect, Disconnect
from pyVim.task import WaitForTask
from pyVmomi import vim, vmodl

from tests.helpers import sha256

pytestmark = pytest.mark.integration

KiB = 1024
MiB = 1024 * KiB
BLOCK = 64 * KiB
PAGE = 4 * MiB

DISK_A = 10 * MiB + 12345  # odd size: the last block is partial
DISK_B = 3 * MiB + 7
DISK_C = 8 * MiB


def spec(cbt=False, **extra):
    return {"vms": [{
        "name": "web01", "cbt": cbt, "firmware": "efi", "guest_id": "otherLinux64Guest",
        "power_state": "poweredOn", "nics": [{"network": "VM Network", "mac": "00:50:56:aa:bb:01"}],
        "disks": [{"capacity_bytes": DISK_A, "mode": "persistent"},
                  {"capacity_bytes": DISK_B, "mode": "independent_persistent"},
                  {"capacity_bytes": DISK_C, "mode": "persistent"}],
        **extra,
    }]}


def connect(sim, thumbprint=None, password=None):
    # pyvmomi 9 checks a pinned thumbprint only after ordinary certificate
    # verification failed, and for 127.0.0.1 verifies nothing unless given a
    # verifying context; SmartConnect's version probe does not pin at all
    # (it fails on the self-signed certificate), so Connect with a version.
    return Connect(host=sim.host, port=sim.port, user=sim.username, pwd=password or sim.password,
                   thumbprint=thumbprint or sim.thumbprint, sslContext=ssl.create_default_context(),
                   version="vim.version.v7_0", connectionPoolTimeout=30)


@pytest.fixture
def session():
    opened = []

    def open_(sim, **kwargs):
        si = connect(sim, **kwargs)
        opened.append(si)
        return si

    yield open_
    for si in opened:
        Disconnect(si)


def retrieve(si, obj, paths):
    pc = si.content.propertyCollector
    filter_spec = vmodl.query.PropertyCollector.FilterSpec(
        objectSet=[vmodl.query.PropertyCollector.ObjectSpec(obj=obj)],
        propSet=[vmodl.query.PropertyCollector.PropertySpec(type=type(obj), pathSet=paths)])
    [content] = pc.RetrieveContents([filter_spec])
    return {p.name: p.val for p in content.propSet}


def disks_of(devices):
    return {d.key: d for d in devices if isinstance(d, vim.vm.device.VirtualDisk)}


def snapshot(vm, name):
    task = vm.CreateSnapshot_Task(name=name, description="", memory=False, quiesce=False)
    WaitForTask(task)
    assert task.info.entity == vm
    return task.info.result


def remove(snap, vm):
    task = snap.RemoveSnapshot_Task(removeChildren=False)
    WaitForTask(task)
    assert task.info.entity == vm


def reconfigure_cbt(vm, enabled):
    WaitForTask(vm.ReconfigVM_Task(vim.vm.ConfigSpec(changeTrackingEnabled=enabled)))


def changed_areas(vm, snap, key, change_id, capacity):
    """All changed areas of a disk, paging like a backup client does."""
    areas, offset, pages = [], 0, 0
    while offset < capacity:
        info = vm.QueryChangedDiskAreas(snapshot=snap, deviceKey=key, startOffset=offset, changeId=change_id)
        assert info.startOffset == offset
        assert info.length == min(PAGE, capacity - offset)
        for area in info.changedArea:
            assert offset <= area.start and area.start + area.length <= offset + info.length
            areas.append((area.start, area.length))
        offset += info.length
        pages += 1
    assert pages == -(-capacity // PAGE)
    return merge(areas)


def merge(areas):
    out = []
    for start, length in sorted(areas):
        if out and out[-1][0] + out[-1][1] >= start:
            out[-1] = (out[-1][0], max(out[-1][0] + out[-1][1], start + length) - out[-1][0])
        else:
            out.append((start, length))
    return out


def blocks(first, last, capacity):
    """The area of blocks first..last, clipped at capacity."""
    return (first * BLOCK, min((last + 1) * BLOCK, capacity) - first * BLOCK)


def write(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_login_needs_the_password_and_the_pinned_certificate(vcsim_factory, session):
    sim = vcsim_factory(spec())
    assert sim.url == f"https://127.0.0.1:{sim.port}/sdk"
    assert len(sim.thumbprint.split(":")) == 20
    si = session(sim)
    assert si.content.about.apiType == "VirtualCenter"

    with pytest.raises(vim.fault.InvalidLogin):
        connect(sim, password="wrong")
    wrong = ":".join(["AA"] * 20)
    with pytest.raises(Exception, match="(?i)thumbprint"):
        connect(sim, thumbprint=wrong)


def test_vm_with_three_odd_sized_disks_is_listed_with_its_disks(vcsim_factory, session):
    sim = vcsim_factory(spec())
    info = sim.vms["web01"]
    si = session(sim)
    vm = vim.VirtualMachine(info["moref"], si._stub)

    props = retrieve(si, vm, ["name", "config.uuid", "config.hardware.device", "config.changeTrackingEnabled",
                              "config.firmware", "config.guestId", "runtime.powerState", "snapshot", "layoutEx"])
    assert props["name"] == "web01"
    assert props["config.uuid"] == info["uuid"]
    assert props["config.changeTrackingEnabled"] is False
    assert props["config.firmware"] == "efi"
    assert props["config.guestId"] == "otherLinux64Guest"
    assert props["runtime.powerState"] == "poweredOn"
    assert "snapshot" not in props  # unset without snapshots
    disks = disks_of(props["config.hardware.device"])
    assert sorted(disks) == [2000, 2001, 2002]
    expected = [(DISK_A, "persistent", "web01.vmdk"), (DISK_B, "independent_persistent", "web01_1.vmdk"),
                (DISK_C, "persistent", "web01_2.vmdk")]
    for unit, (key, (capacity, mode, name)) in enumerate(zip((2000, 2001, 2002), expected, strict=True)):
        disk = disks[key]
        assert disk.capacityInBytes == capacity
        assert disk.capacityInKB == capacity // KiB
        assert disk.unitNumber == unit
        assert isinstance(disk.backing, vim.vm.device.VirtualDisk.FlatVer2BackingInfo)
        assert disk.backing.fileName == f"[LocalDS_0] web01/{name}"
        assert disk.backing.diskMode == mode
        assert not disk.backing.changeId
        image = Path(info["disks"][str(key)])
        assert image.is_absolute() and image.stat().st_size == capacity
        assert image.stat().st_blocks == 0  # sparse
    nic = next(d for d in props["config.hardware.device"] if isinstance(d, vim.vm.device.VirtualEthernetCard))
    assert nic.macAddress == "00:50:56:aa:bb:01"
    assert nic.backing.deviceName == "VM Network"

    # pyvmomi's plain attribute reads, including an unset property
    assert vm.snapshot is None
    assert vm.config.hardware.numCPU >= 1
    assert vm.name == "web01"


def test_changed_areas_are_the_blocks_really_written(vcsim_factory, session):
    sim = vcsim_factory(spec(cbt=False), cbt_page_bytes=PAGE)
    info = sim.vms["web01"]
    images = {int(k): v for k, v in info["disks"].items()}
    si = session(sim)
    vm = vim.VirtualMachine(info["moref"], si._stub)

    with pytest.raises(vim.fault.FileFault, match="not enabled"):
        s0 = snapshot(vm, "no-cbt")
        vm.QueryChangedDiskAreas(snapshot=s0, deviceKey=2000, startOffset=0, changeId="*")
    remove(s0, vm)

    reconfigure_cbt(vm, True)
    assert vm.config.changeTrackingEnabled is True
    # Tracking starts at the next snapshot: no change id yet.
    assert all(not d.backing.changeId for d in disks_of(vm.config.hardware.device).values())

    write(images[2000], 0, b"before the first snapshot")
    s1 = snapshot(vm, "s1")
    s1_disks = disks_of(s1.config.hardware.device)
    base_ids = {key: d.backing.changeId for key, d in s1_disks.items()}
    epoch = base_ids[2000].rsplit("/", 1)[0]
    assert base_ids == {key: f"{epoch}/1" for key in (2000, 2001, 2002)}
    assert s1_disks[2000].backing.fileName == "[LocalDS_0] web01/web01.vmdk"
    live_ids = {key: d.backing.changeId for key, d in disks_of(vm.config.hardware.device).items()}
    assert live_ids == base_ids
    s1_dir = Path(sim.data_dir) / "vms" / info["moref"] / "snapshots" / s1._moId
    assert sha256(s1_dir / "2000.img") == sha256(images[2000])
    remove(s1, vm)
    assert not s1_dir.exists()
    assert vm.snapshot is None

    # Guest writes: block 0 again, a write across the first page boundary,
    # one across two block boundaries, zeros into a hole (allocates, changes
    # nothing) and the very last byte of the odd-sized disk. Disk B untouched.
    write(images[2000], 10, b"x" * 100)
    write(images[2000], PAGE - 10, b"y" * 20)
    write(images[2000], 5 * MiB + 65000, b"z" * 70000)
    write(images[2000], 7 * MiB, bytes(4096))
    write(images[2000], DISK_A - 1, b"!")
    write(images[2002], 0, b"c")
    s2 = snapshot(vm, "s2")
    s2_ids = {key: d.backing.changeId for key, d in disks_of(s2.config.hardware.device).items()}
    assert s2_ids == {key: f"{epoch}/2" for key in (2000, 2001, 2002)}
    s2_dir = Path(sim.data_dir) / "vms" / info["moref"] / "snapshots" / s2._moId
    at_snapshot = sha256(images[2000])

    last = (DISK_A - 1) // BLOCK
    written = merge([blocks(0, 0, DISK_A), blocks(PAGE // BLOCK - 1, PAGE // BLOCK, DISK_A),
                     blocks(80, 82, DISK_A), blocks(last, last, DISK_A)])
    assert written[-1] == (last * BLOCK, DISK_A - last * BLOCK)  # clipped, not a whole block
    assert changed_areas(vm, s2, 2000, base_ids[2000], DISK_A) == written
    assert changed_areas(vm, s2, 2001, base_ids[2001], DISK_B) == []
    assert changed_areas(vm, s2, 2002, base_ids[2002], DISK_C) == [(0, BLOCK)]
    assert changed_areas(vm, s2, 2000, s2_ids[2000], DISK_A) == []

    # "*": every allocated area, the zeroed block included
    allocated = merge(written + [blocks(7 * MiB // BLOCK, 7 * MiB // BLOCK, DISK_A)])
    assert changed_areas(vm, s2, 2000, "*", DISK_A) == allocated
    assert changed_areas(vm, s2, 2001, "*", DISK_B) == []

    # The snapshot image keeps the state at snapshot time.
    write(images[2000], 0, b"after s2")
    assert sha256(images[2000]) != at_snapshot
    assert sha256(s2_dir / "2000.img") == at_snapshot

    # Faults, not crashes
    with pytest.raises(vmodl.fault.InvalidArgument, match="device key"):
        vm.QueryChangedDiskAreas(snapshot=s2, deviceKey=2999, startOffset=0, changeId="*")
    with pytest.raises(vmodl.fault.InvalidArgument, match="startOffset"):
        vm.QueryChangedDiskAreas(snapshot=s2, deviceKey=2000, startOffset=DISK_A + 1, changeId="*")
    with pytest.raises(vmodl.fault.InvalidArgument, match="malformed"):
        vm.QueryChangedDiskAreas(snapshot=s2, deviceKey=2000, startOffset=0, changeId="nonsense")
    with pytest.raises(vim.fault.FileFault, match="unknown changeId"):
        vm.QueryChangedDiskAreas(snapshot=s2, deviceKey=2000, startOffset=0, changeId=f"{epoch}/9")
    with pytest.raises(vmodl.fault.InvalidArgument, match="snapshot"):
        vm.QueryChangedDiskAreas(snapshot=s1, deviceKey=2000, startOffset=0, changeId="*")

    # A CBT reset: off and on again starts a new epoch; old ids are refused.
    remove(s2, vm)
    assert not s2_dir.exists()
    reconfigure_cbt(vm, False)
    assert all(not d.backing.changeId for d in disks_of(vm.config.hardware.device).values())
    reconfigure_cbt(vm, True)
    s3 = snapshot(vm, "s3")
    s3_ids = {key: d.backing.changeId for key, d in disks_of(s3.config.hardware.device).items()}
    new_epoch = s3_ids[2000].rsplit("/", 1)[0]
    assert new_epoch != epoch and s3_ids[2000] == f"{new_epoch}/1"
    with pytest.raises(vim.fault.FileFault, match="another tracking epoch"):
        vm.QueryChangedDiskAreas(snapshot=s3, deviceKey=2000, startOffset=0, changeId=base_ids[2000])
    assert changed_areas(vm, s3, 2000, s3_ids[2000], DISK_A) == []
    # The change checkpoints outlive the snapshots.
    changes = Path(sim.data_dir) / "vms" / info["moref"] / "changes" / "2000"
    assert len(os.listdir(changes)) == 2


def test_snapshot_failure_can_be_injected(vcsim_factory, session):
    sim = vcsim_factory(spec(cbt=True, fail_snapshot=True))
    si = session(sim)
    vm = vim.VirtualMachine(sim.vms["web01"]["moref"], si._stub)
    with pytest.raises(vim.fault.SnapshotFault):
        snapshot(vm, "doomed")
    assert vm.snapshot is None


def test_rdm_and_shared_disks_show_in_the_inventory(vcsim_factory, session):
    sim = vcsim_factory({"vms": [{"name": "db01", "disks": [
        {"capacity_bytes": MiB, "mode": "persistent", "rdm": True},
        {"capacity_bytes": MiB, "mode": "persistent", "sharing": "sharingMultiWriter"}]}]})
    si = session(sim)
    vm = vim.VirtualMachine(sim.vms["db01"]["moref"], si._stub)
    disks = disks_of(retrieve(si, vm, ["config.hardware.device"])["config.hardware.device"])
    assert isinstance(disks[2000].backing, vim.vm.device.VirtualDisk.RawDiskMappingVer1BackingInfo)
    assert disks[2001].backing.sharing == "sharingMultiWriter"
    # Reconfiguring keeps the RDM backing (the library only handles flat ones).
    reconfigure_cbt(vm, True)
    disks = disks_of(vm.config.hardware.device)
    assert isinstance(disks[2000].backing, vim.vm.device.VirtualDisk.RawDiskMappingVer1BackingInfo)


def test_snapshot_tree_follows_creates_and_removes(vcsim_factory, session):
    sim = vcsim_factory(spec(cbt=True))
    si = session(sim)
    vm = vim.VirtualMachine(sim.vms["web01"]["moref"], si._stub)
    s1 = snapshot(vm, "s1")
    s2 = snapshot(vm, "s2")
    tree = vm.snapshot.rootSnapshotList
    assert [n.name for n in tree] == ["s1"] and [n.name for n in tree[0].childSnapshotList] == ["s2"]
    assert vm.snapshot.currentSnapshot == s2
    ids = {d.backing.changeId.rsplit("/", 1)[1] for d in disks_of(s2.config.hardware.device).values()}
    assert ids == {"2"}
    remove(s1, vm)  # its child moves up
    assert [n.name for n in vm.snapshot.rootSnapshotList] == ["s2"]
    assert vm.snapshot.currentSnapshot == s2
    snaps = Path(sim.data_dir) / "vms" / sim.vms["web01"]["moref"] / "snapshots"
    assert sorted(os.listdir(snaps)) == [s2._moId]
    WaitForTask(vm.RemoveAllSnapshots_Task())
    assert vm.snapshot is None and os.listdir(snaps) == []


def set_tools(vm, running_status, tools_status):
    """VMware Tools' state as the guest reports it, changed the vcsim way
    (govc vm.change -e SET.guest...)."""
    WaitForTask(vm.ReconfigVM_Task(vim.vm.ConfigSpec(extraConfig=[
        vim.option.OptionValue(key="SET.guest.toolsRunningStatus", value=running_status),
        vim.option.OptionValue(key="SET.guest.toolsStatus", value=tools_status)])))


def quiesced_snapshot(vm, name):
    task = vm.CreateSnapshot_Task(name=name, description="", memory=False, quiesce=True)
    WaitForTask(task)
    return task.info.result


def test_a_quiesced_snapshot_needs_vmware_tools_running_as_on_vcenter(vcsim_factory, session):
    sim = vcsim_factory({"vms": [
        {"name": "plain", "disks": [{"capacity_bytes": MiB}]},
        {"name": "tooled", "tools": "running", "disks": [{"capacity_bytes": MiB}],
         "nics": [{"mac": "00:50:56:aa:bb:07", "ips": ["fe80::7", "192.0.2.7"]}]},
        {"name": "freezes-badly", "tools": "running", "fail_quiesce": True, "disks": [{"capacity_bytes": MiB}]}]})
    si = session(sim)
    plain, tooled, bad = (vim.VirtualMachine(sim.vms[n]["moref"], si._stub)
                          for n in ("plain", "tooled", "freezes-badly"))
    # The library's VMs have no Tools: vCenter's own refusal of a quiesced snapshot.
    props = retrieve(si, plain, ["guest.toolsRunningStatus", "guest.toolsStatus"])
    assert props == {"guest.toolsRunningStatus": "guestToolsNotRunning", "guest.toolsStatus": "toolsNotInstalled"}
    with pytest.raises(vim.fault.ApplicationQuiesceFault) as refused:
        quiesced_snapshot(plain, "q")
    assert "VMware Tools is not currently available" in refused.value.msg
    assert retrieve(si, plain, ["snapshot"]).get("snapshot") is None
    # Tools started in the guest (the vcsim way): the same call quiesces.
    set_tools(plain, "guestToolsRunning", "toolsOk")
    quiesced_snapshot(plain, "q")
    assert [n.quiesced for n in retrieve(si, plain, ["snapshot"])["snapshot"].rootSnapshotList] == [True]
    # A spec's running Tools report the guest's addresses per NIC.
    props = retrieve(si, tooled, ["guest.toolsRunningStatus", "guest.net"])
    assert props["guest.toolsRunningStatus"] == "guestToolsRunning"
    assert [(n.macAddress, list(n.ipAddress)) for n in props["guest.net"]] == [
        ("00:50:56:aa:bb:07", ["fe80::7", "192.0.2.7"])]
    assert quiesced_snapshot(tooled, "q") is not None
    # A guest whose quiescing fails, and Tools stopped again.
    with pytest.raises(vim.fault.ApplicationQuiesceFault) as failed:
        quiesced_snapshot(bad, "q")
    assert "error during quiescing" in failed.value.msg
    snapshot(bad, "crash-consistent")  # without quiescing it works
    set_tools(tooled, "guestToolsNotRunning", "toolsNotRunning")
    with pytest.raises(vim.fault.ApplicationQuiesceFault):
        quiesced_snapshot(tooled, "q2")

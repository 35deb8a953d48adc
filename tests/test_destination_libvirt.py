"""The libvirt destination against the real thing: libvirtd, QEMU (TCG where
KVM cannot run guests) and a bootable test disk from scripts/make_boot_disk.py.

No skips: if libvirtd does not answer, these tests fail and say how to start it.
Every VM defined here is named oma-test-hv-* and destroyed by the test."""

from __future__ import annotations

import grp
import os
import pwd
import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from django.conf import settings

from replication.platforms import get_destination
from replication.platforms.base import DestinationError, VMShape
from replication.platforms.local.libvirt import LibvirtDestination
from simulators.boot_disk import boot_disk_builder
from tests.helpers import sha256, wait_until

pytestmark = pytest.mark.integration

BOOT_TIMEOUT_S = 90

make_boot_disk = boot_disk_builder()


def owner(path: Path) -> tuple[str, str, int]:
    st = path.stat()
    return pwd.getpwuid(st.st_uid).pw_name, grp.getgrgid(st.st_gid).gr_name, st.st_mode


@pytest.fixture(scope="module")
def dest():
    destination = LibvirtDestination(settings.LIBVIRT_URI, Path(settings.TEST_ROOT) / "dest-libvirt")
    try:
        destination.list_vms()
    except DestinationError as exc:
        pytest.fail(f"libvirt does not answer: {exc}")
    yield destination
    destination.close()


@pytest.fixture
def vm_names(dest):
    """Hands out VM names; every one of them is destroyed after the test."""
    names: list[str] = []

    def new() -> str:
        names.append(f"oma-test-hv-{uuid.uuid4().hex[:10]}")
        return names[-1]

    yield new
    for name in names:
        dest.destroy(name)


def wait_for_console(dest: LibvirtDestination, vm: str, text: str, timeout: float = BOOT_TIMEOUT_S) -> float:
    """Seconds until the VM's console shows text; fails with the console's tail."""
    start = time.monotonic()

    def shown() -> bool:
        if text in dest.console_text(vm):
            return True
        assert dest.state(vm) == "running", f"{vm} is {dest.state(vm)}:\n{dest.console_text(vm)[-2000:]}"
        return False

    try:
        wait_until(shown, timeout, f"{text!r} on the console of {vm}", interval=0.2)
    except AssertionError as exc:
        pytest.fail(f"{vm}: {exc}:\n{dest.console_text(vm)[-2000:]}")
    return time.monotonic() - start


def test_boot_from_overlay_shows_marker_and_leaves_the_replica_unchanged(dest, vm_names, tmp_path):
    replica = make_boot_disk.build_boot_disk(tmp_path / "replica.img", "A")
    before_sha, before_owner = sha256(replica), owner(replica)
    overlays = dest.protect([str(replica)], f"hv-{tmp_path.name}")
    assert len(overlays) == 1 and overlays[0].endswith(".qcow2")
    assert dest.protect([str(replica)], f"hv-{tmp_path.name}") == overlays  # same point: same protection

    vm = vm_names()
    assert dest.define_vm(vm, VMShape(cpus=1, memory_mib=256), [(overlays[0], "disk-2000")]) == vm
    dest.start(vm)
    assert dest.state(vm) == "running"
    wait_for_console(dest, vm, "BOOT-MARKER: A")
    console = dest.console_text(vm)
    assert "BOOT-DISK: vda serial=disk-2000" in console  # the replica's disk key reaches the guest
    assert "\x1b" not in console and "\r" not in console

    domain = ET.fromstring(dest._domain(vm).XMLDesc(0))
    assert domain.get("type") == dest.domain_type()
    assert domain.find("./devices/graphics") is None
    disk = domain.find("./devices/disk")
    assert disk.find("target").get("bus") == "virtio" and disk.find("serial").text == "disk-2000"
    assert disk.find("source").get("file") == overlays[0]
    assert domain.find("./devices/interface") is None  # no network given: no NIC

    with pytest.raises(DestinationError, match="in use by running VM"):
        dest.discard_protection(overlays)
    with pytest.raises(DestinationError, match="refusing to delete"):
        dest.discard_protection([str(replica)])

    dest.destroy(vm)
    assert dest.state(vm) == "absent"
    dest.destroy(vm)  # idempotent
    dest.discard_protection(overlays)
    assert not Path(overlays[0]).exists()
    dest.discard_protection(overlays)  # idempotent
    assert sha256(replica) == before_sha
    assert owner(replica) == before_owner  # no chown to libvirt's QEMU user


def test_marker_written_as_the_guest_would_shows_on_the_next_boot(dest, vm_names, tmp_path):
    replica = make_boot_disk.build_boot_disk(tmp_path / "replica.img", "A")
    make_boot_disk.set_marker(replica, "B")
    assert make_boot_disk.read_marker(replica) == "B"
    overlays = dest.protect([str(replica)], f"hv-{tmp_path.name}")
    vm = vm_names()
    dest.define_vm(vm, VMShape(cpus=1, memory_mib=256), [(overlays[0], "disk-2000")])
    dest.start(vm)
    wait_for_console(dest, vm, "BOOT-MARKER: B")
    assert "BOOT-MARKER: A" not in dest.console_text(vm)
    dest.destroy(vm)
    dest.discard_protection(overlays)


def test_name_collision_and_missing_disks_are_refused(dest, vm_names, tmp_path):
    replica = make_boot_disk.build_boot_disk(tmp_path / "replica.img", "A")
    overlays = dest.protect([str(replica)], f"hv-{tmp_path.name}")
    vm = vm_names()
    dest.define_vm(vm, VMShape(cpus=1, memory_mib=128), [(overlays[0], "disk-2000")])
    with pytest.raises(DestinationError, match=f"a VM named {vm} already exists"):
        dest.define_vm(vm, VMShape(cpus=1, memory_mib=128), [(overlays[0], "disk-2000")])
    with pytest.raises(DestinationError, match="does not exist"):
        dest.define_vm(vm_names(), VMShape(cpus=1, memory_mib=128), [(str(tmp_path / "gone.qcow2"), "disk-2000")])
    with pytest.raises(DestinationError, match="replica volume .* does not exist"):
        dest.protect([str(tmp_path / "gone.img")], "hv-missing")
    with pytest.raises(DestinationError, match="no VM named"):
        dest.start(f"oma-test-hv-never-{uuid.uuid4().hex[:6]}")
    assert dest.state("oma-test-hv-never-defined") == "absent"
    assert dest.console_text("oma-test-hv-never-defined") == ""
    dest.destroy(vm)
    dest.discard_protection(overlays)


def test_boot_order_and_nics_in_the_domain(dest, tmp_path):
    first = tmp_path / "a.img"
    second = tmp_path / "b.img"
    for path in (first, second):
        path.write_bytes(b"\0" * 1024 * 1024)
    shape = VMShape(cpus=2, memory_mib=512, disks=("disk-2001", "disk-2000"))
    disks = [(str(first), "disk-2000"), (str(second), "disk-2001")]
    xml = ET.fromstring(dest.domain_xml("oma-test-hv-xml", shape, disks, network="oma-isolated"))
    disks = xml.findall("./devices/disk")
    assert [d.find("serial").text for d in disks] == ["disk-2001", "disk-2000"]
    assert [d.find("target").get("dev") for d in disks] == ["vda", "vdb"]
    assert disks[0].find("boot").get("order") == "1"
    nic = xml.find("./devices/interface")
    assert nic.get("type") == "network" and nic.find("source").get("network") == "oma-isolated"
    assert nic.find("model").get("type") == "virtio"
    assert xml.find("./seclabel").get("relabel") == "no"
    with pytest.raises(DestinationError, match="boot order names disk"):
        dest.define_vm("oma-test-hv-order", VMShape(cpus=1, memory_mib=128, disks=("disk-9",)), [(str(first), "d")])


def test_libvirtd_not_running_says_how_to_start_it(tmp_path):
    absent = LibvirtDestination(f"qemu:///system?socket={tmp_path}/no-libvirt-sock", tmp_path)
    with pytest.raises(DestinationError, match=r"libvirtd is not running.*virtlogd -d && libvirtd -d"):
        absent.state("oma-test-hv-any")


def test_domain_type_is_found_by_trying(dest):
    kind = dest.domain_type()
    assert kind in ("kvm", "qemu")
    assert dest.domain_type_reason()
    # The probe's "it booted" path, exercised with TCG (which always runs):
    # the host's kernel, booted directly, reaches its root-fs panic.
    kernel, _release = make_boot_disk.find_kernel()
    booted, why = dest.boot_host_kernel("qemu", str(kernel), cpu_limit_s=120, timeout_s=60)
    assert booted, why


def test_get_destination_is_the_configured_libvirt(settings):
    settings.FAILOVER_DIR = Path(settings.TEST_ROOT) / "dest-libvirt-configured"
    destination = get_destination()
    assert isinstance(destination, LibvirtDestination)
    assert destination.uri == settings.LIBVIRT_URI and destination.run_dir == settings.FAILOVER_DIR
    assert get_destination() is destination
    assert os.fspath(destination.console_path("x")).startswith(os.fspath(settings.FAILOVER_DIR))

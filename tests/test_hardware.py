"""The destination's hardware: buses, NIC models, where each comes from.

- services.hardware's decisions (source, conversion, operator, defaults;
  Windows without VIRTIO_WIN) as unit tests. No Windows image exists here:
  virt-v2v's conversion of one is given as the report virt-v2v 2.2 prints
  (its --machine-readable messages and its -v guest capabilities), parsed by
  platforms.local.v2v as a real run's output would be.
- the domain XML of each bus, defined by the real libvirt;
- set_hardware and add_vm, their errors;
- a real test failover (libvirt, QEMU under TCG) of a guest whose initramfs
  has only SATA (AHCI) drivers: it boots on --disk-bus sata, and on virtio
  it cannot find its disk: the failover fails with the console's tail and
  leaves no domain and no overlay behind."""

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from django.core.management import CommandError

from replication.choices import FailoverStatus, JobStatus, VMState
from replication.models import FailoverJob, VirtualMachine, VMContext
from replication.platforms.base import DestinationError, GuestConversion, VMShape
from replication.platforms.local import v2v
from replication.platforms.local.domain_xml import domain_xml
from replication.services import hardware
from replication.services.jobs import start_replication
from simulators.boot_disk import boot_disk_builder
from tests.helpers import command, domains, sha256, wait_for_job

boot_disk = boot_disk_builder()



def values(hw) -> dict:
    return {key: (hw.value(key), hw.choices[key].origin) for key in ("disk_bus", "scsi_model", "nic_model")}


# What virt-v2v-in-place 2.2 prints converting a Windows guest with no virtio-win
# drivers at hand (--machine-readable on stdout, -v on stderr), shortened.
WINDOWS_NO_DRIVERS_STDOUT = "\n".join(json.dumps(m) for m in [
    {"message": "Setting up the source: -i libvirtxml win.xml", "type": "message"},
    {"message": "Inspecting the source", "type": "message"},
    {"message": "Converting Windows Server 2022 Standard to run on KVM", "type": "message"},
    {"message": "there are no virtio drivers available for this version of Windows (10.0 x86_64 Server "
                "win2k22).  virt-v2v looks for drivers in /usr/share/virtio-win\n\nThe guest will be configured "
                "to use slower emulated devices.", "type": "warning"},
    {"message": "This guest does not have virtio drivers installed.", "type": "info"},
    {"message": "Finishing off", "type": "message"},
]) + "\n[  40.1] Finishing off\n"
WINDOWS_NO_DRIVERS_STDERR = """libguestfs: launch: backend=direct
i_root = /dev/sda2
i_type = windows
i_distro = windows
i_product_name = Windows Server 2022 Standard
picked conversion module windows
gcaps_block_bus = ide
gcaps_net_bus = rtl8139
gcaps_virtio_rng = false
"""


def windows_report(block: str, net: str) -> GuestConversion:
    return v2v.report(WINDOWS_NO_DRIVERS_STDOUT.replace("does not have", "has" if block != "ide" else "does not have"),
                      WINDOWS_NO_DRIVERS_STDERR.replace("= ide", f"= {block}").replace("= rtl8139", f"= {net}"))


# services.hardware ------------------------------------------------------------

def test_the_source_buses_stand_when_the_guest_is_not_converted():
    hw = hardware.decide({"disk_bus": "sata", "nic_model": "e1000e", "firmware": "bios"}, image=True)
    assert values(hw)["disk_bus"] == ("sata", "source") and values(hw)["nic_model"] == ("e1000e", "source")
    assert hw.summary() == "BIOS · sata disk · e1000e NIC" and hw.warning == ""
    scsi = hardware.decide({"disk_bus": "scsi", "scsi_model": "vmpvscsi"}, image=False)
    assert values(scsi)["scsi_model"] == ("vmpvscsi", "source")
    assert scsi.summary().startswith("BIOS · scsi disk (vmpvscsi)")


def test_an_unknown_bus_without_conversion_gets_a_reasoned_default():
    image = hardware.decide({}, image=True)
    assert values(image) == {"disk_bus": ("virtio", "default"), "scsi_model": ("lsilogic", "default"),
                             "nic_model": ("virtio", "default")}
    assert "KVM images" in image.choices["disk_bus"].why
    vmware = hardware.decide({"guest_os": "Red Hat Enterprise Linux 8 (64-bit)"}, image=False)
    assert values(vmware)["disk_bus"] == ("sata", "default") and values(vmware)["nic_model"] == ("e1000e", "default")
    assert "SATA (AHCI)" in vmware.choices["disk_bus"].why
    windows = hardware.decide({"guest_os": "Microsoft Windows Server 2019 (64-bit)"}, image=True)
    assert values(windows)["disk_bus"] == ("sata", "default") and "Windows" in windows.choices["disk_bus"].why
    assert windows.warning == ""  # emulated devices it has drivers for: nothing to warn of


def test_a_conversion_with_virtio_drivers_moves_the_guest_to_virtio():
    report = windows_report("virtio-blk", "virtio-net")
    assert (report.block_bus, report.net_bus, report.guest_type, report.virtio) == (
        "virtio-blk", "virtio-net", "windows", True)
    hw = hardware.decide({"disk_bus": "scsi", "scsi_model": "lsisas1068", "nic_model": "vmxnet3",
                          "guest_os": "Windows"}, image=False, convert=True, conversion=report, virtio_win="/x.iso")
    assert values(hw)["disk_bus"] == ("virtio", "conversion") and values(hw)["nic_model"] == ("virtio", "conversion")
    assert hw.choices["disk_bus"].why == "virt-v2v installed virtio drivers" and hw.warning == ""
    scsi = hardware.decide({}, image=True, conversion=GuestConversion("converted", block_bus="virtio-scsi",
                                                                      net_bus="virtio-net"))
    assert values(scsi) == {"disk_bus": ("scsi", "conversion"), "scsi_model": ("virtio-scsi", "conversion"),
                            "nic_model": ("virtio", "conversion")}


def test_windows_converted_without_virtio_win_boots_on_what_virt_v2v_fell_back_to_with_a_warning():
    report = v2v.report(WINDOWS_NO_DRIVERS_STDOUT, WINDOWS_NO_DRIVERS_STDERR)
    assert (report.block_bus, report.net_bus, report.guest_type, report.product) == (
        "ide", "rtl8139", "windows", "Windows Server 2022 Standard")
    assert report.detail == ("converted Windows Server 2022 Standard by virt-v2v-in-place: no virtio drivers "
                             "installed: emulated devices (ide disk, rtl8139 NIC)")
    assert report.warnings[0].startswith("there are no virtio drivers available for this version of Windows")
    # The source was on VMware's pvscsi with vmxnet3: neither has a driver in the converted guest.
    source = {"disk_bus": "scsi", "scsi_model": "vmpvscsi", "nic_model": "vmxnet3", "guest_os": "Windows Server"}
    hw = hardware.decide(source, image=False, convert=True, conversion=report, virtio_win="")
    assert values(hw)["disk_bus"] == ("ide", "conversion") and values(hw)["nic_model"] == ("rtl8139", "conversion")
    assert "fell back to" in hw.choices["disk_bus"].why
    assert hw.warning.startswith("Windows guest converted without virtio drivers (VIRTIO_WIN is not set): it boots "
                                 "on emulated devices (ide disk, rtl8139 NIC)"), hw.warning
    # Before the conversion has run, the same outcome is expected, and said.
    expected = hardware.decide(source, image=False, convert=True, virtio_win="")
    assert values(expected)["disk_bus"] == ("ide", "conversion") and "expected" in expected.choices["disk_bus"].why
    assert expected.warning.startswith("Windows guest to be converted without virtio drivers")
    assert "64-bit Windows has no driver for it in the box" in hw.warning


def test_secure_boot_moves_an_ide_disk_to_sata_since_q35_has_no_ide():
    source = {"firmware": "efi", "secure_boot": True, "disk_bus": "ide", "nic_model": "e1000e"}
    hw = hardware.decide(source, image=False)
    assert values(hw)["disk_bus"] == ("sata", "source") and "q35" in hw.choices["disk_bus"].why
    without = hardware.decide({**source, "secure_boot": False}, image=False)
    assert values(without)["disk_bus"] == ("ide", "source")
    # With VIRTIO_WIN the expected outcome is virtio, and nothing to warn of.
    with_drivers = hardware.decide(source, image=False, convert=True, virtio_win="/srv/virtio-win.iso")
    assert values(with_drivers)["disk_bus"] == ("virtio", "conversion") and with_drivers.warning == ""


def test_the_report_without_capabilities_falls_back_on_the_verdict():
    only_messages = v2v.report(WINDOWS_NO_DRIVERS_STDOUT, "")
    assert (only_messages.block_bus, only_messages.net_bus, only_messages.guest_type) == ("ide", None, "windows")
    hw = hardware.decide({"nic_model": "e1000e", "guest_os": "windows"}, image=False, conversion=only_messages)
    assert values(hw)["disk_bus"] == ("ide", "conversion") and values(hw)["nic_model"] == ("e1000e", "source")
    linux = v2v.report(json.dumps({"message": "This guest has virtio drivers installed.", "type": "info"}), "")
    assert linux.block_bus == "virtio-blk" and linux.virtio


def test_a_failed_conversion_leaves_the_source_buses_and_says_why():
    stdout = json.dumps({"message": "inspection could not detect the source guest (or physical machine).\n\n"
                                    "Assuming that you are running virt-v2v/virt-p2v on a source which is supported "
                                    "(and not, for example, a blank disk), then this should not happen.\n\nNo root "
                                    "device found in this operating system image.", "type": "error"})
    why = v2v.failure(stdout, "")
    assert why == ("inspection could not detect the source guest (or physical machine). No root device found in "
                   "this operating system image.")
    hw = hardware.decide({"disk_bus": "sata"}, image=True, convert=True, not_converted=why)
    assert values(hw)["disk_bus"] == ("sata", "source") and why in hw.choices["disk_bus"].why
    assert hw.notes == (f"not converted: {why}",)


def test_the_operators_choice_wins_and_a_virtio_disk_for_windows_without_drivers_is_never_silent():
    report = v2v.report(WINDOWS_NO_DRIVERS_STDOUT, WINDOWS_NO_DRIVERS_STDERR)
    hw = hardware.decide({"guest_os": "Windows 11"}, image=False, convert=True, conversion=report,
                         overrides={"disk_bus": "virtio", "nic_model": "e1000e"})
    assert values(hw)["disk_bus"] == ("virtio", "operator") and values(hw)["nic_model"] == ("e1000e", "operator")
    assert "a virtio disk (operator) for a Windows guest without virtio drivers: it cannot find its boot disk " \
           "(INACCESSIBLE_BOOT_DEVICE)" in hw.warning
    unconverted = hardware.decide({"guest_os": "Windows 11"}, image=False, overrides={"nic_model": "virtio"})
    assert "a virtio NIC (operator)" in unconverted.warning
    linux = hardware.decide({"disk_bus": "sata"}, image=True, overrides={"disk_bus": "virtio"})
    assert values(linux)["disk_bus"] == ("virtio", "operator") and linux.warning == ""


def test_firmware_secure_boot_and_tpm_come_from_the_source_unless_chosen():
    hw = hardware.decide({"firmware": "efi", "secure_boot": True, "tpm": True}, image=False)
    assert [(hw.value(k), hw.choices[k].origin) for k in ("firmware", "secure_boot", "tpm")] == [
        ("efi", "source"), (True, "source"), (True, "source")]
    assert hw.summary() == "EFI Secure Boot · sata disk · e1000e NIC · vTPM"
    bios = hardware.decide({"firmware": "efi", "secure_boot": True}, image=False, overrides={"firmware": "bios"})
    assert (bios.value("firmware"), bios.value("secure_boot")) == ("bios", False)
    assert bios.choices["secure_boot"].why == "Secure Boot needs UEFI, and the firmware is BIOS"


# The domain XML of each bus ------------------------------------------------------

def xml_of(tmp_path, bus: str, disks: int = 2, **shape) -> ET.Element:
    paths = []
    for index in range(disks):
        path = tmp_path / f"d{index}.img"
        path.write_bytes(b"\0" * 4096)
        paths.append((str(path), f"disk-{2000 + index}"))
    return ET.fromstring(domain_xml("vm-x", VMShape(cpus=1, memory_mib=64, disk_bus=bus, **shape), paths, "default",
                                    kvm=False, console=tmp_path / "console.log"))


@pytest.mark.parametrize(("bus", "devs"), [("virtio", ["vda", "vdb"]), ("sata", ["sda", "sdb"]),
                                           ("scsi", ["sda", "sdb"]), ("ide", ["hda", "hdb"])])
def test_each_bus_names_its_disks_and_keeps_their_serials(tmp_path, bus, devs):
    dom = xml_of(tmp_path, bus, nic_model="e1000e")
    disks = dom.findall("./devices/disk")
    assert [(d.find("target").get("dev"), d.find("target").get("bus")) for d in disks] == [(dev, bus) for dev in devs]
    assert [d.findtext("serial") for d in disks] == ["disk-2000", "disk-2001"]
    assert [d.find("boot").get("order") for d in disks] == ["1", "2"]
    controllers = [c.get("model") for c in dom.findall("./devices/controller[@type='scsi']")]
    assert controllers == (["virtio-scsi"] if bus == "scsi" else [])
    assert [m.get("type") for m in dom.findall("./devices/interface/model")] == ["e1000e"]


@pytest.mark.parametrize("model", ["virtio-scsi", "lsilogic", "lsisas1068", "vmpvscsi"])
def test_libvirt_takes_every_scsi_controller_model(tmp_path, model):
    import libvirt

    dom = xml_of(tmp_path, "scsi", disks=1, scsi_model=model)
    assert dom.find("./devices/controller[@type='scsi']").get("model") == model
    dom.find("name").text = f"oma-hwtest-{model}"
    conn = libvirt.open("qemu:///system")
    try:
        defined = conn.defineXML(ET.tostring(dom, encoding="unicode"))
        try:
            back = ET.fromstring(defined.XMLDesc(0))
            assert back.find("./devices/controller[@type='scsi']").get("model") == model
            assert back.find("./devices/disk/target").get("bus") == "scsi"
        finally:
            defined.undefine()
    finally:
        conn.close()


def test_ide_refuses_more_disks_than_it_has_places(tmp_path):
    with pytest.raises(DestinationError, match="5 disks do not fit on IDE"):
        xml_of(tmp_path, "ide", disks=5)


# Commands -----------------------------------------------------------------------

@pytest.fixture
def image_vm(tmp_path, db):
    disk = tmp_path / "img.raw"
    disk.write_bytes(b"\0" * 1024 * 1024)
    command("add_vm", "vm-hw", "--disk", str(disk), "--disk-bus", "sata", "--nic-model", "e1000e")
    return VirtualMachine.objects.get(name="vm-hw")


@pytest.mark.django_db
def test_add_vm_records_the_source_bus_and_refuses_what_cannot_be(tmp_path, image_vm):
    assert (image_vm.disk_bus, image_vm.nic_model, image_vm.scsi_model) == ("sata", "e1000e", "")
    disk = tmp_path / "img2.raw"
    disk.write_bytes(b"\0" * 1024 * 1024)
    with pytest.raises(CommandError, match="argument --disk-bus: invalid choice: 'nvme'"):
        command("add_vm", "vm-bad", "--disk", str(disk), "--disk-bus", "nvme")
    with pytest.raises(CommandError, match="argument --nic-model: invalid choice: 'pcnet'"):
        command("add_vm", "vm-bad", "--disk", str(disk), "--nic-model", "pcnet")
    with pytest.raises(CommandError, match="--scsi-model goes with --disk-bus scsi"):
        command("add_vm", "vm-bad", "--disk", str(disk), "--disk-bus", "sata", "--scsi-model", "lsilogic")
    assert not VirtualMachine.objects.filter(name="vm-bad").exists()


@pytest.mark.django_db
def test_set_hardware_prints_each_value_with_its_origin_and_records_the_choice(image_vm):
    out = command("set_hardware", "vm-hw")
    assert out.splitlines()[0] == "vm-hw boots with: BIOS · sata disk · e1000e NIC"
    assert "  disk_bus     sata         source      the source's boot disk bus" in out
    report = json.loads(command("set_hardware", "vm-hw", "--disk-bus", "scsi", "--scsi-model", "vmpvscsi", "--json"))
    assert report["overrides"] == {"disk_bus": "scsi", "scsi_model": "vmpvscsi"}
    assert report["hardware"]["disk_bus"] == {"value": "scsi", "origin": "operator",
                                              "why": "set_hardware --disk-bus"}
    assert report["hardware"]["nic_model"]["origin"] == "source" and report["warning"] == ""
    assert report["summary"] == "BIOS · scsi disk (vmpvscsi) · e1000e NIC"
    assert VMContext.of(image_vm).hardware == {"disk_bus": "scsi", "scsi_model": "vmpvscsi"}
    # auto drops one choice; --clear all of them.
    report = json.loads(command("set_hardware", "vm-hw", "--disk-bus", "auto", "--firmware", "efi",
                                "--secure-boot", "on", "--tpm", "on", "--json"))
    assert report["overrides"] == {"scsi_model": "vmpvscsi", "firmware": "efi", "secure_boot": True, "tpm": True}
    assert report["summary"] == "EFI Secure Boot · sata disk · e1000e NIC · vTPM"
    command("set_hardware", "vm-hw", "--clear")
    assert VMContext.of(image_vm).hardware == {}


@pytest.mark.django_db
def test_set_hardware_refuses_bad_choices_with_the_reason(image_vm):
    with pytest.raises(CommandError, match="argument --disk-bus: invalid choice: 'nvme'"):
        command("set_hardware", "vm-hw", "--disk-bus", "nvme")
    with pytest.raises(CommandError, match="argument --scsi-model: invalid choice: 'buslogic'"):
        command("set_hardware", "vm-hw", "--scsi-model", "buslogic")
    with pytest.raises(CommandError, match="Secure Boot needs UEFI firmware: add --firmware efi"):
        command("set_hardware", "vm-hw", "--secure-boot", "on")
    with pytest.raises(CommandError, match="--clear removes every choice; give it alone"):
        command("set_hardware", "vm-hw", "--clear", "--nic-model", "virtio")
    with pytest.raises(CommandError, match="no VM named 'nope'"):
        command("set_hardware", "nope", "--disk-bus", "sata")
    with pytest.raises(hardware.HardwareError, match="nic model must be one of"):
        hardware.set_overrides(image_vm, {"nic_model": "pcnet"})
    assert VMContext.of(image_vm).hardware == {}


@pytest.mark.django_db
def test_a_windows_vm_without_virtio_win_shows_its_warning_on_the_vms_page(client, image_vm, settings):
    from django.contrib.auth.models import User

    settings.VIRTIO_WIN = ""
    VirtualMachine.objects.filter(pk=image_vm.pk).update(guest_os="Microsoft Windows Server 2022", disk_bus="",
                                                         nic_model="")
    command("set_guest_conversion", "vm-hw", "on")
    client.force_login(User.objects.create_superuser("admin", "a@example.com", "pw-123456"))
    page = client.get("/vms/").content.decode()
    assert "boots with BIOS · ide disk · rtl8139 NIC" in page
    assert "Windows guest to be converted without virtio drivers (VIRTIO_WIN is not set)" in page


# The source's devices as vCenter reports them (mapped in vma_agent.vmware; tested in test_vmware) --------

def test_a_scsi_controller_without_a_qemu_model_gets_the_default_and_says_so():
    hw = hardware.decide({"disk_bus": "scsi", "scsi_model": ""}, image=False)
    assert values(hw)["scsi_model"] == ("lsilogic", "default")


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_a_discovered_vmware_vm_boots_on_its_source_controller_and_nic(vcenter):
    from replication.services import vmware as vmware_service
    from simulators.vcenter import vm_spec

    _sim, record = vcenter(vm_spec("web-hw", capacities=[1024 * 1024]))
    (vm,) = vmware_service.discover(record, ["web-hw"])
    # The simulator's VMs have their disks on a paravirtual SCSI controller and vmxnet3 NICs.
    assert (vm.disk_bus, vm.scsi_model, vm.nic_model) == ("scsi", "vmpvscsi", "vmxnet3")
    hw = hardware.for_vm(vm)
    assert values(hw) == {"disk_bus": ("scsi", "source"), "scsi_model": ("vmpvscsi", "source"),
                          "nic_model": ("vmxnet3", "source")}
    assert hw.summary() == "EFI · scsi disk (vmpvscsi) · vmxnet3 NIC"


# A real failover of a SATA-only guest -----------------------------------------

@pytest.fixture
def no_leftover_vms():
    from replication.platforms import get_destination

    destination = get_destination()
    for name in destination.list_vms("oma-test-vm-sata"):
        destination.destroy(name)



def domain_disk_buses(name: str) -> list[tuple[str, str]]:
    import libvirt

    conn = libvirt.open("qemu:///system")
    try:
        xml = ET.fromstring(conn.lookupByName(name).XMLDesc(0))
    finally:
        conn.close()
    return [(t.get("dev"), t.get("bus")) for t in xml.iterfind("./devices/disk/target")]


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_a_sata_only_guest_boots_on_sata_and_not_on_virtio(celery_worker_process, no_leftover_vms, tmp_path,
                                                           settings):
    disk = tmp_path / "sata.img"
    boot_disk.build_boot_disk(disk, "SATA", drivers="sata")
    command("add_vm", "vm-sata", "--disk", str(disk), "--disk-bus", "sata", "--memory-mib", "256")
    vm = VirtualMachine.objects.get(name="vm-sata")
    job = wait_for_job(start_replication(vm).id, timeout=120)
    assert job.status == JobStatus.COMPLETED, job.error_message
    assert job.vm_shape["disk_bus"] == "sata"
    replica = Path(job.disks.get().target_volume.path)
    before = sha256(replica)
    command("set_boot_check", "vm-sata", "--regex", r"BOOT-MARKER: \w+", "--timeout", "120")

    report = json.loads(command("failover", "vm-sata", "--test", "--wait", "--json", "--timeout", "400"))

    assert report["status"] == FailoverStatus.SUCCEEDED and report["console_match"].endswith("BOOT-MARKER: SATA"), \
        report
    assert report["hardware"]["disk_bus"]["value"] == "sata" and report["hardware"]["disk_bus"]["origin"] == "source"
    assert report["hardware_warning"] == ""
    define = next(s for s in report["steps"] if s["name"] == "define VM")
    assert define["detail"].startswith("BIOS · sata disk · virtio NIC (firmware source, disk_bus source")
    assert domain_disk_buses(report["destination_vm"]) == [("sda", "sata")]
    command("failover_end", "vm-sata")

    # On virtio its initramfs finds no disk: the boot is not verified, the
    # console's last lines say why, and nothing is left behind.
    command("set_hardware", "vm-sata", "--disk-bus", "virtio")
    # The guest gives up looking for its disk ~10 s into its initramfs; the
    # deadline leaves room for a slow TCG boot on a loaded machine.
    command("set_boot_check", "vm-sata", "--regex", r"BOOT-MARKER: \w+", "--timeout", "90")
    with pytest.raises(CommandError) as refused:
        command("failover", "vm-sata", "--test", "--wait", "--timeout", "400")
    failed = FailoverJob.objects.filter(vm=vm).order_by("-pk").first()
    assert "boot not verified (not within 90 s)" in str(refused.value), (str(refused.value), failed.console_tail)
    assert failed.status == FailoverStatus.FAILED
    assert "BOOT-MARKER-ERROR: no FAT partition with a MARKER file found" in failed.console_tail, failed.console_tail
    assert failed.hardware["disk_bus"] == {"value": "virtio", "origin": "operator", "why": "set_hardware --disk-bus"}
    assert [s.name for s in failed.steps.all()][-2:] == ["destroy VM", "discard protections"]
    assert failed.destination_vm not in domains()
    assert list(Path(settings.FAILOVER_DIR).rglob("*.qcow2")) == []
    assert VMContext.of(vm).state == VMState.READY_FOR_FAILOVER
    assert sha256(replica) == before


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_a_failover_follows_a_windows_conversion_to_emulated_devices_and_says_so(tmp_path, monkeypatch, settings,
                                                                                 no_leftover_vms):
    """The failover's own path with virt-v2v's run replaced by the report it
    prints for a Windows guest without virtio-win (no Windows image here): the
    destination boots on the IDE disk it fell back to (our test guest has IDE
    drivers, so the boot is real), and the VM carries the warning."""
    from replication.platforms.local.libvirt import LibvirtDestination
    from replication.serializers import failover_json
    from replication.services import failover
    from tests.helpers import completed_cycle_on

    settings.VIRTIO_WIN = ""
    vm = completed_cycle_on(tmp_path, "vm-sata-win", monkeypatch)
    VirtualMachine.objects.filter(pk=vm.pk).update(guest_os="Microsoft Windows Server 2022 (64-bit)")
    command("set_guest_conversion", "vm-sata-win", "on")
    command("set_boot_check", "vm-sata-win", "--regex", r"BOOT-MARKER: D", "--timeout", "120")
    converted = []
    monkeypatch.setattr(LibvirtDestination, "convert_guest", lambda self, name, shape, disks: converted.append(
        name) or v2v.report(WINDOWS_NO_DRIVERS_STDOUT, WINDOWS_NO_DRIVERS_STDERR))

    job = failover.start_failover(vm)
    failover.run_failover(job.pk)
    job.refresh_from_db()

    assert job.status == FailoverStatus.SUCCEEDED and job.console_match.endswith("BOOT-MARKER: D"), job.error_message
    assert converted == [job.destination_vm]
    assert domain_disk_buses(job.destination_vm) == [("hda", "ide")]
    assert {k: (v["value"], v["origin"]) for k, v in job.hardware.items() if k in ("disk_bus", "nic_model")} == {
        "disk_bus": ("ide", "conversion"), "nic_model": ("rtl8139", "conversion")}
    warning = VMContext.of(vm).hardware_warning
    assert warning.startswith("Windows guest converted without virtio drivers (VIRTIO_WIN is not set)"), warning
    assert job.hardware["warning"] == warning and failover_json(job)["hardware_warning"] == warning
    steps = {s.name: s.detail for s in job.steps.all()}
    assert steps["convert guest"].endswith("no virtio drivers installed: emulated devices (ide disk, rtl8139 NIC)")
    assert steps["define VM"].startswith("BIOS · ide disk · rtl8139 NIC") and f"warning: {warning}" in \
        steps["define VM"]
    failover.end_test_failover(vm)
    assert job.destination_vm not in domains()

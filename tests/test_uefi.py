"""UEFI guests with real parts: a UEFI-only disk (GPT, an EFI system
partition holding a unified kernel image, no BIOS boot code; built by
scripts/make_boot_disk.py --firmware efi) replicated by a real worker pair and
booted by libvirt and QEMU (TCG where KVM cannot run a guest) through Debian's
OVMF, with its own NVRAM and a vTPM on swtpm; seen to boot on its serial
console. The same disk does not boot on BIOS, and OVMF's Secure Boot build
refuses its unsigned kernel image."""

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from django.core.management import CommandError

from replication.choices import FailoverStatus, JobStatus, VMState
from replication.models import FailoverJob, VirtualMachine, VMContext
from replication.platforms.base import DestinationError, VMShape
from replication.platforms.local import domain_xml as domain_xml_module
from replication.services.jobs import start_replication
from simulators.boot_disk import boot_disk_builder
from tests.helpers import command, domains, failover, sha256, wait_for_job

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

boot_disk = boot_disk_builder()
OVMF_CODE = "/usr/share/OVMF/OVMF_CODE_4M.fd"


@pytest.fixture(autouse=True)
def no_leftover_test_vms():
    from replication.platforms import get_destination

    destination = get_destination()
    for prefix in ("oma-test-uefi", "oma-live-uefi", "oma-test-sb", "oma-test-bios"):  # this file's VMs
        for name in destination.list_vms(prefix):
            destination.destroy(name)




def replicate(vm):
    job = wait_for_job(start_replication(vm).id, timeout=180)
    assert job.status == JobStatus.COMPLETED, job.error_message
    return job


def running_domain(name: str) -> ET.Element:
    """The live XML of a running domain (what QEMU runs, not what was asked)."""
    import libvirt

    conn = libvirt.open("qemu:///system")
    try:
        dom = conn.lookupByName(name)
        assert dom.isActive(), f"{name} is not running"
        return ET.fromstring(dom.XMLDesc(0))
    finally:
        conn.close()



def swtpm_of(name: str) -> list[str]:
    """Command lines of the swtpm processes libvirtd runs for domain ``name``."""
    lines = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and argv[0].endswith(b"swtpm") and any(name.encode() in a for a in argv):
                lines.append(" ".join(a.decode(errors="replace") for a in argv))
    return lines


def efi_vm(tmp_path, name: str, marker: str, *flags: str):
    disk = tmp_path / f"{name}.img"
    boot_disk.build_efi_boot_disk(disk, marker)
    command("add_vm", name, "--disk", str(disk), "--memory-mib", "384", "--firmware", "efi", *flags)
    return disk, VirtualMachine.objects.get(name=name)


def test_a_uefi_only_guest_boots_through_ovmf_with_its_own_nvram_and_a_vtpm_in_a_test_failover(
        celery_worker_process, tmp_path, settings):
    disk, vm = efi_vm(tmp_path, "uefi-vm", "U1", "--tpm")
    job = replicate(vm)
    assert (job.vm_shape["firmware"], job.vm_shape["tpm"], job.vm_shape["secure_boot"]) == ("efi", True, False)
    replica = Path(job.disks.get().target_volume.path)
    before = sha256(replica)
    command("set_boot_check", "uefi-vm", "--regex", r"BOOT-MARKER: \w+", "--timeout", "240")

    report = failover("uefi-vm", "--test")

    assert report["status"] == FailoverStatus.SUCCEEDED and report["boot_verified"], report
    assert report["console_match"].endswith("BOOT-MARKER: U1")
    name = report["destination_vm"]
    console = (Path(settings.FAILOVER_DIR) / f"{name}.console.log").read_text(errors="replace")
    assert "BdsDxe: starting Boot" in console  # OVMF's boot manager started the kernel image
    live = running_domain(name)
    assert live.findtext("./os/loader") == OVMF_CODE and live.find("./os/loader").get("secure") == "no"
    nvram = Path(live.findtext("./os/nvram"))
    assert nvram == Path(settings.FAILOVER_DIR) / f"{name}.VARS.fd" and nvram.stat().st_size > 0
    tpm = live.find("./devices/tpm")
    assert tpm is not None and tpm.get("model") == "tpm-crb"
    assert tpm.find("backend").get("type") == "emulator" and tpm.find("backend").get("version") == "2.0"
    assert swtpm_of(name), "no swtpm process runs for the VM"
    tpm_state = Path("/var/lib/libvirt/swtpm") / live.findtext("./uuid")
    assert tpm_state.is_dir()  # the vTPM's own state, kept by libvirt per VM

    command("failover_end", "uefi-vm")
    assert name not in domains()
    assert not nvram.exists()  # the VM's variables went with it
    assert not swtpm_of(name) and not tpm_state.exists()
    assert sha256(replica) == before


def test_a_uefi_only_guest_boots_through_ovmf_in_a_live_failover_and_rolls_back(celery_worker_process, tmp_path,
                                                                               settings):
    disk, vm = efi_vm(tmp_path, "uefi-live", "L1")
    replicate(vm)
    boot_disk.set_marker(disk, "L2")  # after the last cycle: only the final one carries it
    command("set_boot_check", "uefi-live", "--regex", "BOOT-MARKER: L2", "--timeout", "240")

    report = failover("uefi-live", "--live")

    assert report["status"] == FailoverStatus.SUCCEEDED and report["boot_verified"], report
    assert report["console_match"].endswith("BOOT-MARKER: L2")
    assert report["state"] == VMState.FAILED_OVER_LIVE
    live = running_domain(report["destination_vm"])
    assert live.findtext("./os/loader") == OVMF_CODE
    assert live.find("./devices/tpm") is None  # no vTPM unless the VM has one
    nvram = Path(live.findtext("./os/nvram"))

    rollback = json.loads(command("rollback", "uefi-live", "--wait", "--json"))
    assert rollback["status"] == FailoverStatus.SUCCEEDED, rollback
    assert report["destination_vm"] not in domains() and not nvram.exists()
    assert VMContext.of(vm).state == VMState.READY_FOR_FAILOVER


def test_the_uefi_only_disk_does_not_boot_on_bios_and_the_failover_cleans_up(celery_worker_process, tmp_path,
                                                                             settings):
    disk = tmp_path / "efi.img"
    boot_disk.build_efi_boot_disk(disk, "B1")
    command("add_vm", "bios-vm", "--disk", str(disk), "--memory-mib", "384", "--firmware", "bios")
    vm = VirtualMachine.objects.get(name="bios-vm")
    replicate(vm)
    command("set_boot_check", "bios-vm", "--regex", "BOOT-MARKER", "--timeout", "40")

    with pytest.raises(CommandError, match=r"boot not verified \(not within 40 s\)"):
        command("failover", "bios-vm", "--test", "--wait")

    job = FailoverJob.objects.get(vm=vm)
    assert job.status == FailoverStatus.FAILED and "BOOT-MARKER" not in job.console_tail
    assert [s.name for s in job.steps.all()][-2:] == ["destroy VM", "discard protections"]
    assert job.destination_vm not in domains()
    assert list(Path(settings.FAILOVER_DIR).glob("*.qcow2")) == []
    assert VMContext.of(vm).state == VMState.READY_FOR_FAILOVER


def test_secure_boot_runs_ovmf_with_microsofts_keys_which_refuses_the_unsigned_kernel_image(
        celery_worker_process, tmp_path, settings):
    """Secure Boot is enforced: the unsigned unified kernel image that boots
    without it (tests above) is refused by the firmware, which says so on the
    console; the failover fails with that tail and cleans up."""
    disk, vm = efi_vm(tmp_path, "sb-vm", "S1", "--secure-boot")
    job = replicate(vm)
    assert job.vm_shape["secure_boot"] is True
    command("set_boot_check", "sb-vm", "--regex", "BOOT-MARKER", "--timeout", "40")

    with pytest.raises(CommandError, match=r"boot not verified \(not within 40 s\)"):
        command("failover", "sb-vm", "--test", "--wait")

    failed = FailoverJob.objects.get(vm=vm)
    assert "Access Denied" in failed.console_tail and "BOOT-MARKER" not in failed.console_tail, failed.console_tail
    assert failed.destination_vm not in domains()
    assert not (Path(settings.FAILOVER_DIR) / f"{failed.destination_vm}.VARS.fd").exists()


def test_secure_boot_boots_debians_signed_shim_grub_and_kernel_and_the_guest_sees_it_on(
        celery_worker_process, tmp_path, settings):
    """The positive side: shim (signed by Microsoft's UEFI CA), grub and the
    kernel (signed by Debian) boot under the same firmware and keys, and the
    guest's kernel reports Secure Boot on."""
    disk = tmp_path / "shim.img"
    boot_disk.build_efi_boot_disk(disk, "S2", loader="shim")
    command("add_vm", "sb-shim", "--disk", str(disk), "--memory-mib", "384", "--firmware", "efi", "--secure-boot")
    replicate(VirtualMachine.objects.get(name="sb-shim"))
    command("set_boot_check", "sb-shim", "--regex", "BOOT-MARKER: S2", "--timeout", "240")

    report = failover("sb-shim", "--test")

    assert report["status"] == FailoverStatus.SUCCEEDED and report["boot_verified"], report
    name = report["destination_vm"]
    live = running_domain(name)
    assert live.findtext("./os/loader") == "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd"
    assert live.find("./os/loader").get("secure") == "yes" and live.find("./features/smm").get("state") == "on"
    console = (Path(settings.FAILOVER_DIR) / f"{name}.console.log").read_text(errors="replace")
    assert "Welcome to GRUB!" in console and "secureboot: Secure boot enabled" in console, console[-3000:]
    command("failover_end", "sb-shim")
    assert name not in domains()


def test_the_domain_of_a_secure_boot_vm_uses_the_smm_firmware_on_q35(tmp_path):
    shape = VMShape(cpus=1, memory_mib=256, firmware="efi", secure_boot=True, tpm=True)
    disk = tmp_path / "d.img"
    disk.write_bytes(b"\0" * 512)
    root = ET.fromstring(domain_xml_module.domain_xml("sb", shape, [(str(disk), "disk-2000")], None, kvm=False,
                                                      console=tmp_path / "c.log", nvram=tmp_path / "sb.VARS.fd"))
    assert root.find("./os/type").get("machine") == "q35"
    loader = root.find("./os/loader")
    assert (loader.text, loader.get("secure"), loader.get("type")) == (
        "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd", "yes", "pflash")
    assert root.find("./os/nvram").get("template") == "/usr/share/OVMF/OVMF_VARS_4M.ms.fd"
    assert root.findtext("./os/nvram") == str(tmp_path / "sb.VARS.fd")
    assert root.find("./features/smm").get("state") == "on"
    assert root.find("./devices/tpm/backend").get("version") == "2.0"
    bios = ET.fromstring(domain_xml_module.domain_xml("b", VMShape(cpus=1, memory_mib=256), [(str(disk), "d")],
                                                      None, kvm=False, console=tmp_path / "c.log"))
    assert bios.find("./os/loader") is None and bios.find("./features/smm") is None
    assert bios.find("./devices/tpm") is None


def test_missing_firmware_or_swtpm_is_a_clear_error_naming_the_package(tmp_path, monkeypatch):
    disk = tmp_path / "d.img"
    disk.write_bytes(b"\0" * 512)

    def build(shape):
        return domain_xml_module.domain_xml("x", shape, [(str(disk), "d")], None, kvm=False,
                                            console=tmp_path / "c.log", nvram=tmp_path / "x.VARS.fd")

    monkeypatch.setattr(domain_xml_module, "OVMF_DIR", tmp_path / "no-ovmf")
    with pytest.raises(DestinationError, match=r"OVMF_CODE_4M.fd is missing: install Debian's ovmf package"):
        build(VMShape(cpus=1, memory_mib=256, firmware="efi"))
    with pytest.raises(DestinationError, match=r"OVMF_CODE_4M.secboot.fd is missing \(Secure Boot\)"):
        build(VMShape(cpus=1, memory_mib=256, firmware="efi", secure_boot=True))
    build(VMShape(cpus=1, memory_mib=256))  # BIOS needs no OVMF
    monkeypatch.setattr(domain_xml_module, "SWTPM", "swtpm-not-installed")
    with pytest.raises(DestinationError, match="needs swtpm, which is missing: install Debian's swtpm"):
        build(VMShape(cpus=1, memory_mib=256, tpm=True))


def test_add_vm_secure_boot_needs_efi_and_the_flags_reach_the_failover_shape(tmp_path):
    from replication.services.failover_checks import shape_of

    disk = tmp_path / "d.img"
    disk.write_bytes(b"\0" * 2**20)
    with pytest.raises(CommandError, match="--secure-boot needs UEFI firmware: add --firmware efi"):
        command("add_vm", "sb-bios", "--disk", str(disk), "--secure-boot")
    assert not VirtualMachine.objects.filter(name="sb-bios").exists()
    command("add_vm", "sb-efi", "--disk", str(disk), "--firmware", "efi", "--secure-boot", "--tpm")
    vm = VirtualMachine.objects.get(name="sb-efi")
    assert (vm.firmware, vm.secure_boot, vm.tpm) == ("efi", True, True)

    class Cycle:
        vm_shape = vm.shape()

    Cycle.vm = vm
    shape = shape_of(Cycle, ["disk-2000"])
    assert (shape.firmware, shape.secure_boot, shape.tpm) == ("efi", True, True)
    Cycle.vm_shape = {"firmware": "bios", "secure_boot": True}  # a shape recorded inconsistently: no crash
    assert shape_of(Cycle, []).secure_boot is False

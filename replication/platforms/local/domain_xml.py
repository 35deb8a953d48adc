"""The libvirt domain XML of a failed-over VM: its shape, its disks in boot
order on the shape's bus (each with its disk key as serial number), its
NICs of the shape's model, a serial console written to a file, a VGA screen
and the guest agent's channel; UEFI firmware (OVMF, Secure Boot) and a vTPM
(swtpm) when the shape asks for them.

Ownership: libvirt's DAC driver normally chowns every disk image to its QEMU
user and leaves it so. Our domains carry a static DAC label (QEMU runs as
root, relabel='no'), so replicas, overlays and console logs keep their owner.
We run as root anyway; see the note in DESIGN.md section 6."""

from __future__ import annotations

import re
import shutil
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from pathlib import Path

from replication.platforms.base import DestinationError, DiskSpec, VMShape

QCOW2_MAGIC = b"QFI\xfb"

# Debian's ovmf: the firmware code (read-only) and the template of each VM's
# own variable store (NVRAM). Secure Boot: the SMM build, with Microsoft's
# keys enrolled in the variables (what Windows and shim-signed distributions
# boot with).
OVMF_DIR = Path("/usr/share/OVMF")
OVMF = {False: ("OVMF_CODE_4M.fd", "OVMF_VARS_4M.fd"), True: ("OVMF_CODE_4M.secboot.fd", "OVMF_VARS_4M.ms.fd")}
SWTPM = "swtpm"


def file_format(path: Path) -> str:
    with open(path, "rb") as fh:
        return "qcow2" if fh.read(4) == QCOW2_MAGIC else "raw"


def serial_for(key: str) -> str:
    # libvirt accepts only these characters in <serial>; virtio-blk shows the
    # guest at most 20 bytes of it.
    return re.sub(r"[^A-Za-z0-9_. +-]", "-", key)[:20]


def boot_order(name: str, shape: VMShape, disks: Sequence[DiskSpec]) -> list[DiskSpec]:
    """The disks in the shape's boot order by disk key; disks it does not name follow."""
    if not shape.disks:
        return list(disks)
    by_key = {key: (path, key) for path, key in disks}
    unknown = [key for key in shape.disks if key not in by_key]
    if unknown:
        raise DestinationError(f"VM {name}: boot order names disk(s) {', '.join(unknown)} not given")
    return [by_key[k] for k in shape.disks] + [d for d in disks if d[1] not in shape.disks]


def uefi_firmware(secure_boot: bool) -> tuple[Path, Path]:
    """(firmware code, variables template) of OVMF, found now: a clear
    error naming the package when they are not installed."""
    code, template = (OVMF_DIR / f for f in OVMF[secure_boot])
    for path in (code, template):
        if not path.is_file():
            raise DestinationError(f"UEFI firmware {path} is missing{' (Secure Boot)' if secure_boot else ''}: "
                                   "install Debian's ovmf package (scripts/setup.sh)")
    return code, template


def _os(dom: ET.Element, shape: VMShape, nvram: Path | None) -> None:
    """<os> and <features>: BIOS (SeaBIOS), or OVMF with the VM's own
    NVRAM, copied by libvirt from the template at the first start and removed
    with the VM (undefine with VIR_DOMAIN_UNDEFINE_NVRAM). Secure Boot needs
    SMM, so a q35 machine."""
    os_el = ET.SubElement(dom, "os")
    type_el = ET.SubElement(os_el, "type", arch="x86_64")
    type_el.text = "hvm"
    if shape.firmware == "efi":
        if nvram is None:
            raise DestinationError("a UEFI VM needs a path for its NVRAM")
        code, template = uefi_firmware(shape.secure_boot)
        if shape.secure_boot:
            type_el.set("machine", "q35")
        loader = ET.SubElement(os_el, "loader", readonly="yes", type="pflash",
                               secure="yes" if shape.secure_boot else "no")
        loader.text = str(code)
        ET.SubElement(os_el, "nvram", template=str(template)).text = str(nvram)
    features = ET.SubElement(dom, "features")
    ET.SubElement(features, "acpi")
    ET.SubElement(features, "apic")
    if shape.firmware == "efi" and shape.secure_boot:
        ET.SubElement(features, "smm", state="on")


def _tpm(devices: ET.Element, shape: VMShape) -> None:
    """A TPM 2.0 (CRB interface, as Windows 11 expects) emulated by swtpm,
    which libvirtd starts beside QEMU; its state goes with the VM."""
    if not shape.tpm:
        return
    if shutil.which(SWTPM) is None:
        raise DestinationError("a vTPM needs swtpm, which is missing: install Debian's swtpm and swtpm-tools "
                               "packages (scripts/setup.sh)")
    tpm = ET.SubElement(devices, "tpm", model="tpm-crb")
    ET.SubElement(tpm, "backend", type="emulator", version="2.0")


def domain_xml(name: str, shape: VMShape, disks: Sequence[DiskSpec], network: str | Mapping[str, str] | None,
               *, kvm: bool, console: Path, nvram: Path | None = None) -> str:
    """The domain of a VM whose disks are given in boot order (boot_order);
    a UEFI VM keeps its variables in ``nvram``."""
    dom = ET.Element("domain", type="kvm" if kvm else "qemu")
    ET.SubElement(dom, "name").text = name
    ET.SubElement(dom, "memory", unit="MiB").text = str(shape.memory_mib)
    ET.SubElement(dom, "vcpu").text = str(shape.cpus)
    _os(dom, shape, nvram)
    if kvm:
        ET.SubElement(dom, "cpu", mode="host-passthrough")
    ET.SubElement(dom, "clock", offset="utc")
    for event, action in (("on_poweroff", "destroy"), ("on_reboot", "restart"), ("on_crash", "destroy")):
        ET.SubElement(dom, event).text = action
    devices = ET.SubElement(dom, "devices")
    devices.extend(disk_elements(name, shape, disks))
    devices.extend(nics(name, shape, network))
    _serial_console(devices, str(console))
    _screen_and_agent(devices)
    _tpm(devices, shape)
    ET.SubElement(devices, "controller", type="usb", model="none")
    ET.SubElement(devices, "memballoon", model="none")
    # QEMU as root, no relabelling: replica files keep their owner.
    label = ET.SubElement(dom, "seclabel", type="static", model="dac", relabel="no")
    ET.SubElement(label, "label").text = "+0:+0"
    return ET.tostring(dom, encoding="unicode")


# The guest's name for the n-th disk on each bus (libvirt's target dev).
_DEV_PREFIX = {"virtio": "vd", "sata": "sd", "scsi": "sd", "ide": "hd"}
IDE_MAX_DISKS = 4  # two IDE channels, master and slave


def disk_elements(name: str, shape: VMShape, disks: Sequence[DiskSpec]) -> list[ET.Element]:
    """The disks in boot order on the shape's bus (virtio-blk vdX, SATA/AHCI
    sdX, SCSI sdX behind one controller of the shape's SCSI model, IDE hdX),
    each with its disk key as serial number (every one of these buses shows
    it to the guest)."""
    bus = shape.disk_bus
    if bus == "ide" and len(disks) > IDE_MAX_DISKS:
        raise DestinationError(f"VM {name}: {len(disks)} disks do not fit on IDE (at most {IDE_MAX_DISKS}); "
                               "choose another bus (manage.py set_hardware --disk-bus)")
    elements = []
    if bus == "scsi":
        elements.append(ET.Element("controller", type="scsi", index="0", model=shape.scsi_model))
    for index, (path, key) in enumerate(disks):
        disk = ET.Element("disk", type="file", device="disk")
        ET.SubElement(disk, "driver", name="qemu", type=file_format(Path(path)))
        ET.SubElement(disk, "source", file=str(Path(path).absolute()))
        ET.SubElement(disk, "target", dev=_DEV_PREFIX[bus] + _dev_letters(index), bus=bus)
        ET.SubElement(disk, "serial").text = serial_for(key)
        ET.SubElement(disk, "boot", order=str(index + 1))
        elements.append(disk)
    return elements


def _dev_letters(index: int) -> str:
    """a..z, aa..zz as the guest's kernel names disks."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    return letters[index] if index < 26 else letters[index // 26 - 1] + letters[index % 26]


def _serial_console(devices: ET.Element, console: str) -> None:
    serial = ET.SubElement(devices, "serial", type="file")
    ET.SubElement(serial, "source", path=console, append="off")
    ET.SubElement(serial, "target", port="0")
    cons = ET.SubElement(devices, "console", type="file")
    ET.SubElement(cons, "source", path=console, append="off")
    ET.SubElement(cons, "target", type="serial", port="0")


def _screen_and_agent(devices: ET.Element) -> None:
    """What the screen and agent boot probes read: a VGA card (its screen is
    what libvirt's screenshot returns; OVMF needs one too) and the QEMU
    guest agent's channel (answered only where the guest runs qemu-ga)."""
    video = ET.SubElement(devices, "video")
    ET.SubElement(video, "model", type="vga")
    channel = ET.SubElement(devices, "channel", type="unix")
    ET.SubElement(channel, "target", type="virtio", name="org.qemu.guest_agent.0")


def nics(name: str, shape: VMShape, network: str | Mapping[str, str] | None) -> list[ET.Element]:
    """One NIC of the shape's model per source NIC (one if the shape names
    none) on ``network``, or on the network its source network maps to."""
    if not network:
        return []
    elements = []
    for nic in shape.nics or (None,):
        if isinstance(network, str):
            target = network
        else:
            source = nic.source_network if nic else ""
            target = network.get(source, "")
            if not target:
                raise DestinationError(f"VM {name}: no destination network mapped for source network "
                                       f"{source!r}")
        iface = ET.Element("interface", type="network")
        ET.SubElement(iface, "source", network=target)
        if nic and nic.mac:
            ET.SubElement(iface, "mac", address=nic.mac)
        ET.SubElement(iface, "model", type=shape.nic_model)
        elements.append(iface)
    return elements

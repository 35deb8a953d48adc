"""The libvirt domain XML of a failed-over VM: its shape, its disks in boot
order (each with its disk key as serial number), its NICs, a serial
console written to a file, a VGA screen and the guest agent's channel.

Ownership: libvirt's DAC driver normally chowns every disk image to its QEMU
user and leaves it so. Our domains carry a static DAC label (QEMU runs as
root, relabel='no'), so replicas, overlays and console logs keep their owner.
We run as root anyway; see the note in DESIGN.md section 6."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from pathlib import Path

from replication.platforms.base import DestinationError, DiskSpec, VMShape

QCOW2_MAGIC = b"QFI\xfb"


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


def domain_xml(name: str, shape: VMShape, disks: Sequence[DiskSpec], network: str | Mapping[str, str] | None,
               *, kvm: bool, console: Path) -> str:
    """The domain of a VM whose disks are given in boot order (boot_order)."""
    dom = ET.Element("domain", type="kvm" if kvm else "qemu")
    ET.SubElement(dom, "name").text = name
    ET.SubElement(dom, "memory", unit="MiB").text = str(shape.memory_mib)
    ET.SubElement(dom, "vcpu").text = str(shape.cpus)
    os_el = ET.SubElement(dom, "os", firmware="efi") if shape.firmware == "efi" else ET.SubElement(dom, "os")
    ET.SubElement(os_el, "type", arch="x86_64").text = "hvm"
    features = ET.SubElement(dom, "features")
    ET.SubElement(features, "acpi")
    ET.SubElement(features, "apic")
    if kvm:
        ET.SubElement(dom, "cpu", mode="host-passthrough")
    ET.SubElement(dom, "clock", offset="utc")
    for event, action in (("on_poweroff", "destroy"), ("on_reboot", "restart"), ("on_crash", "destroy")):
        ET.SubElement(dom, event).text = action
    devices = ET.SubElement(dom, "devices")
    for index, (path, key) in enumerate(disks):
        disk = ET.SubElement(devices, "disk", type="file", device="disk")
        ET.SubElement(disk, "driver", name="qemu", type=file_format(Path(path)))
        ET.SubElement(disk, "source", file=str(Path(path).absolute()))
        ET.SubElement(disk, "target", dev=f"vd{'abcdefghijklmnopqrstuvwxyz'[index]}", bus="virtio")
        ET.SubElement(disk, "serial").text = serial_for(key)
        ET.SubElement(disk, "boot", order=str(index + 1))
    devices.extend(nics(name, shape, network))
    _serial_console(devices, str(console))
    _screen_and_agent(devices)
    ET.SubElement(devices, "controller", type="usb", model="none")
    ET.SubElement(devices, "memballoon", model="none")
    # QEMU as root, no relabelling: replica files keep their owner.
    label = ET.SubElement(dom, "seclabel", type="static", model="dac", relabel="no")
    ET.SubElement(label, "label").text = "+0:+0"
    return ET.tostring(dom, encoding="unicode")


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
    """One virtio NIC per source NIC (one if the shape names none) on
    ``network``, or on the network its source network maps to."""
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
        ET.SubElement(iface, "model", type="virtio")
        elements.append(iface)
    return elements

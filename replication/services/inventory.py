"""Source inventory: registering VMs and their disks."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from django.conf import settings
from django.db import transaction

from replication import names
from replication.choices import SourceKind
from replication.models import SourceDisk, VirtualMachine
from replication.platforms.base import DISK_BUSES, NIC_MODELS, SCSI_MODELS
from replication.services.allowlist import NotAllowed, check_source, is_nbd_uri
from vma_agent.copy import ConnectTimeout, CopyError, export_size

FIRST_DISK_KEY = 2000  # VMware numbers SCSI disks from device key 2000


class InventoryError(Exception):
    """Bad input for the inventory; the message is the reason, for the operator."""


def probe(locator: str) -> tuple[int, str]:
    """(guest-visible size in bytes, format) of an image file, block device
    or NBD export: raw, or qcow2 (read through qemu-nbd, its changes tracked
    by dirty bitmaps); refuses what the settings do not allow as a source
    (allowlist.check_source) and what cannot be read (missing, unreadable,
    another format). Gives up after PROBE_TIMEOUT_S: it runs in a web
    request."""
    try:
        target = check_source(locator)
    except NotAllowed as exc:
        raise InventoryError(str(exc)) from None
    timeout_s = settings.PROBE_TIMEOUT_S
    if is_nbd_uri(locator):
        try:
            return export_size(target, timeout_s=timeout_s), "raw"
        except ConnectTimeout:
            raise InventoryError(f"NBD source {locator} did not answer (connection and NBD handshake) within "
                                 f"{timeout_s:g} s (PROBE_TIMEOUT_S)") from None
        except CopyError as exc:
            raise InventoryError(f"cannot read NBD source {locator}: {exc}") from exc
    path = Path(target)
    if not os.access(path, os.R_OK):
        raise InventoryError(f"disk image {locator} is not readable")
    details = _image_info(path, locator, timeout_s)
    image_format = details.get("format", "unknown")
    if image_format == "qcow2":
        if details.get("backing-filename"):
            raise InventoryError(f"disk image {locator} has a backing file ({details['backing-filename']}); "
                                 "register a standalone qcow2 image")
        return int(details["virtual-size"]), "qcow2"
    if image_format != "raw":
        # Copying a vmdk/vhdx container byte for byte would be silently wrong data.
        raise InventoryError(f"disk image {locator} is {image_format}, neither raw nor qcow2; convert it, or "
                             "serve it with qemu-nbd and register the NBD URI")
    with open(path, "rb") as f:
        return f.seek(0, os.SEEK_END), "raw"


def _image_info(path: Path, locator: str, timeout_s: float) -> dict:
    try:
        out = subprocess.run(
            ["qemu-img", "info", "--output=json", "--force-share", str(path)], capture_output=True, text=True,
            check=True, timeout=timeout_s).stdout
    except subprocess.CalledProcessError as exc:
        raise InventoryError(f"cannot inspect disk image {locator}: {exc.stderr.strip()}") from exc
    except subprocess.TimeoutExpired:
        raise InventoryError(f"inspecting disk image {locator} took longer than {timeout_s:g} s "
                             "(PROBE_TIMEOUT_S)") from None
    return json.loads(out)


def register_image_vm(name: str, locators: list[str], agent: str = "local", *, cpus: int | None = None,
                      memory_mib: int | None = None, firmware: str = "bios", secure_boot: bool = False,
                      tpm: bool = False, disk_bus: str = "", scsi_model: str = "",
                      nic_model: str = "") -> VirtualMachine:
    """Register a VM whose disks are image files or NBD URIs, keys disk-2000,
    disk-2001, ... in the order given (the first boots); its shape for a
    failover from the options (unknown: the destination's defaults): UEFI
    with Secure Boot (needs efi) and a vTPM only when asked. The disk bus
    and NIC model are the devices the image's guest has drivers for, as its
    source would have had them (empty: unknown; see services.hardware)."""
    name = names.checked(name, VirtualMachine, error=InventoryError, what="VM name")
    _check_devices(disk_bus, scsi_model, nic_model)
    if cpus is not None and not 1 <= cpus <= 256:
        raise InventoryError(f"--cpus must be 1..256, not {cpus}")
    if memory_mib is not None and not 16 <= memory_mib <= 16 * 1024 * 1024:
        raise InventoryError(f"--memory-mib must be 16..16777216, not {memory_mib}")
    if firmware not in ("bios", "efi"):
        raise InventoryError(f"--firmware must be bios or efi, not {firmware!r}")
    if secure_boot and firmware != "efi":
        raise InventoryError("--secure-boot needs UEFI firmware: add --firmware efi")
    if not locators:
        raise InventoryError("a VM needs at least one --disk")
    if VirtualMachine.objects.filter(name=name).exists():
        raise InventoryError(f"a VM named {name!r} already exists")
    probed = [probe(locator) for locator in locators]
    capacities = [capacity for capacity, _ in probed]
    formats = {image_format for _, image_format in probed}
    if len(formats) > 1:
        raise InventoryError("a VM's disks must be all raw (full copies) or all qcow2 (incremental copies from "
                             "dirty bitmaps), not both")
    kind = SourceKind.QCOW2 if formats == {"qcow2"} else SourceKind.IMAGE
    with transaction.atomic():
        vm = VirtualMachine.objects.create(name=name, source_kind=kind, agent=agent, cpus=cpus,
                                           memory_mib=memory_mib, firmware=firmware, secure_boot=secure_boot,
                                           tpm=tpm, disk_bus=disk_bus, scsi_model=scsi_model, nic_model=nic_model)
        SourceDisk.objects.bulk_create(
            SourceDisk(vm=vm, disk_key=f"disk-{FIRST_DISK_KEY + i}", locator=locator, capacity_bytes=capacity)
            for i, (locator, capacity) in enumerate(zip(locators, capacities, strict=True))
        )
    return vm


def _check_devices(disk_bus: str, scsi_model: str, nic_model: str) -> None:
    for option, value, allowed in (("--disk-bus", disk_bus, DISK_BUSES), ("--scsi-model", scsi_model, SCSI_MODELS),
                                   ("--nic-model", nic_model, NIC_MODELS)):
        if value and value not in allowed:
            raise InventoryError(f"{option} must be one of {', '.join(allowed)}, not {value!r}")
    if scsi_model and disk_bus != "scsi":
        raise InventoryError("--scsi-model goes with --disk-bus scsi")


def label_disks(disks) -> list[SourceDisk]:
    """The VM's disks, each with `label`, the name an operator knows it by:
    for a vCenter disk (one with a device key) vCenter's own label, stored at
    discovery, or for a disk recorded before labels were stored "Hard disk
    N", numbered as the vSphere Client numbers them, by device key
    (disk-2000 is "Hard disk 1"); an image or NBD disk "Disk N" by its place
    among the VM's disks. Returns the disks in that order."""
    def number(disk) -> int:
        tail = disk.disk_key.rsplit("-", 1)[-1]
        return int(tail) if tail.isdigit() else 0

    ordered = sorted(disks, key=lambda d: (d.device_key is None, d.device_key or number(d), d.disk_key))
    vmware = [d for d in ordered if d.device_key is not None]
    for position, disk in enumerate(vmware, start=1):
        disk.label = disk.label or f"Hard disk {position}"
    for position, disk in enumerate([d for d in ordered if d.device_key is None], start=len(vmware) + 1):
        disk.label = f"Disk {position}"
    return ordered

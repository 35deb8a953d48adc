#!/usr/bin/env python3
"""Build a tiny bootable raw disk for failover tests, from Debian packages only.

The disk has an MBR (syslinux's boot code) and one active FAT16 partition that
holds a Debian kernel, a busybox initramfs, syslinux and a file MARKER. The
initramfs mounts that partition read-only and prints

    BOOT-MARKER: <content of MARKER>

on the serial console (ttyS0) (with --screen-only: on the VGA screen only,
after clearing it), asks for a DHCP lease if it has a virtio NIC, then idles, so a destination that waits for the
VM to be "running and printing" sees both. ``--set-marker`` rewrites MARKER in
an existing image with mtools, the way a guest writing its own disk would.

No mounts, no loop devices, no network: the FAT partition is built in a file
with mkfs.fat and mtools, made bootable with the mtools-based ``syslinux``,
and spliced behind an MBR written here. Needs: linux-image-amd64,
busybox-static, dosfstools, mtools, syslinux, syslinux-common.

    make_boot_disk.py OUT.img --marker TEXT [--size-mib 64] [--drivers all|sata] [--screen-only]
                      [--firmware efi [--efi-loader uki|shim]]
    make_boot_disk.py OUT.img --set-marker TEXT

``--firmware efi`` builds a UEFI-only disk instead: a GPT whose only
partition is an EFI system partition (FAT) holding a unified kernel image
(systemd-boot-efi's stub + the same kernel, initramfs and command line, put
together with objcopy) as \\EFI\\BOOT\\BOOTX64.EFI, and MARKER. The protective
MBR carries no boot code: a BIOS cannot boot it. Also needs: systemd-boot-efi,
binutils, fdisk (sfdisk). ``--efi-loader shim`` puts Debian's signed chain
there instead (shim-signed, grub-efi-amd64-signed and the signed kernel), the
one a firmware with Secure Boot on and Microsoft's keys enrolled boots.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import io
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

SECTOR = 512
PARTITION_START_LBA = 2048  # 1 MiB, the usual alignment
MBR_CODE = Path("/usr/lib/syslinux/mbr/mbr.bin")
BUSYBOX = Path("/bin/busybox")
MARKER_FILE = "MARKER"
MARKER_PREFIX = "BOOT-MARKER: "

# Debian builds these as modules; the initramfs loads them (in this order) so
# it can see a virtio, IDE/SATA or VMware paravirtual SCSI disk (as a Linux
# guest made on VMware carries vmw_pvscsi) and mount its FAT partition.
GUEST_MODULES = [
    "virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci", "virtio_blk",
    "scsi_common", "scsi_mod", "sd_mod", "vmw_pvscsi", "libata", "ata_piix", "libahci", "ahci",
    "fat", "vfat", "nls_cp437", "nls_ascii", "nls_utf8", "nls_iso8859-1",
]
# --drivers: which disk drivers the initramfs carries. "sata": AHCI only (no
# virtio_blk, no IDE), like a guest whose initramfs was built on a SATA VM: it
# finds its disk on a SATA bus and on no other.
DRIVER_SETS = {
    "all": GUEST_MODULES,
    "sata": ["scsi_common", "scsi_mod", "sd_mod", "libata", "libahci", "ahci",
             "fat", "vfat", "nls_cp437", "nls_ascii", "nls_utf8", "nls_iso8859-1"],
}
# The module each set needs to see its disk (built in or loadable).
_DISK_DRIVER = {"all": ("virtio_blk", "CONFIG_VIRTIO_BLK"), "sata": ("ahci", "CONFIG_SATA_AHCI")}
# A virtio NIC, so that a guest on a network asks for a DHCP lease (the network boot probe).
NET_MODULES = ["virtio_net"]

INIT_SCRIPT = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /mnt /tmp
/bin/busybox mount -t devtmpfs devtmpfs /dev
# Without this nothing we print reaches the serial port.
exec </dev/console >/dev/console 2>&1
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox --install -s /bin
export PATH=/bin
echo "BOOT-STAGE: init started"
for m in $(cat /lib/modules/order); do
  insmod "/lib/modules/$m.ko" 2>/dev/null
done
dev=""
i=0
while [ -z "$dev" ] && [ $i -lt 100 ]; do
  for d in /dev/vd?1 /dev/sd?1 /dev/hd?1; do
    [ -b "$d" ] || continue
    if mount -t vfat -o ro "$d" /mnt 2>/dev/null; then
      if [ -f /mnt/MARKER ]; then dev="$d"; break; fi
      umount /mnt
    fi
  done
  [ -n "$dev" ] || { sleep 0.1; i=$((i+1)); }
done
if [ -z "$dev" ]; then
  echo "BOOT-MARKER-ERROR: no FAT partition with a MARKER file found"
else
  disk=${dev#/dev/}; disk=${disk%1}
  # On a screen-only guest: a clear screen, the marker alone at its top (for OCR).
  case "$(cat /proc/cmdline)" in *console=tty0*) printf '\033[2J\033[H';; esac
  echo "BOOT-DISK: $disk serial=$(cat /sys/block/$disk/serial 2>/dev/null)"
  echo "BOOT-MARKER: $(cat /mnt/MARKER)"
  umount /mnt
fi
# A NIC: ask for a DHCP lease (recorded by the network's DHCP server; nothing configured here).
if [ -e /sys/class/net/eth0 ]; then
  ip link set eth0 up
  udhcpc -i eth0 -b -s /bin/true -x hostname:boot-disk >/dev/null 2>&1
fi
echo "BOOT-STAGE: idle"
while true; do sleep 3600; done
"""

SYSLINUX_CFG = """SERIAL 0 115200
DEFAULT linux
PROMPT 0
TIMEOUT 0
LABEL linux
  KERNEL /vmlinuz
  APPEND initrd=/initrd.gz console=ttyS0,115200 quiet panic=10
"""

# --screen-only: a guest that, like most VMware guests, never writes to a
# serial port: syslinux and the kernel print on the VGA screen (tty0) only.
# The init clears the screen before the marker, so it stands alone for OCR.
SYSLINUX_CFG_SCREEN = """DEFAULT linux
PROMPT 0
TIMEOUT 0
LABEL linux
  KERNEL /vmlinuz
  APPEND initrd=/initrd.gz console=tty0 quiet panic=10 vga=normal
"""


EFI_STUB = Path("/usr/lib/systemd/boot/efi/linuxx64.efi.stub")
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
UKI_PATH = "EFI/BOOT/BOOTX64.EFI"
UKI_CMDLINE = "console=ttyS0,115200 quiet panic=10"
SHIM_SIGNED = Path("/usr/lib/shim/shimx64.efi.signed")
GRUB_SIGNED = Path("/usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed")
# Not quiet: the kernel's own "secureboot: Secure boot enabled" reaches the console.
GRUB_CFG = """set default=0
set timeout=0
menuentry "boot disk" {
  linux /vmlinuz console=ttyS0,115200 panic=10
  initrd /initrd.gz
}
"""


class BootDiskError(RuntimeError):
    pass


def _run(*cmd: str, env: dict | None = None) -> None:
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "MTOOLS_SKIP_CHECK": "1", **(env or {})})
    except FileNotFoundError as exc:
        raise BootDiskError(f"{cmd[0]} is missing: run scripts/setup.sh") from exc
    except subprocess.CalledProcessError as exc:
        raise BootDiskError(f"{' '.join(cmd)} failed: {exc.stderr.strip() or exc.stdout.strip()}") from exc


def find_kernel() -> tuple[Path, str]:
    """The newest Debian kernel in /boot that has its modules installed."""

    def version_key(path: str) -> list:
        return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"[.-]", path.split("vmlinuz-", 1)[1])]

    for path in sorted(glob.glob("/boot/vmlinuz-*"), key=version_key, reverse=True):
        release = path.split("vmlinuz-", 1)[1]
        if Path("/lib/modules", release).is_dir() and os.access(path, os.R_OK):
            return Path(path), release
    raise BootDiskError("no readable /boot/vmlinuz-* with /lib/modules: install linux-image-amd64")


def _module_paths(release: str, drivers: str = "all") -> list[tuple[str, Path]]:
    """(name, .ko path) for the driver set's modules plus their dependencies, dependencies first."""
    ordered: list[tuple[str, Path]] = []
    seen: set[str] = set()

    def add(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        try:
            out = subprocess.run(["modinfo", "-k", release, name],
                                 check=True, capture_output=True, text=True, timeout=10).stdout
        except (subprocess.CalledProcessError, FileNotFoundError):
            return  # built in, or absent from this kernel: nothing to load
        fields: dict[str, str] = {}
        for line in out.splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
        for dep in filter(None, fields.get("depends", "").split(",")):
            add(dep)
        filename = fields.get("filename", "")
        if filename.endswith(".ko"):
            ordered.append((name, Path(filename)))
        elif filename.endswith((".ko.xz", ".ko.zst", ".ko.gz")):
            raise BootDiskError(f"{filename}: compressed modules are not supported")

    for name in DRIVER_SETS[drivers] + NET_MODULES:
        add(name)
    return ordered


def _cpio_newc(entries: list[tuple[str, int, bytes, int]]) -> bytes:
    """A newc cpio archive; entries are (name, mode, data, rdev) with rdev=(major<<8)|minor."""
    out = io.BytesIO()

    def pad4() -> None:
        out.write(b"\0" * (-out.tell() % 4))

    for ino, (name, mode, data, rdev) in enumerate([*entries, ("TRAILER!!!", 0, b"", 0)], start=1):
        encoded = name.encode() + b"\0"
        header = "070701" + "".join(f"{v:08x}" for v in (
            ino if name != "TRAILER!!!" else 0, mode, 0, 0, 1, 0, len(data),
            0, 0, rdev >> 8, rdev & 0xFF, len(encoded), 0))
        out.write(header.encode() + encoded)
        pad4()
        out.write(data)
        pad4()
    return out.getvalue()


def build_initramfs(release: str, drivers: str = "all") -> bytes:
    if not BUSYBOX.is_file():
        raise BootDiskError(f"{BUSYBOX} is missing: install busybox-static")
    if drivers not in DRIVER_SETS:
        raise BootDiskError(f"--drivers must be one of {', '.join(DRIVER_SETS)}, not {drivers!r}")
    modules = _module_paths(release, drivers)
    config = Path(f"/boot/config-{release}")
    config_text = config.read_text() if config.exists() else ""
    for name, option in (_DISK_DRIVER[drivers], ("vfat", "CONFIG_VFAT_FS")):
        if name not in {m for m, _ in modules} and f"{option}=y" not in config_text:
            raise BootDiskError(f"kernel {release} has {name} neither built in nor as a module")
    d, f, lnk = stat.S_IFDIR | 0o755, stat.S_IFREG, stat.S_IFLNK | 0o777
    entries: list[tuple[str, int, bytes, int]] = [
        ("bin", d, b"", 0), ("dev", d, b"", 0), ("proc", d, b"", 0), ("sys", d, b"", 0),
        ("mnt", d, b"", 0), ("tmp", d, b"", 0), ("lib", d, b"", 0), ("lib/modules", d, b"", 0),
        # The kernel opens /dev/console before /init runs: early output needs the node.
        ("dev/console", stat.S_IFCHR | 0o600, b"", (5 << 8) | 1),
        ("bin/busybox", f | 0o755, BUSYBOX.read_bytes(), 0),
        ("bin/sh", lnk, b"busybox", 0),
        ("init", f | 0o755, INIT_SCRIPT.encode(), 0),
        ("lib/modules/order", f | 0o644, "\n".join(name for name, _ in modules).encode() + b"\n", 0),
    ]
    entries += [(f"lib/modules/{name}.ko", f | 0o644, path.read_bytes(), 0) for name, path in modules]
    return gzip.compress(_cpio_newc(entries), compresslevel=6, mtime=0)


def _mbr(code: bytes, start_lba: int, sectors: int) -> bytes:
    """Boot code + one active FAT16 (LBA) partition; CHS fields set to the 'use LBA' maximum."""
    entry = struct.pack("<B3sB3sII", 0x80, b"\xfe\xff\xff", 0x0E, b"\xfe\xff\xff", start_lba, sectors)
    mbr = bytearray(SECTOR)
    mbr[: min(len(code), 440)] = code[:440]
    mbr[446:462] = entry
    mbr[510:512] = b"\x55\xaa"
    return bytes(mbr)


def partition_offset(image: str | os.PathLike) -> int:
    """Byte offset of the first partition of an MBR or GPT disk image."""
    try:
        with open(image, "rb") as fh:
            mbr = fh.read(SECTOR)
            if len(mbr) == SECTOR and mbr[446 + 4] == 0xEE:  # protective MBR: the GPT says
                return _gpt_first_partition(fh, image)
    except OSError as exc:
        raise BootDiskError(f"cannot read {image}: {exc.strerror}") from None
    if len(mbr) < SECTOR or mbr[510:512] != b"\x55\xaa":
        raise BootDiskError(f"{image}: no MBR partition table")
    start_lba = struct.unpack_from("<I", mbr, 446 + 8)[0]
    if not start_lba:
        raise BootDiskError(f"{image}: partition 1 is empty")
    return start_lba * SECTOR


def _gpt_first_partition(fh, image) -> int:
    fh.seek(SECTOR)
    header = fh.read(92)
    if header[:8] != b"EFI PART":
        raise BootDiskError(f"{image}: protective MBR but no GPT header")
    entries_lba, = struct.unpack_from("<Q", header, 72)
    fh.seek(entries_lba * SECTOR)
    first_lba, = struct.unpack_from("<Q", fh.read(128), 32)
    if not first_lba:
        raise BootDiskError(f"{image}: partition 1 is empty")
    return first_lba * SECTOR


def _parents(dest: str) -> list[str]:
    """EFI/BOOT/x.efi -> [EFI, EFI/BOOT]."""
    parts = dest.split("/")[:-1]
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


def build_uki(kernel: Path, initrd: Path, out: Path) -> Path:
    """A unified kernel image: systemd-boot-efi's stub with the kernel, the
    initramfs and the command line as PE sections, each placed after the
    stub's own image (the stub's ImageBase is 0: addresses are RVAs)."""
    if not EFI_STUB.is_file():
        raise BootDiskError(f"{EFI_STUB} is missing: install systemd-boot-efi")
    try:
        dump = subprocess.run(["objdump", "-p", str(EFI_STUB)], check=True, capture_output=True, text=True,
                              timeout=30).stdout
    except FileNotFoundError:
        raise BootDiskError("objdump is missing: install binutils") from None
    match = re.search(r"^SizeOfImage\s+([0-9a-fA-F]+)", dump, re.M)
    if not match:
        raise BootDiskError(f"objdump -p {EFI_STUB} shows no SizeOfImage")
    cmdline = out.with_name("cmdline.txt")
    cmdline.write_text(UKI_CMDLINE + "\0")
    align = 0x100000
    vma = (int(match.group(1), 16) + align - 1) // align * align
    args = []
    for section, src in ((".osrel", Path("/usr/lib/os-release")), (".cmdline", cmdline), (".linux", kernel),
                         (".initrd", initrd)):
        args += ["--add-section", f"{section}={src}", "--change-section-vma", f"{section}={vma:#x}"]
        vma += (src.stat().st_size + align - 1) // align * align
    _run("objcopy", *args, str(EFI_STUB), str(out))
    return out


def _signed_chain_files(kernel: Path, initrd: Path, tmpd: Path) -> list[tuple[Path, str]]:
    """The ESP of a Secure Boot guest, as Debian boots one: shim signed by
    Microsoft's UEFI CA (shim-signed), Debian's grub signed by Debian
    (grub-efi-amd64-signed; shim checks it against its built-in Debian CA),
    and Debian's signed kernel, which grub has shim check too."""
    for binary, package in ((SHIM_SIGNED, "shim-signed"), (GRUB_SIGNED, "grub-efi-amd64-signed")):
        if not binary.is_file():
            raise BootDiskError(f"{binary} is missing: install {package}")
    (tmpd / "grub.cfg").write_text(GRUB_CFG)
    return [(SHIM_SIGNED, UKI_PATH), (GRUB_SIGNED, "EFI/BOOT/grubx64.efi"), (tmpd / "grub.cfg", "EFI/debian/grub.cfg"),
            (kernel, "vmlinuz"), (initrd, "initrd.gz")]


def build_efi_boot_disk(path: str | os.PathLike, marker: str, size_mib: int = 64, loader: str = "uki",
                        drivers: str = "all") -> Path:
    """Write a UEFI-only raw disk image to ``path`` (GPT, an EFI system
    partition, no BIOS boot code) whose guest prints ``BOOT-MARKER: marker``.
    Its loader: ``uki``, an unsigned unified kernel image; ``shim``, the
    signed chain a Secure Boot firmware with Microsoft's keys boots."""
    path = Path(path)
    if size_mib < 40:
        raise BootDiskError("size_mib must be at least 40 for a UEFI disk (its unified kernel image + FAT16)")
    if loader not in ("uki", "shim"):
        raise BootDiskError(f"the EFI loader must be uki or shim, not {loader!r}")
    kernel, release = find_kernel()
    total_sectors = size_mib * 1024 * 1024 // SECTOR
    # 1 MiB in front (protective MBR, GPT), 1 MiB behind (the backup GPT).
    part_sectors = total_sectors - 2 * PARTITION_START_LBA
    with tempfile.TemporaryDirectory(prefix="bootdisk-") as tmp:
        tmpd = Path(tmp)
        (tmpd / "initrd.gz").write_bytes(build_initramfs(release, drivers))
        (tmpd / MARKER_FILE).write_text(marker + "\n")
        if loader == "uki":
            files = [(build_uki(kernel, tmpd / "initrd.gz", tmpd / "BOOTX64.EFI"), UKI_PATH)]
        else:
            files = _signed_chain_files(kernel, tmpd / "initrd.gz", tmpd)
        part = tmpd / "esp.img"
        with open(part, "wb") as fh:
            fh.truncate(part_sectors * SECTOR)
        _run("mkfs.fat", "-F", "16", "-n", "OMAESP", str(part))
        _run("mmd", "-i", str(part), *sorted({f"::/{d}" for _, dest in files for d in _parents(dest)}))
        for src, dest in [*files, (tmpd / MARKER_FILE, MARKER_FILE)]:
            _run("mcopy", "-i", str(part), str(src), f"::/{dest}")
        tmp_out = path.with_name(f".{path.name}.partial")
        with open(tmp_out, "wb") as out:
            out.truncate(total_sectors * SECTOR)
        table = (f"label: gpt\nstart={PARTITION_START_LBA}, size={part_sectors}, type={ESP_TYPE}, "
                 'name="EFI system partition"\n')
        try:
            subprocess.run(["sfdisk", "--no-reread", "--no-tell-kernel", "-q", str(tmp_out)], input=table,
                           check=True, capture_output=True, text=True, timeout=30)
        except FileNotFoundError:
            raise BootDiskError("sfdisk is missing: install fdisk") from None
        except subprocess.CalledProcessError as exc:
            raise BootDiskError(f"sfdisk failed: {exc.stderr.strip()}") from None
        with open(tmp_out, "r+b") as out:
            if out.read(440).strip(b"\0"):
                raise BootDiskError("sfdisk wrote boot code into the protective MBR")
            out.seek(PARTITION_START_LBA * SECTOR)
            with open(part, "rb") as src_fh:
                shutil.copyfileobj(src_fh, out, 1 << 20)
        os.replace(tmp_out, path)
    return path


def build_boot_disk(path: str | os.PathLike, marker: str, size_mib: int = 64, drivers: str = "all", *,
                    screen_only: bool = False) -> Path:
    """Write a bootable raw disk image to ``path`` whose guest prints ``BOOT-MARKER: marker``
    on its serial console, or with ``screen_only`` on its VGA screen alone; its
    initramfs carries the disk drivers of DRIVER_SETS[drivers]."""
    path = Path(path)
    if size_mib < 32:
        raise BootDiskError("size_mib must be at least 32 (kernel + initramfs + FAT16 minimum)")
    if not MBR_CODE.is_file():
        raise BootDiskError(f"{MBR_CODE} is missing: install syslinux-common")
    kernel, release = find_kernel()
    total_sectors = size_mib * 1024 * 1024 // SECTOR
    part_sectors = total_sectors - PARTITION_START_LBA
    with tempfile.TemporaryDirectory(prefix="bootdisk-") as tmp:
        tmpd = Path(tmp)
        part = tmpd / "part.img"
        with open(part, "wb") as fh:
            fh.truncate(part_sectors * SECTOR)
        # -h: hidden sectors = the partition's start, which syslinux's boot sector needs.
        _run("mkfs.fat", "-F", "16", "-n", "OMABOOT", "-h", str(PARTITION_START_LBA), str(part))
        (tmpd / "initrd.gz").write_bytes(build_initramfs(release, drivers))
        (tmpd / "syslinux.cfg").write_text(SYSLINUX_CFG_SCREEN if screen_only else SYSLINUX_CFG)
        (tmpd / MARKER_FILE).write_text(marker + "\n")
        for src, dest in ((kernel, "vmlinuz"), (tmpd / "initrd.gz", "initrd.gz"),
                          (tmpd / "syslinux.cfg", "syslinux.cfg"), (tmpd / MARKER_FILE, MARKER_FILE)):
            _run("mcopy", "-i", str(part), str(src), f"::/{dest}")
        _run("syslinux", "--install", str(part))
        tmp_out = path.with_name(f".{path.name}.partial")
        with open(tmp_out, "wb") as out:
            out.write(_mbr(MBR_CODE.read_bytes(), PARTITION_START_LBA, part_sectors))
            out.seek(PARTITION_START_LBA * SECTOR)
            with open(part, "rb") as src_fh:
                shutil.copyfileobj(src_fh, out, 1 << 20)
            out.truncate(total_sectors * SECTOR)
        os.replace(tmp_out, path)
    return path


def set_marker(path: str | os.PathLike, marker: str) -> None:
    """Rewrite MARKER inside an existing image, as the guest writing its own disk would."""
    offset = partition_offset(path)
    with tempfile.TemporaryDirectory(prefix="bootdisk-") as tmp:
        src = Path(tmp) / MARKER_FILE
        src.write_text(marker + "\n")
        _run("mcopy", "-o", "-i", f"{path}@@{offset}", str(src), f"::/{MARKER_FILE}")


def read_marker(path: str | os.PathLike) -> str:
    """The marker the guest would print (read with mtools, no boot)."""
    offset = partition_offset(path)
    try:
        out = subprocess.run(["mtype", "-i", f"{path}@@{offset}", f"::/{MARKER_FILE}"], check=True,
                             capture_output=True, text=True, timeout=30,
                             env={**os.environ, "MTOOLS_SKIP_CHECK": "1"})
    except subprocess.CalledProcessError as exc:
        raise BootDiskError(f"mtype failed: {exc.stderr.strip()}") from exc
    return out.stdout.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("image")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--marker", help="build a new image whose guest prints this marker")
    group.add_argument("--set-marker", help="rewrite the marker in an existing image")
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--drivers", choices=list(DRIVER_SETS), default="all",
                        help="disk drivers in the initramfs: all (virtio, IDE, SATA, PVSCSI) or sata (AHCI only)")
    parser.add_argument("--screen-only", action="store_true",
                        help="the guest prints on its VGA screen only (console=tty0), nothing on a serial port")
    parser.add_argument("--firmware", choices=["bios", "efi"], default="bios",
                        help="efi: a UEFI-only disk (GPT, EFI system partition, unified kernel image)")
    parser.add_argument("--efi-loader", choices=["uki", "shim"], default="uki",
                        help="with --firmware efi: an unsigned unified kernel image (uki), or shim + grub + "
                             "kernel as Debian signs them, which boots under Secure Boot (shim)")
    args = parser.parse_args(argv)
    try:
        if args.marker is not None and args.firmware == "efi":
            if args.screen_only:
                raise BootDiskError("--screen-only is for BIOS disks (a UEFI disk's kernel command line is "
                                    "built into its image)")
            build_efi_boot_disk(args.image, args.marker, args.size_mib, args.efi_loader, args.drivers)
            print(f"built {args.image} (efi, {args.efi_loader}): the guest prints "
                  f"'{MARKER_PREFIX}{args.marker}' on ttyS0")
        elif args.marker is not None:
            build_boot_disk(args.image, args.marker, args.size_mib, args.drivers, screen_only=args.screen_only)
            print(f"built {args.image}: the guest prints '{MARKER_PREFIX}{args.marker}' on "
                  f"{'its screen only' if args.screen_only else 'ttyS0'}")
        else:
            set_marker(args.image, args.set_marker)
            print(f"{args.image}: marker set to '{args.set_marker}'")
    except BootDiskError as exc:
        print(f"make_boot_disk: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

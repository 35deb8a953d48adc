"""Guest conversion with virt-v2v-in-place (virt-v2v 2.2 here), and what it
decided.

virt-v2v-in-place writes no output metadata (it has no -o/-O in 2.2), so its
decisions are read from what it prints:

- with --machine-readable, each message on stdout is a JSON object
  ({"message", "type": message|info|warning|error}): "Converting <product>
  to run on KVM", the warnings (e.g. "there are no virtio drivers available
  for this version of Windows ... The guest will be configured to use slower
  emulated devices"), the verdict "This guest has (does not have) virtio
  drivers installed." and an error's own words;
- with -v it also prints, on stderr, the guest capabilities it converted
  for ("gcaps_block_bus = virtio-blk|virtio-scsi|ide", "gcaps_net_bus =
  virtio-net|e1000|rtl8139") and the inspection ("i_type = windows").

Windows drivers come from VIRTIO_WIN (the virtio-win ISO or directory the
operator provides; virtio-win is not in Debian), passed in the converter's
environment. Without them virt-v2v converts a Windows guest to emulated
devices (IDE disk, RTL8139 NIC) and says so; services.hardware follows it."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Mapping
from pathlib import Path

from replication.platforms.base import DestinationError, GuestConversion, GuestNotConverted

_GCAPS_RE = re.compile(r"^\s*gcaps_(block_bus|net_bus)\s*=\s*(\S+)\s*$", re.M)
_INSPECT_RE = re.compile(r"^\s*i_(type|product_name)\s*=\s*(.*?)\s*$", re.M)
_CONVERTING_RE = re.compile(r"^Converting (.+) to run on KVM$")
BLOCK_BUSES = ("virtio-blk", "virtio-scsi", "ide")
NET_BUSES = ("virtio-net", "e1000", "rtl8139")


def messages(stdout: str) -> list[dict]:
    """virt-v2v's --machine-readable messages, in order (other lines skipped)."""
    found = []
    for line in stdout.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if isinstance(message, dict) and "message" in message:
            found.append(message)
    return found


def reason(text: str) -> str:
    """An error's own words as one line, without virt-v2v's generic advice."""
    parts = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    kept = [p for p in parts if not p.startswith(("Assuming that you are running", "If reporting bugs",
                                                  "virt-v2v-in-place -v -x", "Do:", "export LIBGUESTFS"))]
    return " ".join(" ".join(p.split()) for p in kept)[:1000]


def report(stdout: str, stderr: str) -> GuestConversion:
    """What a successful run decided, from its output (see the module's note)."""
    said = messages(stdout)
    gcaps = dict(_GCAPS_RE.findall(stderr))
    inspected = dict(_INSPECT_RE.findall(stderr))
    product = inspected.get("product_name", "")
    for message in said:
        if match := _CONVERTING_RE.match(message["message"].strip()):
            product = product if product not in ("", "unknown") else match.group(1)
    guest_type = inspected.get("type", "")
    if not guest_type and product:
        guest_type = "windows" if "windows" in product.lower() else ""
    block_bus = gcaps.get("block_bus")
    if block_bus not in BLOCK_BUSES:
        block_bus = None
    for message in said:  # the verdict, where the capabilities were not printed
        text = message["message"]
        if block_bus is None and "has virtio drivers installed" in text:
            block_bus = "virtio-blk"
        elif block_bus is None and "does not have virtio drivers installed" in text:
            block_bus = "ide"
    net_bus = gcaps.get("net_bus")
    if net_bus not in NET_BUSES:
        net_bus = None
    warnings = tuple(reason(m["message"]) for m in said if m.get("type") == "warning")
    what = product if product and product != "unknown" else (guest_type or "the guest")
    if block_bus is None:
        verdict = "virt-v2v did not say which devices it prepared"
    elif block_bus == "ide":
        verdict = "no virtio drivers installed: emulated devices (" + ", ".join(filter(None, (
            f"{block_bus} disk", net_bus and f"{net_bus} NIC"))) + ")"
    else:
        verdict = "virtio drivers installed (" + ", ".join(filter(None, (
            f"{block_bus} disk", net_bus and f"{net_bus} NIC"))) + ")"
    return GuestConversion(detail=f"converted {what} by virt-v2v-in-place: {verdict}", block_bus=block_bus,
                           net_bus=net_bus, guest_type=guest_type, product=product if product != "unknown" else "",
                           warnings=warnings)


def failure(stdout: str, stderr: str) -> str:
    """Why a run failed: its error message, else its last words."""
    errors = [m["message"] for m in messages(stdout) if m.get("type") == "error"]
    if errors:
        return reason(errors[0])
    lines = [line.strip() for line in (stdout + "\n" + stderr).splitlines() if line.strip()]
    for index, line in enumerate(lines):
        if "error:" in line and not line.startswith(("libguestfs:", "guestfsd:")):
            return reason("\n".join([line.split("error:", 1)[1]] + lines[index + 1:index + 4]))
    return lines[-1][:1000] if lines else "virt-v2v-in-place failed without a message"


def convert_in_place(xml_path: Path, env: Mapping[str, str], timeout_s: float,
                     virtio_win: str = "") -> GuestConversion:
    """Run virt-v2v-in-place on the guest the libvirt XML describes (its
    disks written in place); returns what it decided. ``virtio_win``: the
    virtio-win ISO or directory for Windows guests ("" for none: a Windows
    guest then gets emulated devices, with virt-v2v's warning)."""
    env = dict(env)
    env.pop("VIRTIO_WIN_DIR", None)  # virt-v2v's old name: only ours counts
    if virtio_win:
        if not Path(virtio_win).exists():
            raise DestinationError(f"VIRTIO_WIN={virtio_win} does not exist: give the path of the virtio-win ISO "
                                   "or directory, or unset it")
        env["VIRTIO_WIN"] = virtio_win
    else:
        env.pop("VIRTIO_WIN", None)
    try:
        done = subprocess.run(["virt-v2v-in-place", "-v", "--machine-readable", "-i", "libvirtxml", str(xml_path)],
                              capture_output=True, text=True, errors="replace", env=env, timeout=timeout_s)
    except FileNotFoundError:
        raise DestinationError("virt-v2v-in-place is missing: run scripts/setup.sh (virt-v2v)") from None
    except subprocess.TimeoutExpired:
        raise GuestNotConverted(f"virt-v2v-in-place did not finish within {timeout_s:.0f} s") from None
    if done.returncode != 0:
        raise GuestNotConverted(failure(done.stdout, done.stderr))
    return report(done.stdout, done.stderr)

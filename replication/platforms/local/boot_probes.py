"""Seeing a libvirt guest boot: the probes of Destination.verify_boot.

- console: a line of the serial console log matches the regex;
- screen: libvirt's screenshot of the VGA screen (virDomainScreenshot), read
  by tesseract, has a line matching the regex. An image already read is not
  read again (its hash is remembered, with its text: a blinking cursor
  alternates between two images);
- network: a NIC of the VM on a libvirt network got a DHCP lease from that
  network's dnsmasq (virNetworkGetDHCPLeases by the NIC's MAC), or its MAC
  is reachable in the host's neighbour (ARP) table on the network's bridge
  (it answered ARP: a guest with a static address), after the check began:
  a lease or entry left by an earlier VM with the same MAC does not count;
- agent: the QEMU guest agent answers guest-ping.

Each probe returns the evidence, or None with its last word on why not.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

try:
    import libvirt
    import libvirt_qemu
except ImportError:  # pragma: no cover - setup.sh installs and bridges python3-libvirt
    libvirt = libvirt_qemu = None

OCR_TIMEOUT_S = 30.0
ARP_TIMEOUT_S = 5.0
AGENT_TIMEOUT_S = 2
SCREEN_INTERVAL_S = 1.0  # between screenshots: OCR costs CPU the guest (under TCG) shares
SCREEN_CACHE = 8
TAIL_LINES = 10


class ScreenReader:
    """A VM's screen as text: screenshot, then tesseract (page segmentation
    6: one block of text, what a text console is), each distinct image once."""

    def __init__(self, conn, dom, work_dir: Path):
        self.conn, self.dom, self.work_dir = conn, dom, work_dir
        self.texts: dict[str, str] = {}
        self.last_text = ""
        self.ocr_runs = 0

    def screenshot(self) -> bytes:
        stream = self.conn.newStream(0)
        try:
            self.dom.screenshot(stream, 0, 0)
            chunks: list[bytes] = []
            stream.recvAll(lambda _s, buf, _o: chunks.append(buf) or len(buf), None)
            stream.finish()
        except libvirt.libvirtError:
            with contextlib.suppress(libvirt.libvirtError):
                stream.abort()
            raise
        return b"".join(chunks)

    def read(self) -> str:
        image = self.screenshot()
        digest = hashlib.sha256(image).hexdigest()
        if digest not in self.texts:
            if len(self.texts) >= SCREEN_CACHE:
                self.texts.pop(next(iter(self.texts)))
            self.texts[digest] = ocr(image, self.work_dir)
            self.ocr_runs += 1
        self.last_text = self.texts[digest]
        return self.last_text


def ocr(image: bytes, work_dir: Path) -> str:
    """The text tesseract reads in an image (PNG or PPM)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=work_dir, prefix="screen-", suffix=".img") as fh:
        fh.write(image)
        fh.flush()
        try:
            # One thread: tesseract's OpenMP threads cost 5x the CPU for the
            # same text on a screen this small (bench/boot_probe_bench.py).
            done = subprocess.run(["tesseract", fh.name, "-", "--psm", "6"], capture_output=True, text=True,
                                  timeout=OCR_TIMEOUT_S, env={**os.environ, "OMP_THREAD_LIMIT": "1"})
        except FileNotFoundError:
            raise OSError("tesseract is missing: run scripts/setup.sh (tesseract-ocr, tesseract-ocr-eng)") from None
        except subprocess.TimeoutExpired:
            raise OSError(f"tesseract did not read the screen within {OCR_TIMEOUT_S:.0f} s") from None
    if done.returncode != 0:
        raise OSError(f"tesseract failed: {done.stderr.strip()[-300:]}")
    return done.stdout


def first_match(text: str, regex: re.Pattern) -> str | None:
    for line in text.splitlines():
        if regex.search(line):
            return line.strip()
    return None


def tail(text: str, lines: int = TAIL_LINES) -> str:
    return "\n".join([line for line in text.splitlines() if line.strip()][-lines:])


def nics_on_networks(dom) -> list[tuple[str, str]]:
    """(MAC, libvirt network) of each of the domain's NICs on a libvirt network."""
    found = []
    for iface in ET.fromstring(dom.XMLDesc(0)).iterfind("./devices/interface[@type='network']"):
        mac, source = iface.find("mac"), iface.find("source")
        if mac is not None and source is not None and source.get("network"):
            found.append((mac.get("address").lower(), source.get("network")))
    return found


class NetworkProbe:
    """DHCP leases and neighbour entries that appear after it was made."""

    def __init__(self, conn, dom):
        self.conn = conn
        self.nics = nics_on_networks(dom)
        self.before = self._seen()

    def _seen(self) -> dict[tuple[str, str], str]:
        """(kind, MAC) -> what identifies the lease/entry now."""
        seen: dict[tuple[str, str], str] = {}
        for mac, name in self.nics:
            try:
                net = self.conn.networkLookupByName(name)
                for lease in net.DHCPLeases(mac) or []:
                    seen[("lease", mac)] = (f"DHCP lease {lease.get('ipaddr')} for {mac} on network {name} "
                                            f"(expires {lease.get('expirytime')})")
                bridge = net.bridgeName()
            except libvirt.libvirtError:
                continue
            with contextlib.suppress(OSError, subprocess.SubprocessError, ValueError):
                done = subprocess.run(["ip", "-j", "neigh", "show", "dev", bridge], capture_output=True, text=True,
                                      timeout=ARP_TIMEOUT_S)
                for entry in json.loads(done.stdout or "[]"):
                    # REACHABLE: the guest answered ARP (an entry dnsmasq made to send its DHCP offer
                    # is only DELAY/STALE until then).
                    if entry.get("lladdr", "").lower() == mac and "REACHABLE" in entry.get("state", []):
                        seen[("arp", mac)] = f"{entry.get('dst')} at {mac} answered ARP on {bridge} ({name})"
        return seen

    def check(self) -> tuple[str | None, str]:
        if not self.nics:
            return None, "the VM has no NIC on a libvirt network"
        for key, text in sorted(self._seen().items(), key=lambda item: item[0][0] != "lease"):  # leases first
            if self.before.get(key) != text and (key[0] == "lease" or key not in self.before):
                return text, ""
        return None, "no DHCP lease nor ARP answer from " + ", ".join(f"{mac} on {net}" for mac, net in self.nics)


def agent_answer(dom) -> tuple[str | None, str]:
    try:
        reply = libvirt_qemu.qemuAgentCommand(dom, json.dumps({"execute": "guest-ping"}), AGENT_TIMEOUT_S, 0)
    except libvirt.libvirtError as exc:
        message = str(exc)
        if "not configured" in message:
            return None, "no agent: the VM has no guest agent channel"
        return None, f"no agent answered ({message})"
    return f"QEMU guest agent answered guest-ping: {reply}", ""

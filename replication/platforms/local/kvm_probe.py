"""KVM or TCG: which libvirt domain type really runs a guest on this host.

'kvm' only where KVM can really run a guest, else 'qemu' (TCG). libvirt's
capabilities are no proof: on a nested PVM host /dev/kvm opens and libvirt
offers 'kvm', but the guest dies with "KVM internal error ... emulation
failure" once it leaves real mode, and QEMU then *pauses* it. So we try,
once per host boot: a transient 'kvm' domain boots the host's own kernel
directly (no disk, no initramfs). A working KVM gets that kernel to print
its banner and reach its "VFS: Unable to mount root fs" panic in well under
a second of guest CPU time. A broken one either pauses the domain or spins
in the host kernel without the guest printing anything: no console output
after PROBE_CPU_S of guest CPU time (or PROBE_TIMEOUT_S of wall time) means
'qemu'. The answer is cached in the run directory, keyed by boot id and the
libvirt/QEMU versions, so only the first failover after a reboot pays for
the probe (a few seconds where KVM is broken, under one where it works).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import time
from pathlib import Path
from xml.sax.saxutils import escape

try:
    import libvirt
except ImportError:  # pragma: no cover - setup.sh installs and bridges python3-libvirt
    libvirt = None

PROBE_TIMEOUT_S = 15.0
PROBE_CPU_S = 3.0


def probe_cached(conn, uri: str, run_dir: Path) -> tuple[str, str]:
    """(domain type, why), from the run directory's cache when this boot of
    this host with these libvirt and QEMU versions was probed already."""
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot_id = ""
    key = {"boot_id": boot_id, "uri": uri, "libvirt": conn.getLibVersion(), "qemu": conn.getVersion()}
    cache = run_dir / "domain-type.json"
    with contextlib.suppress(OSError, ValueError, KeyError):
        saved = json.loads(cache.read_text())
        if saved["key"] == key and boot_id:
            return saved["type"], saved["reason"] + " (cached)"
    result = probe(conn, run_dir)
    with contextlib.suppress(OSError):
        run_dir.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"key": key, "type": result[0], "reason": result[1]}))
    return result


def probe(conn, run_dir: Path) -> tuple[str, str]:
    if not os.path.exists("/dev/kvm"):
        return "qemu", "no /dev/kvm"
    try:
        conn.getDomainCapabilities(None, "x86_64", None, "kvm", 0)
    except libvirt.libvirtError as exc:
        return "qemu", f"libvirt offers no KVM: {exc}"
    kernels = sorted(p for p in glob.glob("/boot/vmlinuz-*") if os.access(p, os.R_OK))
    if not kernels:
        return "qemu", "no readable /boot/vmlinuz-* to probe KVM with (install linux-image-amd64)"
    booted, why = boot_host_kernel(conn, run_dir, "kvm", kernels[-1])
    return ("kvm" if booted else "qemu"), why


def _probe_xml(name: str, domain_type: str, kernel: str, console: Path) -> str:
    return f"""<domain type='{domain_type}'>
  <name>{name}</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64'>hvm</type><kernel>{escape(kernel)}</kernel>
    <cmdline>console=ttyS0 panic=-1 loglevel=4</cmdline></os>
  <on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>
  <devices>
    <serial type='file'><source path='{escape(str(console))}'/><target port='0'/></serial>
    <controller type='usb' model='none'/><memballoon model='none'/>
  </devices>
  <seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>
</domain>"""


def boot_host_kernel(conn, run_dir: Path, domain_type: str, kernel: str, cpu_limit_s: float = PROBE_CPU_S,
                     timeout_s: float = PROBE_TIMEOUT_S) -> tuple[bool, str]:
    """Boot ``kernel`` directly in a transient domain of ``domain_type``:
    (True, why) if it got as far as its root-fs panic, else (False, why)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    console = run_dir / f"probe-{domain_type}-{os.getpid()}.console.log"
    console.unlink(missing_ok=True)
    what = "a KVM guest" if domain_type == "kvm" else f"a {domain_type} guest"
    try:
        dom = conn.createXML(_probe_xml(f"oma-probe-{domain_type}-{os.getpid()}", domain_type, kernel, console), 0)
    except libvirt.libvirtError as exc:
        return False, f"{what} does not start: {exc}"
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = console.read_text(errors="replace") if console.exists() else ""
            if "VFS:" in text or "Kernel panic" in text:
                return True, f"{what} booted the host's kernel"
            try:
                state, reason = dom.state()
            except libvirt.libvirtError:
                state, reason = 5, 0  # transient domain gone: it rebooted (panic) or died
            if state == 3:
                return False, f"{what} was paused by QEMU (reason {reason}): it cannot run guests here"
            if state in (5, 6):
                if "Linux version" in text:
                    return True, f"{what} booted the host's kernel"
                return False, f"{what} stopped before its kernel printed anything"
            if "Linux version" not in text:
                with contextlib.suppress(libvirt.libvirtError):
                    cpu_s = dom.info()[4] / 1e9
                    if cpu_s > cpu_limit_s:
                        return False, (f"{what} used {cpu_s:.1f} s of CPU without printing anything: "
                                       "it cannot run guests here")
            time.sleep(0.1)
        return False, f"{what} did not boot the host's kernel within {timeout_s:.0f} s"
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            dom.destroy()
        console.unlink(missing_ok=True)

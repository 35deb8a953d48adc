"""Local KVM (or plain QEMU) through libvirt: the embedded default destination.

Protection is a qcow2 overlay per replica volume, with the raw replica as its
backing file: made in milliseconds whatever the disk's size, the guest's
writes land in the overlay, and discarding the overlay leaves the replica
byte-identical (it is only ever opened read-only under an overlay).

The domain type is 'kvm' only where KVM really runs a guest, else 'qemu'
(TCG): found by trying (kvm_probe), unless settings.LIBVIRT_DOMAIN_TYPE
(kvm|qemu) names it. The domain's XML is built in domain_xml.

Every wait is bounded: start (state running within START_TIMEOUT_S), the
boot check (the VM's boot check timeout), the KVM probe, and dead
connections (libvirt keepalive: 5 s interval, 3 misses).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from replication.platforms.base import (
    DEFAULT_BOOT_REGEX,
    BootEvidence,
    Destination,
    DestinationError,
    DiskSpec,
    GuestConversion,
    VMShape,
    parse_boot_probes,
)
from replication.platforms.local import boot_probes, kvm_probe, v2v
from replication.platforms.local.domain_xml import boot_order, domain_xml, file_format
from replication.platforms.local.journal import run_tool

if TYPE_CHECKING:
    from replication.models import TargetVolume

try:
    import libvirt
except ImportError:  # pragma: no cover - setup.sh installs and bridges python3-libvirt
    libvirt = None

START_TIMEOUT_S = 15.0
QEMU_IMG_TIMEOUT_S = 60.0
CONVERT_TIMEOUT_S = 900.0
COMMIT_TIMEOUT_S = 6 * 3600.0  # a block pull copies the whole disk: hours for a large one
START_HINT = "start it with `virtlogd -d && libvirtd -d` (or run scripts/setup.sh and source scripts/lib.sh; " \
             "ensure_libvirtd)"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,99}$")
_ANSI_RE = re.compile(r"\x1b(\[[0-9;?]*[ -/]*[@-~]|[@-Z\\-_]|c)")

_STATE_NAMES = {
    0: "unknown",  # VIR_DOMAIN_NOSTATE
    1: "running", 2: "blocked", 3: "paused", 4: "shutdown", 5: "shutoff", 6: "crashed", 7: "pmsuspended",
}

# uri -> (domain type, why); per process, filled by the probe.
_domain_types: dict[str, tuple[str, str]] = {}


def _silence_libvirt_stderr() -> None:
    # libvirt's default error handler prints every error to stderr, also the
    # expected ones (lookup of a VM that is not there); we raise instead.
    if libvirt is not None:
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


_silence_libvirt_stderr()


def _qemu_img(*args: str) -> str:
    return run_tool(["qemu-img", *args], f"qemu-img {args[0]} failed", timeout=QEMU_IMG_TIMEOUT_S,
                    error=DestinationError)


class LibvirtDestination(Destination):
    name = "libvirt"

    def __init__(self, uri: str = "qemu:///system", run_dir: Path | str = "var/run/failover",
                 network: str | None = None, domain_type: str | None = None,
                 convert_timeout_s: float = CONVERT_TIMEOUT_S, virtio_win: str = ""):
        self.uri = uri
        self.virtio_win = virtio_win  # the virtio-win ISO or directory for Windows guests ("" for none)
        self.convert_timeout_s = convert_timeout_s
        self.run_dir = Path(run_dir).absolute()
        self.protection_dir = self.run_dir / "protections"
        self.network = network or None
        self._domain_type = domain_type or None
        if self._domain_type not in (None, "kvm", "qemu"):
            raise DestinationError(f"libvirt domain type must be kvm or qemu, not {self._domain_type!r}")
        self._conn_obj = None

    # -- connection ----------------------------------------------------------

    def _conn(self):
        if libvirt is None:
            raise DestinationError("the libvirt Python module is missing: run scripts/setup.sh (python3-libvirt)")
        if self._conn_obj is not None:
            with contextlib.suppress(libvirt.libvirtError):
                if self._conn_obj.isAlive():
                    return self._conn_obj
            self._conn_obj = None
        try:
            conn = libvirt.open(self.uri)
        except libvirt.libvirtError as exc:
            message = str(exc)
            if any(s in message for s in ("Failed to connect socket", "No such file or directory",
                                          "Connection refused")):
                raise DestinationError(f"libvirtd is not running ({self.uri}: {message}): {START_HINT}") from None
            raise DestinationError(f"cannot connect to libvirt at {self.uri}: {message}") from None
        # A daemon that stops answering is noticed within ~20 s instead of never.
        with contextlib.suppress(libvirt.libvirtError):
            conn.setKeepAlive(5, 3)
        self._conn_obj = conn
        return conn

    def close(self) -> None:
        """Close the connection; the next call opens another."""
        if self._conn_obj is not None:
            with contextlib.suppress(Exception):
                self._conn_obj.close()
            self._conn_obj = None

    def check_ready(self) -> str:
        self._conn()
        return f"{self.name} answers"

    def replica_handle(self, volume: TargetVolume) -> str:
        return volume.path

    def _lookup(self, name: str):
        """The domain, or None when no domain of that name is defined."""
        try:
            return self._conn().lookupByName(name)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise DestinationError(f"libvirt lookup of VM {name}: {exc}") from None

    def _domain(self, name: str):
        dom = self._lookup(name)
        if dom is None:
            raise DestinationError(f"no VM named {name} is defined on {self.uri}")
        return dom

    # -- KVM or TCG ------------------------------------------------------------

    def domain_type(self) -> str:
        """'kvm' if KVM runs a guest here, else 'qemu'; probed once (see kvm_probe)."""
        if self._domain_type:
            return self._domain_type
        if self.uri not in _domain_types:
            _domain_types[self.uri] = kvm_probe.probe_cached(self._conn(), self.uri, self.run_dir)
        return _domain_types[self.uri][0]

    def domain_type_reason(self) -> str:
        if self._domain_type:
            return "set explicitly"
        self.domain_type()
        return _domain_types[self.uri][1]

    def boot_host_kernel(self, domain_type: str, kernel: str, cpu_limit_s: float = kvm_probe.PROBE_CPU_S,
                         timeout_s: float = kvm_probe.PROBE_TIMEOUT_S) -> tuple[bool, str]:
        """Boot ``kernel`` directly in a transient domain of ``domain_type``:
        (True, why) if it got as far as its root-fs panic, else (False, why)."""
        return kvm_probe.boot_host_kernel(self._conn(), self.run_dir, domain_type, kernel, cpu_limit_s, timeout_s)

    # -- protection ----------------------------------------------------------------

    def protect(self, volumes: Sequence[str], point_name: str) -> list[str]:
        point = re.sub(r"[^A-Za-z0-9_.+-]", "-", point_name).strip(".") or "point"
        directory = self.protection_dir / point
        sources = []
        for volume in volumes:
            src = Path(volume).absolute()
            if not src.exists():
                raise DestinationError(f"replica volume {volume} does not exist")
            sources.append(src)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        handles: list[str] = []
        created: list[Path] = []
        try:
            for index, src in enumerate(sources):
                overlay = directory / f"{index:02d}-{src.name}.qcow2"
                if overlay.exists():
                    self._check_overlay(overlay, src)
                else:
                    self._create_overlay(overlay, src)
                    created.append(overlay)
                handles.append(str(overlay))
        except Exception:
            for overlay in created:
                overlay.unlink(missing_ok=True)
            raise
        return handles

    def _create_overlay(self, overlay: Path, src: Path) -> None:
        fmt = file_format(src)
        partial = overlay.with_name(overlay.name + ".partial")
        args = ["create", "-q", "-f", "qcow2", "-F", fmt, "-b", str(src)]
        if src.is_file():
            # -u with the size: qemu-img need not open (and lock) the replica,
            # so a protection can be made while an export server holds it. A
            # point's qcow2 layer is read for its virtual size (-U: no lock).
            size = (json.loads(_qemu_img("info", "-U", "--output=json", str(src)))["virtual-size"]
                    if fmt == "qcow2" else src.stat().st_size)
            args += ["-u", str(partial), str(size)]
        else:
            args += [str(partial)]
        try:
            _qemu_img(*args)
            # The guest's writes land here: private like the replica. QEMU runs
            # as root under our static DAC label, so 0600 does not lock it out.
            partial.chmod(0o600)
            os.replace(partial, overlay)
        finally:
            partial.unlink(missing_ok=True)

    def _check_overlay(self, overlay: Path, src: Path) -> None:
        info = json.loads(_qemu_img("info", "-U", "--output=json", str(overlay)))
        if info.get("format") != "qcow2" or info.get("backing-filename") != str(src):
            raise DestinationError(f"{overlay} exists but is not a protection of {src} "
                                   f"(backing file {info.get('backing-filename')!r})")

    def discard_protection(self, handles: Sequence[str]) -> None:
        paths = [Path(h).absolute() for h in handles or ()]
        for path in paths:
            if self.protection_dir not in path.parents or path.suffix != ".qcow2":
                raise DestinationError(f"refusing to delete {path}: not a protection made by this destination "
                                       f"(they live in {self.protection_dir})")
        users = self._disk_users() if any(p.exists() for p in paths) else {}
        for path in paths:
            if str(path) in users:
                raise DestinationError(f"protection {path} is in use by running VM {users[str(path)]}; "
                                       "destroy the VM first")
        for path in paths:
            path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                path.parent.rmdir()  # the point's directory, once empty

    def _disk_users(self) -> dict[str, str]:
        """Disk image path -> name of the active domain that has it open."""
        users = {}
        try:
            domains = self._conn().listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
        except libvirt.libvirtError as exc:
            raise DestinationError(f"cannot list the VMs on {self.uri}: {exc}") from None
        for dom in domains:
            with contextlib.suppress(libvirt.libvirtError):
                for source in ET.fromstring(dom.XMLDesc(0)).iterfind("./devices/disk/source"):
                    if source.get("file"):
                        users[source.get("file")] = dom.name()
        return users

    # -- VMs -----------------------------------------------------------------------

    def console_path(self, name: str) -> Path:
        return self.run_dir / f"{name}.console.log"

    def nvram_path(self, name: str) -> Path:
        """A UEFI VM's own variable store; libvirt removes it with the VM."""
        return self.run_dir / f"{name}.VARS.fd"

    def define_vm(self, name: str, shape: VMShape, disks: Sequence[DiskSpec | str],
                  network: str | Mapping[str, str] | None = None) -> str:
        if not _NAME_RE.match(name):
            raise DestinationError(f"VM name {name!r} is not usable: letters, digits and _.+- only, at most 100")
        specs = [(d, Path(d).stem) if isinstance(d, str) else (d[0], d[1]) for d in disks]
        if not specs:
            raise DestinationError(f"VM {name} has no disks")
        for path, key in specs:
            if not Path(path).exists():
                raise DestinationError(f"VM {name}: disk {key} ({path}) does not exist")
        if self._lookup(name) is not None:
            raise DestinationError(f"a VM named {name} already exists on {self.uri}; destroy it first")
        xml = self.domain_xml(name, shape, specs, self.network if network is None else network)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.console_path(name).unlink(missing_ok=True)
        try:
            self._conn().defineXML(xml)
        except libvirt.libvirtError as exc:
            raise DestinationError(f"libvirt refused VM {name}: {exc}") from None
        return name

    def domain_xml(self, name: str, shape: VMShape, disks: Sequence[DiskSpec],
                   network: str | Mapping[str, str] | None) -> str:
        disks = boot_order(name, shape, disks)
        return domain_xml(name, shape, disks, network, kvm=self.domain_type() == "kvm",
                          console=self.console_path(name), nvram=self.nvram_path(name))

    def convert_guest(self, name: str, shape: VMShape, disks: Sequence[DiskSpec]) -> GuestConversion:
        """virt-v2v-in-place on the overlays (libguestfs's appliance, direct
        backend; TCG forced where KVM cannot run a guest): drivers and the
        boot configuration for KVM, written into the overlays only; returns
        what it decided (v2v.report). Windows drivers from virtio_win."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        xml_path = self.run_dir / f"{name}.v2v.xml"
        xml_path.write_text(self.domain_xml(name, shape, disks, None))
        env = {**os.environ, "LIBGUESTFS_BACKEND": "direct", "LIBGUESTFS_CACHEDIR": str(self.run_dir / "guestfs")}
        if self.domain_type() != "kvm":
            env["LIBGUESTFS_BACKEND_SETTINGS"] = "force_tcg"
        (self.run_dir / "guestfs").mkdir(exist_ok=True)
        try:
            return v2v.convert_in_place(xml_path, env, self.convert_timeout_s, self.virtio_win)
        finally:
            xml_path.unlink(missing_ok=True)

    def start(self, vm: str) -> None:
        dom = self._domain(vm)
        if dom.isActive():
            return
        try:
            dom.create()
        except libvirt.libvirtError as exc:
            raise DestinationError(f"VM {vm} does not start: {exc}") from None
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            state = self.state(vm)
            if state == "running":
                return
            if time.monotonic() > deadline:
                raise DestinationError(f"VM {vm} is {state} {START_TIMEOUT_S:.0f} s after its start")
            time.sleep(0.1)

    def verify_boot(self, vm: str, probes: Sequence[str], pattern: str, timeout_s: float,
                    heartbeat: Callable[[], None]) -> BootEvidence:
        """The first of ``probes`` to see the boot (boot_probes), all polled
        in one loop while the VM runs, within ``timeout_s``; the screen every
        SCREEN_INTERVAL_S."""
        try:
            probes = parse_boot_probes(probes)
            regex = re.compile(pattern or DEFAULT_BOOT_REGEX)
        except (ValueError, re.error) as exc:
            raise DestinationError(f"the boot check of VM {vm} cannot run: {exc}") from None
        dom = self._domain(vm) if set(probes) - {"console"} else None
        screen = boot_probes.ScreenReader(self._conn(), dom, self.run_dir / "screens") if "screen" in probes else None
        network = boot_probes.NetworkProbe(self._conn(), dom) if "network" in probes else None
        why = {probe: "not checked yet" for probe in probes}
        deadline = time.monotonic() + timeout_s
        last_beat = next_screen = time.monotonic()
        while True:
            for probe in probes:
                found = None
                if probe == "console":
                    found = boot_probes.first_match(self.console_text(vm), regex)
                    why[probe] = f"never showed /{regex.pattern}/"
                elif probe == "screen" and time.monotonic() >= next_screen:
                    next_screen = time.monotonic() + boot_probes.SCREEN_INTERVAL_S
                    try:
                        found = boot_probes.first_match(screen.read(), regex)
                        why[probe] = f"never showed /{regex.pattern}/"
                    except (libvirt.libvirtError, OSError) as exc:
                        why[probe] = f"unreadable: {exc}"
                elif probe == "network":
                    found, why[probe] = network.check()
                elif probe == "agent":
                    found, why[probe] = boot_probes.agent_answer(dom)
                if found:
                    return BootEvidence(probe, found)
            state = self.state(vm)
            if state != "running" or time.monotonic() > deadline:
                reason = f"the VM is {state}" if state != "running" else f"not within {timeout_s} s"
                raise DestinationError(f"boot not verified ({reason}): "
                                       + "; ".join(f"{p}: {w}" for p, w in why.items())
                                       + self._boot_tails(vm, screen))
            if time.monotonic() - last_beat > 5:
                heartbeat()
                last_beat = time.monotonic()
            time.sleep(0.25)

    def _boot_tails(self, vm: str, screen: boot_probes.ScreenReader | None) -> str:
        tails = ""
        console = boot_probes.tail(self.console_text(vm))
        if console:
            tails += f"\nconsole's last lines:\n{console}"
        if screen is not None and boot_probes.tail(screen.last_text):
            tails += f"\nscreen's last lines (OCR):\n{boot_probes.tail(screen.last_text)}"
        return tails

    def screen_text(self, vm: str) -> str:
        """What the VM's screen shows now, read by tesseract."""
        try:
            return boot_probes.ScreenReader(self._conn(), self._domain(vm), self.run_dir / "screens").read()
        except libvirt.libvirtError as exc:
            raise DestinationError(f"no screenshot of VM {vm}: {exc}") from None
        except OSError as exc:
            raise DestinationError(f"the screen of VM {vm} cannot be read: {exc}") from None

    def commit_vm(self, vm: str, protection: Sequence[str], heartbeat: Callable[[], None]) -> str:
        """Pull each disk's backing chain (the recovery point's layers) into
        its overlay while the guest runs (libvirt's block pull), one disk at
        a time; the overlays are then standalone images, the VM's own."""
        dom = self._domain(vm)
        wanted = {str(Path(h).absolute()) for h in protection}
        done = []
        for disk in ET.fromstring(dom.XMLDesc(0)).iterfind("./devices/disk"):
            source, target = disk.find("source"), disk.find("target")
            if source is None or target is None or source.get("file") not in wanted:
                continue
            device = target.get("dev")
            try:
                dom.blockPull(device, 0, 0)
            except libvirt.libvirtError as exc:
                raise DestinationError(f"the block pull of {device} of VM {vm} did not start: {exc}") from None
            self._wait_block_job(dom, vm, device, heartbeat)
            info = json.loads(_qemu_img("info", "-U", "--output=json", source.get("file")))
            if info.get("backing-filename"):
                raise DestinationError(f"{source.get('file')} still has a backing file after the block pull")
            done.append(f"{device}: {source.get('file')} is standalone")
        if len(done) != len(wanted):
            raise DestinationError(f"VM {vm} has {len(done)} of its {len(wanted)} protected disks")
        return "; ".join(done)

    def _wait_block_job(self, dom, vm: str, device: str, heartbeat: Callable[[], None]) -> None:
        deadline = time.monotonic() + COMMIT_TIMEOUT_S
        last_beat = time.monotonic()
        while True:
            try:
                job = dom.blockJobInfo(device, 0)
            except libvirt.libvirtError as exc:
                raise DestinationError(f"the block pull of {device} of VM {vm} failed: {exc}") from None
            if not job:
                return  # finished (libvirt answers {} once no job runs on the disk)
            if time.monotonic() > deadline:
                raise DestinationError(f"the block pull of {device} of VM {vm} did not finish within "
                                       f"{COMMIT_TIMEOUT_S:.0f} s ({job.get('cur', 0)} of {job.get('end', 0)} bytes)")
            if time.monotonic() - last_beat > 5:
                heartbeat()
                last_beat = time.monotonic()
            time.sleep(0.2)

    def _power_off(self, dom, vm: str) -> None:
        try:
            dom.destroy()
        except libvirt.libvirtError as exc:
            with contextlib.suppress(libvirt.libvirtError):
                if not dom.isActive():
                    return  # it stopped by itself meanwhile
            raise DestinationError(f"VM {vm} does not power off: {exc}") from None

    def destroy(self, vm: str) -> None:
        dom = self._lookup(vm)
        if dom is None:
            return
        with contextlib.suppress(libvirt.libvirtError):
            if dom.isActive():
                self._power_off(dom, vm)
        flags = (libvirt.VIR_DOMAIN_UNDEFINE_NVRAM | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                 | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
        try:
            dom.undefineFlags(flags)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise DestinationError(f"VM {vm} cannot be undefined: {exc}") from None

    def console_text(self, vm: str) -> str:
        """The serial console's text, with terminal escapes and carriage
        returns removed so that regular expressions see plain lines."""
        try:
            raw = self.console_path(vm).read_bytes()
        except FileNotFoundError:
            return ""
        except PermissionError as exc:
            raise DestinationError(f"cannot read the console of VM {vm}: {exc}") from None
        return _ANSI_RE.sub("", raw.decode("utf-8", errors="replace")).replace("\r", "")

    def state(self, vm: str) -> str:
        dom = self._lookup(vm)
        if dom is None:
            return "absent"
        try:
            return _STATE_NAMES.get(dom.state()[0], "unknown")
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return "absent"
            raise DestinationError(f"state of VM {vm}: {exc}") from None

    def free_memory_mib(self) -> int | None:
        try:
            return self._conn().getFreeMemory() // 2**20
        except libvirt.libvirtError as exc:
            raise DestinationError(f"cannot read the free memory of {self.uri}: {exc}") from None

    def has_network(self, network: str) -> bool:
        try:
            self._conn().networkLookupByName(network)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_NETWORK:
                return False
            raise DestinationError(f"libvirt lookup of network {network}: {exc}") from None
        return True

    def list_vms(self, prefix: str = "") -> list[str]:
        """Names of the defined VMs starting with prefix (for sweeping leftovers)."""
        try:
            domains = self._conn().listAllDomains(0)
        except libvirt.libvirtError as exc:
            raise DestinationError(f"cannot list the VMs on {self.uri}: {exc}") from None
        return sorted(d.name() for d in domains if d.name().startswith(prefix))

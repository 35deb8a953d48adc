"""The journal of local volumes: every replication cycle after a volume's
first writes a layer of its own, a qcow2 file over the layer of the volume's
newest recovery point (or over the raw volume file), served to the cycle's
copy by a qemu-nbd of its own. Sealing the layer makes it a recovery point;
discarding it fences the cycle (its export closed, a late write lands
nowhere); retention merges an expiring point's newer neighbour into it.

A layer is VOLUME_DIR/layers/<export name>.<cycle>.qcow2: the volumes' nbdkit
(`nbdkit file dir=VOLUME_DIR`) serves only the directory's own files, never a
subdirectory's, so no layer is reachable through it. Its server's socket, pid
file, log and URI are in RUN_DIR/layers/, named by a short hash of the
layer's name (a Unix socket path has at most 107 bytes).

Every image check and change goes through qemu-img (Debian's qemu-utils,
installed by scripts/setup.sh), each call with a deadline."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

from replication.platforms.base import VolumeError
from vma_agent import nbdkit

IMG_TIMEOUT_S = 120.0  # info, create, rebase: metadata only
# A commit copies the newer layer's data: a layer of 1 TiB at 200 MB/s takes
# 1.5 hours, the deadline is twice that.
COMMIT_TIMEOUT_S = 3 * 3600.0
START_TIMEOUT_S = 30.0
# Sealing waits this long for the layer's server to flush and exit; it is
# never killed instead (its qcow2 metadata would be lost with it).
SEAL_TIMEOUT_S = 120.0
KILL_TIMEOUT_S = 15.0
LOCK_RELEASE_S = 5.0
SUN_PATH_MAX = 107
INSTALL_HINT = "install qemu-utils (apt-get install qemu-utils; scripts/setup.sh does)"

# How a cycle's layer is made and served, chosen with bench/journal_bench.py
# (its table in the helper report of issue 28): 2 MiB clusters of 64 KiB subclusters (extended L2
# entries) allocate a thirty-second as often as 64 KiB clusters while a
# point still costs its changed data (the unwritten subclusters of a
# cluster stay holes), and qemu-nbd writing with O_DIRECT and Linux native
# AIO keeps its single thread off the page cache's copying: together a copy
# into a layer goes as fast as onto the raw file through nbdkit (64 KiB
# clusters through the page cache: about 0.55x). Flushes are honoured. A
# file system without O_DIRECT (tmpfs before Linux 6.6) gets the page cache.
LAYER_OPTIONS = "cluster_size=2M,extended_l2=on"
SERVE_OPTIONS = ["--cache=none", "--aio=native", "--discard=unmap", "--detect-zeroes=off"]
SERVE_OPTIONS_NO_DIRECT = ["--cache=writeback", "--aio=threads", "--discard=unmap", "--detect-zeroes=off"]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # job ids have dots; never "/" nor a leading "."


def run_tool(cmd: list[str], what: str, timeout: float = IMG_TIMEOUT_S,
             error: type[Exception] = VolumeError) -> str:
    """Run a qemu tool (qemu-img, qemu-io) with a deadline; its output, or
    `error` saying what failed and why."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, umask=0o077,
                              stdin=subprocess.DEVNULL, check=False)
    except FileNotFoundError:
        raise error(f"{what}: {cmd[0]} is not installed: {INSTALL_HINT}") from None
    except subprocess.TimeoutExpired:
        raise error(f"{what}: {cmd[0]} did not finish within {timeout:.0f} s") from None
    if done.returncode != 0:
        raise error(f"{what}: {_readable(done.stderr or done.stdout)}")
    return done.stdout


def _readable(stderr: str) -> str:
    text = " ".join(line.strip() for line in stderr.strip().splitlines()) or "no message"
    if "lock" in text and "Failed to get" in text:
        text += " (the image is in use: a layer's export, a test VM or a failover holds it open; end that first)"
    return text


def image_info(path: Path) -> dict:
    """qemu-img's description of one image (not its chain), read without
    taking its lock (an image in use can be described)."""
    if not path.exists():
        raise VolumeError(f"image {path} does not exist")
    out = run_tool(["qemu-img", "info", "-U", "--output=json", str(path)], f"cannot read image {path}")
    return json.loads(out)


def backing_of(path: Path) -> Path | None:
    info = image_info(path)
    name = info.get("full-backing-filename") or info.get("backing-filename")
    return Path(os.path.realpath(path.parent / name)) if name else None


def check_layer_over(layer: Path, base: Path) -> dict:
    """The layer's description, once checked: a qcow2 image whose backing is `base`."""
    info = image_info(layer)
    if info.get("format") != "qcow2":
        raise VolumeError(f"layer {layer} is {info.get('format')!r}, not a qcow2 image")
    backing = backing_of(layer)
    if backing != Path(os.path.realpath(base)):
        raise VolumeError(f"layer {layer} lies over {backing or 'nothing'}, not over {base}")
    return info


def _same_file_holders(paths: list[Path]) -> dict[int, set[int]]:
    """Processes (other than this one) holding any of `paths` open: pid ->
    the indexes into `paths` it holds."""
    wanted = {}
    for index, path in enumerate(paths):
        st = path.stat()
        wanted[(st.st_dev, st.st_ino)] = index
    holders: dict[int, set[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            for fd in os.scandir(f"/proc/{entry.name}/fd"):
                with contextlib.suppress(OSError):
                    st = os.stat(fd.path)
                    if (st.st_dev, st.st_ino) in wanted:
                        holders.setdefault(int(entry.name), set()).add(wanted[(st.st_dev, st.st_ino)])
    return holders


def _command_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "(gone)"


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class LayerJournal:
    """The layers of one provider's volumes and their servers."""

    def __init__(self, volume_dir: Path, run_dir: Path, *, tls_psk_file: Path | None, tls_username: str,
                 tcp: tuple[str, int] | None):
        # Absolute: a layer's server is found by the layer's path on its command line.
        self.volume_dir = Path(volume_dir).absolute()
        self.layer_dir = self.volume_dir / "layers"
        self.state_dir = Path(run_dir).absolute() / "layers"
        self.tls_psk_file = tls_psk_file
        self.tls_username = tls_username
        self.tcp = tcp

    # -- names ------------------------------------------------------------------

    def layer_path(self, export_name: str, cycle: str) -> Path:
        for what, name in (("export name", export_name), ("cycle", cycle)):
            if not _NAME_RE.match(name or ""):
                raise VolumeError(f"{what} {name!r} is not a plain name (letters, digits, '-', '_', '.')")
        return self.layer_dir / f"{export_name}.{cycle}.qcow2"

    def _state(self, layer: Path, suffix: str) -> Path:
        key = hashlib.sha256(layer.name.encode()).hexdigest()[:16]
        return self.state_dir / f"{key}.{suffix}"

    def is_layer(self, path: Path) -> bool:
        return Path(os.path.realpath(path)).parent == Path(os.path.realpath(self.layer_dir))

    @contextlib.contextmanager
    def _lock(self, name: str):
        """One volume's journal changes one at a time (two workers, a retry)."""
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        export = name.split(".", 1)[0]
        with open(self.state_dir / f"{hashlib.sha256(export.encode()).hexdigest()[:16]}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    # -- the cycle's layer --------------------------------------------------------

    def open(self, export_name: str, cycle: str, base: Path, size_bytes: int) -> str:
        """Create the cycle's layer over `base` (or find it again) and serve
        it; returns its NBD URI."""
        layer = self.layer_path(export_name, cycle)
        with self._lock(layer.name):
            if layer.exists():
                if not layer.stat().st_mode & 0o200:
                    raise VolumeError(f"layer {layer} is sealed (a recovery point's): it is never written again")
                check_layer_over(layer, base)
            else:
                self._create(layer, base, size_bytes)
            uri = self._running_uri(layer)
            return uri or self._serve(layer, f"{export_name}.{cycle}")

    def _create(self, layer: Path, base: Path, size_bytes: int) -> None:
        info = image_info(base)
        size = max(size_bytes or 0, int(info["virtual-size"]))
        self.layer_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        partial = layer.with_name(layer.name + ".new")
        partial.unlink(missing_ok=True)
        # -u: the backing is neither opened nor locked (it may be served).
        run_tool(["qemu-img", "create", "-q", "-f", "qcow2", "-o", LAYER_OPTIONS, "-F", info["format"],
              "-b", str(Path(base).absolute()), "-u", str(partial), str(size)], f"cannot create layer {layer.name}")
        partial.chmod(0o600)
        os.rename(partial, layer)  # a crash never leaves a half-made layer under the layer's name
        _fsync_dir(self.layer_dir)

    def seal(self, export_name: str, cycle: str, base: Path) -> str:
        """Stop the layer's server (it flushes), make the layer read-only."""
        layer = self.layer_path(export_name, cycle)
        with self._lock(layer.name):
            if not layer.exists():
                raise VolumeError(f"cycle {cycle} has no layer of {export_name} to seal (never opened, or discarded)")
            self._stop(layer, signal.SIGTERM, SEAL_TIMEOUT_S)
            layer.chmod(0o400)
            check_layer_over(layer, base)
            return str(layer)

    def discard(self, export_name: str, cycle: str) -> str:
        """The fence: kill the layer's server (no flush, no goodbye), then
        remove its socket and the layer."""
        layer = self.layer_path(export_name, cycle)
        with self._lock(layer.name):
            if layer.exists() and not layer.stat().st_mode & 0o200:
                raise VolumeError(f"layer {layer} is sealed (a recovery point's): refusing to discard it")
            killed = self._stop(layer, signal.SIGKILL, KILL_TIMEOUT_S)
            existed = layer.exists()
            layer.unlink(missing_ok=True)
            layer.with_name(layer.name + ".new").unlink(missing_ok=True)
            if not existed and not killed:
                return f"cycle {cycle} of {export_name}: no layer (already discarded)"
            return (f"cycle {cycle} of {export_name}: export closed"
                    f"{f' (qemu-nbd {killed} killed)' if killed else ''}, layer removed")

    # -- its server ---------------------------------------------------------------

    def server_pids(self, layer: Path) -> list[int]:
        """The qemu-nbd processes serving `layer` (found by their command
        line, so a lost pid file hides none)."""
        needle = str(layer).encode()
        pids = []
        # One killed a moment ago may still be exiting (its command line
        # already gone, its files not yet closed): its pid file names it.
        with contextlib.suppress(OSError, ValueError):
            pid = int(self._state(layer, "pid").read_text())
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if (argv == [b""] or (argv[0].endswith(b"qemu-nbd") and needle in argv)) and nbdkit.process_alive(pid):
                pids.append(pid)
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                argv = Path(f"/proc/{entry.name}/cmdline").read_bytes().split(b"\0")
                if (argv[0].endswith(b"qemu-nbd") and needle in argv and nbdkit.process_alive(int(entry.name))
                        and int(entry.name) not in pids):
                    pids.append(int(entry.name))
        return pids

    def _running_uri(self, layer: Path) -> str | None:
        """The URI of the layer's server if it still serves (an OMA restart
        leaves it running), else None (what is left of it is removed)."""
        pids = self.server_pids(layer)
        try:
            state = json.loads(self._state(layer, "json").read_text())
        except (OSError, ValueError):
            state = None
        if pids and state and nbdkit.accepts(state["socket"], tuple(state["tcp"]) if state["tcp"] else None):
            return state["uri"]
        self._stop(layer, signal.SIGKILL, KILL_TIMEOUT_S)
        return None

    def _serve(self, layer: Path, export: str) -> str:
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        sock, pidfile, log = (self._state(layer, s) for s in ("sock", "pid", "log"))
        if len(str(sock)) > SUN_PATH_MAX:
            raise VolumeError(f"run directory {self.state_dir} is too deep for a Unix socket path "
                              f"({len(str(sock))} > {SUN_PATH_MAX} bytes): choose a shorter OMA_RUN_DIR")
        # A server killed a moment ago (by discard, or by a restart) may still
        # hold the layer's lock: the kernel releases it a little after exit.
        with contextlib.suppress(AssertionError):
            _wait(lambda: not _locked(layer), LOCK_RELEASE_S)
        tcp = (self.tcp[0], _free_port(self.tcp[0])) if self.tcp else None
        listen = ["--bind", tcp[0], "--port", str(tcp[1])] if tcp else ["--socket", str(sock)]
        cmd = ["qemu-nbd", "--fork", f"--pid-file={pidfile}", "--persistent", "--shared=0", "--format=qcow2",
               f"--export-name={export}", *listen, *self._tls_args(), *_serve_options(layer), str(layer)]
        with open(log, "ab") as out:
            try:
                # --fork: returns once the server listens; its own session, so
                # it outlives the worker that started it.
                proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, timeout=START_TIMEOUT_S,
                                      start_new_session=True, umask=0o077, check=False)
            except FileNotFoundError:
                raise VolumeError(f"cannot serve layer {layer.name}: qemu-nbd is not installed: "
                                  f"{INSTALL_HINT}") from None
            except subprocess.TimeoutExpired:
                self._stop(layer, signal.SIGKILL, KILL_TIMEOUT_S)
                raise VolumeError(f"qemu-nbd did not serve layer {layer.name} within {START_TIMEOUT_S:.0f} s") from None
        if proc.returncode != 0:
            raise VolumeError(f"qemu-nbd cannot serve layer {layer.name}: {_readable(_tail(log))}")
        uri = self._uri(export, sock, tcp)
        self._state(layer, "json").write_text(json.dumps({"uri": uri, "socket": str(sock), "tcp": tcp}))
        return uri

    def _tls_args(self) -> list[str]:
        """qemu-nbd reads a PSK from DIR/keys.psk (username:hexkey, the same
        file nbdkit reads): a link to the provider's key file."""
        if not self.tls_psk_file:
            return []
        keydir = self.state_dir / "psk"
        keydir.mkdir(mode=0o700, exist_ok=True)
        link = keydir / "keys.psk"
        target = str(Path(self.tls_psk_file).absolute())
        if not link.is_symlink() or os.readlink(link) != target:
            link.unlink(missing_ok=True)
            link.symlink_to(target)
        return ["--object", f"tls-creds-psk,id=tls0,endpoint=server,dir={keydir}", "--tls-creds=tls0"]

    def _uri(self, export: str, sock: Path, tcp: tuple[str, int] | None) -> str:
        if tcp:
            host = f"[{tcp[0]}]" if ":" in tcp[0] else tcp[0]
            if self.tls_psk_file:
                return f"nbds://{self.tls_username}@{host}:{tcp[1]}/{export}?tls-psk-file={self.tls_psk_file}"
            return f"nbd://{host}:{tcp[1]}/{export}"
        if self.tls_psk_file:
            return f"nbds+unix://{self.tls_username}@/{export}?socket={sock}&tls-psk-file={self.tls_psk_file}"
        return nbdkit.unix_uri(sock, export)

    def _stop(self, layer: Path, sig: int, timeout: float) -> int | None:
        """Signal the layer's servers and wait for them to be gone; then
        remove their socket, pid file and URI. Returns a pid signalled."""
        pids = self.server_pids(layer)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while any(nbdkit.process_alive(pid) for pid in pids):
            if time.monotonic() > deadline:
                raise VolumeError(f"qemu-nbd {pids} serving layer {layer.name} did not exit within {timeout:.0f} s "
                                  f"of signal {signal.Signals(sig).name}")
            time.sleep(0.02)
        if pids:
            # The kernel releases a dead process's image locks a moment after
            # it is gone; the next user (a new server, a merge) waits for it.
            with contextlib.suppress(AssertionError):
                _wait(lambda: not _locked(layer), LOCK_RELEASE_S)
        for suffix in ("sock", "pid", "json"):
            self._state(layer, suffix).unlink(missing_ok=True)
        return pids[0] if pids else None

    # -- retention and removal ------------------------------------------------------

    def merge(self, older: Path, newer: Path, above: Path | None) -> str:
        """Merge layer `newer` into `older` (its backing), re-point `above`
        at `older`, remove `newer`; returns older's handle.

        The steps, and what a crash between them leaves (every remaining
        point readable; running the merge again finishes it):
        1. qemu-img commit -d: newer's data is copied into older, newer kept
           as it was. A crash during it leaves older's own point part-way
           (that point is expiring: it is gone once the merge starts), and
           newer's and above's points intact (newer covers every area the
           commit writes).
        2. qemu-img rebase -u: above's backing becomes older, which now
           reads as newer did. Before it, above still lies over newer (kept).
        3. newer is removed. Before it, newer is an orphan over older.
        """
        for path in (newer, above):
            if path is not None and not self.is_layer(path):
                raise VolumeError(f"{path} is not a layer in {self.layer_dir}: refusing to merge it")
        with self._lock(newer.name):
            above_over = backing_of(above) if above else None
            if not newer.exists():
                if above is None or above_over == Path(os.path.realpath(older)):
                    return str(older)  # merged already, up to the removal of newer
                raise VolumeError(f"layer {newer} does not exist and {above} lies over {above_over}, not {older}")
            check_layer_over(newer, older)
            if above and above_over not in (Path(os.path.realpath(newer)), Path(os.path.realpath(older))):
                raise VolumeError(f"layer {above} lies over {above_over}, not over {newer}")
            self._refuse_if_in_use(older, newer, above)
            with _writable(older):
                run_tool(["qemu-img", "commit", "-q", "-d", "-f", "qcow2", str(newer)],
                     f"cannot merge layer {newer.name} into {older.name}", timeout=COMMIT_TIMEOUT_S)
            if above and above_over != Path(os.path.realpath(older)):
                with _writable(above):
                    run_tool(["qemu-img", "rebase", "-q", "-u", "-f", "qcow2", "-F", image_info(older)["format"],
                          "-b", str(Path(older).absolute()), str(above)], f"cannot re-point layer {above.name}")
            newer.unlink()
            _fsync_dir(self.layer_dir)
            return str(older)

    def _refuse_if_in_use(self, older: Path, newer: Path, above: Path | None) -> None:
        """Refuse before changing anything while a process uses older's or
        newer's point (holds either image open, not through `above`), or
        while anything holds `above` under QEMU's lock: its own export, a
        test VM's overlay or a later cycle's layer over it (QEMU forbids
        rewriting a qcow2 image another process holds, even as a backing;
        a raw volume file held as a backing it leaves writable, hence the
        check of open files for older and newer)."""
        chain = [older, newer, *([above] if above else [])]
        for pid, held in sorted(_same_file_holders(chain).items()):
            if above is None or 2 not in held:
                names = ", ".join(chain[i].name for i in sorted(held))
                raise VolumeError(f"cannot merge {newer.name} into {older.name}: process {pid} "
                                  f"({_command_of(pid)}) holds {names} open (a test VM, failover or export uses "
                                  "that point); end it first")
        if above:
            # Opening it for writing (as raw: no chain, no change) fails while QEMU's lock is held.
            with _writable(above):
                run_tool(["qemu-io", "-f", "raw", "-c", "quit", str(above)],
                     f"cannot merge {newer.name} into {older.name}: layer {above.name} is in use "
                     "(its export, a test VM's overlay or a later cycle's layer lies over it)")

    def drop(self, path: Path) -> None:
        if not self.is_layer(path):
            if Path(os.path.realpath(path)).parent == Path(os.path.realpath(self.volume_dir)):
                return  # the volume file itself: delete(volume) removes it
            raise VolumeError(f"{path} is not a layer in {self.layer_dir}: refusing to remove it")
        with self._lock(path.name):
            self._stop(path, signal.SIGKILL, KILL_TIMEOUT_S)
            path.unlink(missing_ok=True)

    def remove_all(self, export_name: str) -> list[str]:
        """Every layer of the volume, its server stopped; the names removed."""
        removed = []
        for layer in sorted(self.layer_dir.glob(f"{export_name}.*.qcow2*")):
            with self._lock(layer.name):
                self._stop(layer, signal.SIGKILL, KILL_TIMEOUT_S)
                layer.unlink(missing_ok=True)
                removed.append(layer.name)
        return removed


def layer_bytes(path: Path) -> int:
    try:
        return path.stat().st_blocks * 512
    except OSError as exc:
        raise VolumeError(f"cannot measure layer {path}: {exc.strerror}") from None


@contextlib.contextmanager
def _writable(path: Path):
    """The image writable by its owner for the block (a sealed layer is 0400)."""
    mode = path.stat().st_mode & 0o777
    path.chmod(mode | 0o200)
    try:
        yield
    finally:
        path.chmod(mode)


def _locked(path: Path) -> bool:
    """Whether any process holds a lock on the file (QEMU's image locks)."""
    try:
        st = path.stat()
        locks = Path("/proc/locks").read_text()
    except OSError:
        return False
    return f" {os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino} " in locks


def _wait(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.01)


def _serve_options(layer: Path) -> list[str]:
    """SERVE_OPTIONS, or the page cache's where the file system has no O_DIRECT."""
    if "--cache=none" not in SERVE_OPTIONS:
        return SERVE_OPTIONS
    try:
        os.close(os.open(layer, os.O_RDONLY | os.O_DIRECT))
    except OSError:
        return SERVE_OPTIONS_NO_DIRECT
    return SERVE_OPTIONS


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tail(log: Path) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").strip().splitlines()[-3:])
    except OSError:
        return ""

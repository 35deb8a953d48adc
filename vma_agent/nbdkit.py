"""Start and stop nbdkit processes that serve disks over NBD on Unix sockets."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

START_TIMEOUT_S = 15.0
SOURCE_EXPORT_PREFIX = "vma-src-"


class NbdkitError(RuntimeError):
    pass


def unix_uri(socket_path: str | Path, export_name: str = "") -> str:
    return f"nbd+unix:///{export_name}?socket={socket_path}"


def socket_accepts(socket_path: str | Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(str(socket_path))
        except OSError:
            return False
        return True


def _log_tail(log_path: Path) -> str:
    try:
        lines = log_path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "no message"
    return " / ".join(lines[-3:]) or "no message"


def _wait_until_listening(proc: subprocess.Popen, socket_path: Path, log_path: Path) -> None:
    server = Path(proc.args[0]).name if isinstance(proc.args, list) else "nbdkit"  # nbdkit, or qemu-nbd
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise NbdkitError(f"{server} exited with status {proc.returncode}: {_log_tail(log_path)}")
        if socket_path.exists() and socket_accepts(socket_path):
            return
        time.sleep(0.02)
    proc.kill()
    raise NbdkitError(f"{server} did not listen on {socket_path} within {START_TIMEOUT_S:.0f} s")


def stop_process(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def serve_file_readonly(path: str | Path) -> Iterator[str]:
    """Serve one image file read-only on a private socket for the duration of
    the block; yields the NBD URI."""
    if not Path(path).exists():
        raise NbdkitError(f"source image {path} does not exist")
    with serve_readonly(lambda sock: ["nbdkit", "--foreground", "--exit-with-parent", "--readonly",
                                      "--unix", str(sock), "file", f"file={path}"]) as uri:
        yield uri


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent dies (what nbdkit's
    --exit-with-parent does, for servers without it, such as qemu-nbd)."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@contextlib.contextmanager
def serve_readonly(command_for: Callable[[Path], list[str]]) -> Iterator[str]:
    """Run the nbdkit command that `command_for(socket path)` gives, on a
    private socket, for the duration of the block; yields the NBD URI. The
    command should carry --exit-with-parent so nbdkit also ends if this
    process dies."""
    rundir = Path(tempfile.mkdtemp(prefix=SOURCE_EXPORT_PREFIX))
    sock, log_path = rundir / "nbd.sock", rundir / "nbdkit.log"
    with open(log_path, "wb") as log:
        try:
            proc = subprocess.Popen(command_for(sock), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=log, preexec_fn=_die_with_parent)
        except OSError as exc:
            shutil.rmtree(rundir, ignore_errors=True)
            raise NbdkitError(f"cannot start nbdkit: {exc}") from exc
    # Who owns the export: the sweeper removes it once that process is gone.
    (rundir / "owner").write_text(f"{os.getpid()} {proc.pid}\n")
    try:
        _wait_until_listening(proc, sock, log_path)
        yield unix_uri(sock)
    finally:
        stop_process(proc)
        shutil.rmtree(rundir, ignore_errors=True)


def start_daemon(args: list[str], socket_path: Path, pidfile: Path, log_path: Path,
                 tcp: tuple[str, int] | None = None) -> int:
    """Start a long-lived nbdkit in the background (it outlives this process
    and its process group) on a Unix socket, or on `tcp` (address, port);
    returns its pid once it accepts connections."""
    socket_path.unlink(missing_ok=True)
    listen = ["--ipaddr", tcp[0], "--port", str(tcp[1])] if tcp else ["--unix", str(socket_path)]
    where = f"{tcp[0]}:{tcp[1]}" if tcp else str(socket_path)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            ["nbdkit", *listen, "--pidfile", str(pidfile), *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
            start_new_session=True, umask=0o077,  # its socket is created private, never briefly open
        )
    proc.wait(START_TIMEOUT_S)  # the foreground part exits once the server listens
    if proc.returncode != 0:
        raise NbdkitError(f"nbdkit exited with status {proc.returncode}: {_log_tail(log_path)}")
    # The background server writes its pid file just after the foreground part exits.
    deadline = time.monotonic() + START_TIMEOUT_S
    while (pid := daemon_pid(pidfile)) is None or not accepts(socket_path, tcp):
        if time.monotonic() > deadline:
            raise NbdkitError(f"nbdkit started but does not serve on {where}: {_log_tail(log_path)}")
        time.sleep(0.02)
    # The daemon writes its pid file with a umask of its own (0644): ours like everything in the run dir.
    pidfile.chmod(0o600)
    return pid


def accepts(socket_path: str | Path, tcp: tuple[str, int] | None = None) -> bool:
    """Whether a server accepts connections on the Unix socket, or on `tcp`."""
    if tcp is None:
        return socket_accepts(socket_path)
    try:
        socket.create_connection(tcp, timeout=1.0).close()
    except OSError:
        return False
    return True


def daemon_pid(pidfile: Path) -> int | None:
    """The pid in pidfile if that process is alive, else None."""
    try:
        pid = int(pidfile.read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def stop_daemon(pidfile: Path, timeout: float = 5.0) -> None:
    pid = daemon_pid(pidfile)
    if pid is None:
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and daemon_pid(pidfile) is not None:
        time.sleep(0.05)
    if daemon_pid(pidfile) is not None:
        os.kill(pid, signal.SIGKILL)
    pidfile.unlink(missing_ok=True)


def process_alive(pid: int) -> bool:
    """Whether the process runs; a zombie (dead, not yet reaped: its parent
    died too and nobody reaped it yet) counts as dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def _is_nbdkit(pid: int) -> bool:
    """An export server of ours: nbdkit, or qemu-nbd (qcow2 sources)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].endswith((b"nbdkit", b"qemu-nbd"))
    except OSError:
        return False


def sweep_orphaned_exports(tmpdir: str | Path | None = None) -> list[str]:
    """Source exports whose owning process died (SIGKILL, OOM, a lost host
    does not run `finally`): stop their nbdkit if it still runs (it normally
    exits with its parent) and remove their socket, log and directory.
    Returns a description of each removal."""
    removed = []
    for rundir in sorted(Path(tmpdir or tempfile.gettempdir()).glob(f"{SOURCE_EXPORT_PREFIX}*")):
        try:
            owner, server = (int(x) for x in (rundir / "owner").read_text().split())
        except (OSError, ValueError):
            # Not written yet (an export starting) or unreadable: only
            # directories older than a start could ever take are orphans.
            try:
                if time.time() - rundir.stat().st_mtime < 10 * START_TIMEOUT_S:
                    continue
            except OSError:
                continue
            owner = server = -1
        if owner > 0 and process_alive(owner):
            continue
        what = f"source export {rundir.name} of dead process {owner}"
        if server > 0 and process_alive(server) and _is_nbdkit(server):
            os.kill(server, signal.SIGKILL)
            what += f" (killed nbdkit {server})"
        shutil.rmtree(rundir, ignore_errors=True)
        removed.append(what)
    return removed

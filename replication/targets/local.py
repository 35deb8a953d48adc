"""Local target volumes: sparse files in one directory, all served by one
nbdkit process (`nbdkit file dir=...`), each as export migration-vol-{uuid}."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from vma_agent import nbdkit


class VolumeError(RuntimeError):
    pass


class LocalVolumeProvider:
    name = "local"

    def __init__(self, volume_dir: Path, run_dir: Path, *, tls_psk_file: Path | None = None,
                 tls_username: str = "oma", extra_args: list[str] | tuple = ()):
        self.volume_dir = Path(volume_dir)
        self.run_dir = Path(run_dir)
        # With a PSK file the server accepts TLS only (--tls=require) and the
        # copies connect with the same key file: the key is never on a
        # command line, only the file's path.
        self.tls_psk_file = Path(tls_psk_file) if tls_psk_file else None
        self.tls_username = tls_username
        # Extra nbdkit arguments (filters and their parameters), e.g. the
        # fault suite's error filter.
        self.extra_args = list(extra_args)
        self.socket_path = self.run_dir / "targets.sock"
        self.pidfile = self.run_dir / "targets.pid"

    def volume_path(self, export_name: str) -> Path:
        return self.volume_dir / export_name

    def create_volume(self, export_name: str, size_bytes: int) -> Path:
        """Create the volume file sparse, or grow an existing one to a larger
        source; never shrink a volume that holds data."""
        self.volume_dir.mkdir(parents=True, exist_ok=True)
        path = self.volume_path(export_name)
        with open(path, "ab") as f:
            current = os.fstat(f.fileno()).st_size
            if current > size_bytes:
                raise VolumeError(
                    f"volume {export_name} is {current} bytes, larger than its source disk ({size_bytes} bytes); "
                    "refusing to shrink it"
                )
            if current < size_bytes:
                f.truncate(size_bytes)
        return path

    def export_uri(self, export_name: str) -> str:
        if self.tls_psk_file:
            return (f"nbds+unix://{self.tls_username}@/{export_name}?socket={self.socket_path}"
                    f"&tls-psk-file={self.tls_psk_file}")
        return nbdkit.unix_uri(self.socket_path, export_name)

    def ensure_export_server(self) -> int:
        """Start the export server unless one is already serving; returns its
        pid. A lock file keeps two workers from starting it at once."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.volume_dir.mkdir(parents=True, exist_ok=True)
        with self._lock():
            pid = nbdkit.daemon_pid(self.pidfile)
            if pid is not None and nbdkit.socket_accepts(self.socket_path):
                return pid
            if pid is not None:
                nbdkit.stop_daemon(self.pidfile)
            tls = ["--tls=require", f"--tls-psk={self.tls_psk_file}"] if self.tls_psk_file else []
            filters = [arg for arg in self.extra_args if arg.startswith("--filter=")]
            params = [arg for arg in self.extra_args if not arg.startswith("--filter=")]
            return nbdkit.start_daemon(
                [*tls, *filters, "file", f"dir={self.volume_dir}", *params], self.socket_path, self.pidfile,
                self.run_dir / "targets.log",
            )

    def stop_export_server(self) -> None:
        with self._lock():
            nbdkit.stop_daemon(self.pidfile)
            self.socket_path.unlink(missing_ok=True)

    @contextlib.contextmanager
    def _lock(self):
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / "targets.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

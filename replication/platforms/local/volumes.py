"""Local target volumes: sparse files in one directory, all served by one
nbdkit process (`nbdkit file dir=...`), each as export migration-vol-{uuid}.
A volume's later cycles write layers of their own (replication.platforms.
local.journal): qcow2 files over the volume, each served by its own qemu-nbd."""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import logging
import os
from pathlib import Path

from replication.platforms.base import TargetProvider, VolumeError
from replication.platforms.local.journal import LayerJournal, layer_bytes
from vma_agent import nbdkit

log = logging.getLogger(__name__)


def _parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
        number = int(port)
    except ValueError:
        raise VolumeError(f"export listen address {listen!r} is not IP:PORT (e.g. 127.0.0.1:10809)") from None
    if not sep or not 0 < number < 65536:
        raise VolumeError(f"export listen address {listen!r} is not IP:PORT (e.g. 127.0.0.1:10809)")
    return host, number


class LocalVolumeProvider(TargetProvider):
    name = "local"

    def __init__(self, volume_dir: Path, run_dir: Path, *, tls_psk_file: Path | None = None,
                 tls_username: str = "oma", extra_args: list[str] | tuple = (), listen: str = ""):
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
        # Empty: a Unix socket (agents on this host). "HOST:PORT": TCP, for
        # agents elsewhere; anything but loopback only with TLS.
        self.tcp = _parse_listen(listen) if listen else None
        if self.tcp and not self.tls_psk_file and not ipaddress.ip_address(self.tcp[0]).is_loopback:
            raise VolumeError(f"refusing to export volumes on {listen} without TLS: set OMA_EXPORT_TLS_PSK_FILE")
        self.journal = LayerJournal(self.volume_dir, self.run_dir, tls_psk_file=self.tls_psk_file,
                                    tls_username=tls_username, tcp=self.tcp)

    def volume_path(self, export_name: str) -> Path:
        return self.volume_dir / export_name

    def create_volume(self, export_name: str, size_bytes: int) -> Path:
        """Create the volume file sparse, or grow an existing one to a larger
        source; never shrink a volume that holds data."""
        self.volume_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.volume_path(export_name)
        # A replica is another machine's disk: its owner's alone from the
        # first byte, whatever the process's umask (and one left open is closed).
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab") as f:
            os.fchmod(f.fileno(), 0o600)
            current = os.fstat(f.fileno()).st_size
            if current > size_bytes:
                raise VolumeError(
                    f"volume {export_name} is {current} bytes, larger than its source disk ({size_bytes} bytes); "
                    "refusing to shrink it"
                )
            if current < size_bytes:
                f.truncate(size_bytes)
        return path

    def provision(self, volume, size_bytes: int) -> Path:
        """The volume's file at the source's size, exported."""
        path = self.create_volume(volume.export_name, size_bytes)
        type(volume).objects.filter(pk=volume.pk).update(size_bytes=size_bytes)
        self.ensure_export_server()
        return path

    def delete(self, volume) -> str:
        """Remove the volume's file (or the link to its device) and its
        layers (their servers stopped) for good."""
        layers = self.journal.remove_all(volume.export_name)
        self.volume_path(volume.export_name).unlink(missing_ok=True)
        return f"{volume.export_name} deleted" + (f" with {len(layers)} layer(s)" if layers else "")

    # -- the journal (the mechanics are in journal.py) -------------------------

    def open_layer(self, volume, cycle: str, base: str | None) -> str:
        """The cycle's layer over `base`, served by a qemu-nbd of its own;
        made again or found again (a server gone after an OMA restart is
        started again). No base: the cycle writes the volume in place."""
        if base is None:
            self.ensure_export_server()
            return self.export_uri(volume.export_name)
        return self.journal.open(volume.export_name, cycle, Path(base), volume.size_bytes or 0)

    def seal_layer(self, volume, cycle: str, base: str | None) -> str:
        if base is None:
            # The first cycle wrote the volume itself: its point is the file.
            return volume.path or str(self.volume_path(volume.export_name))
        return self.journal.seal(volume.export_name, cycle, Path(base))

    def discard_layer(self, volume, cycle: str, base: str | None) -> str:
        if base is None:
            return (f"cycle {cycle} wrote {volume.export_name} in place (its first cycle): "
                    "no layer to discard, the volume keeps what the cycle wrote")
        return self.journal.discard(volume.export_name, cycle)

    def merge_layers(self, older: str, newer: str, above: str | None) -> str:
        return self.journal.merge(Path(older), Path(newer), Path(above) if above else None)

    def drop_layer(self, handle: str) -> None:
        """Remove a layer file; the volume file itself is delete(volume)'s."""
        self.journal.drop(Path(handle))

    def layer_bytes(self, handle: str) -> int:
        """Allocated bytes of the layer (or volume) file on disk."""
        return layer_bytes(Path(handle))

    def export_uri(self, export_name: str) -> str:
        if self.tcp:
            host = f"[{self.tcp[0]}]" if ":" in self.tcp[0] else self.tcp[0]
            if self.tls_psk_file:
                return (f"nbds://{self.tls_username}@{host}:{self.tcp[1]}/{export_name}"
                        f"?tls-psk-file={self.tls_psk_file}")
            return f"nbd://{host}:{self.tcp[1]}/{export_name}"
        if self.tls_psk_file:
            return (f"nbds+unix://{self.tls_username}@/{export_name}?socket={self.socket_path}"
                    f"&tls-psk-file={self.tls_psk_file}")
        return nbdkit.unix_uri(self.socket_path, export_name)

    def ensure_export_server(self) -> int:
        """Start the export server unless one is already serving; returns its
        pid. A lock file keeps two workers from starting it at once."""
        self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.volume_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with self._lock():
            tls = ["--tls=require", f"--tls-psk={self.tls_psk_file}"] if self.tls_psk_file else []
            filters = [arg for arg in self.extra_args if arg.startswith("--filter=")]
            params = [arg for arg in self.extra_args if not arg.startswith("--filter=")]
            args = [*tls, *filters, "file", f"dir={self.volume_dir.absolute()}", *params]
            wanted = json.dumps({"args": args, "tcp": list(self.tcp) if self.tcp else None})
            pid = nbdkit.daemon_pid(self.pidfile)
            if pid is not None and nbdkit.accepts(self.socket_path, self.tcp):
                # A server started for another volume directory (or other
                # arguments) would answer "no export named ..." for every copy.
                if self._served() == wanted:
                    return pid
                log.warning("export server %s serves %s, not %s: restarting it", pid, self._served(), wanted)
            if pid is not None:
                nbdkit.stop_daemon(self.pidfile)
            pid = nbdkit.start_daemon(args, self.socket_path, self.pidfile, self.run_dir / "targets.log", tcp=self.tcp)
            if not self.tcp:
                # Whoever can connect can read and write every replica: the socket is the owner's alone.
                self.socket_path.chmod(0o600)
            self.served_path.write_text(wanted)
            return pid

    @property
    def served_path(self) -> Path:
        return self.run_dir / "targets.served"

    def _served(self) -> str:
        try:
            return self.served_path.read_text()
        except OSError:
            return "(unknown)"

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

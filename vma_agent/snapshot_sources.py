"""Where the agent reads a snapshot's disk from: an NBD export it starts for
the length of one copy, read-only, on a private Unix socket.

In production that is nbdkit's vddk plugin, reading the snapshot through
VMware's VDDK. VDDK cannot be installed everywhere (it is not free to
redistribute), so the data path is pluggable: `ImageDirSource` serves a
snapshot's disk from an image file laid out as the test vCenter simulator
keeps them."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from vma_agent import nbdkit


@dataclass(frozen=True)
class SnapshotDisk:
    """One disk of one snapshot, as vCenter names it."""

    vcenter: str  # the VCenter record's name
    vm_moref: str
    snapshot_moref: str
    device_key: int
    backing_file: str  # "[datastore] vm/vm.vmdk"


@dataclass
class VddkSource:
    """nbdkit's vddk plugin. The password reaches nbdkit as `password=+FILE`,
    never on its command line."""

    libdir: str
    server: str
    username: str
    thumbprint: str
    password_file: str = field(repr=False)
    port: int = 443
    transports: str = "nbdssl:nbd"
    nbdkit_binary: str = "nbdkit"

    def command(self, disk: SnapshotDisk, socket_path: str | Path) -> list[str]:
        port = [f"port={self.port}"] if self.port != 443 else []
        return [
            self.nbdkit_binary, "--foreground", "--exit-with-parent", "--readonly", "--unix", str(socket_path),
            "vddk", f"libdir={self.libdir}", f"server={self.server}", *port, f"user={self.username}",
            f"password=+{self.password_file}", f"thumbprint={self.thumbprint}", f"vm=moref={disk.vm_moref}",
            f"snapshot={disk.snapshot_moref}", f"transports={self.transports}", f"file={disk.backing_file}",
        ]

    @contextlib.contextmanager
    def serve(self, disk: SnapshotDisk) -> Iterator[str]:
        with nbdkit.serve_readonly(lambda sock: self.command(disk, sock)) as uri:
            yield uri


@dataclass
class ImageDirSource:
    """Snapshot disks as image files: DIR/<vcenter>/vms/<vm>/snapshots/<snapshot>/<key>.img."""

    root: Path

    def image_path(self, disk: SnapshotDisk) -> Path:
        return (Path(self.root) / disk.vcenter / "vms" / disk.vm_moref / "snapshots" / disk.snapshot_moref
                / f"{disk.device_key}.img")

    @contextlib.contextmanager
    def serve(self, disk: SnapshotDisk) -> Iterator[str]:
        with nbdkit.serve_file_readonly(self.image_path(disk)) as uri:
            yield uri


@contextlib.contextmanager
def password_file(password: str) -> Iterator[str]:
    """The password in a file only this user can read, removed afterwards."""
    rundir = tempfile.mkdtemp(prefix="vma-secret-")
    path = os.path.join(rundir, "password")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(password)
        yield path
    finally:
        shutil.rmtree(rundir, ignore_errors=True)


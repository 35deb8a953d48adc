"""Make the demo VM's two raw disks: odd sizes, one mostly data, one mostly
holes. The first boots (make_boot_disk.py: a kernel that prints
BOOT-MARKER: DEMO on its console) so a test failover of the demo VM from the
GUI verifies its boot; its other data lies behind the boot partition."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_boot_disk  # noqa: E402 (a script beside this one)

MiB = 1024 * 1024
BOOT_MIB = 64  # the bootable part at the start of demo-disk0
DISKS = {
    "demo-disk0.img": (256 * MiB + 12345, [(BOOT_MIB * MiB, 32 * MiB), (200 * MiB, 8 * MiB), (256 * MiB, 12345)]),
    "demo-disk1.img": (1024 * MiB + 511, [(64 * MiB, 4 * MiB), (700 * MiB + 3, 1 * MiB), (1024 * MiB - 1, 512)]),
}


def main(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, (size, ranges) in DISKS.items():
        path = directory / name
        if path.exists():
            continue
        if name == "demo-disk0.img":
            make_boot_disk.build_boot_disk(path, "DEMO", size_mib=BOOT_MIB)
        with open(path, "r+b" if path.exists() else "wb") as f:
            f.truncate(size)
            for offset, length in ranges:
                f.seek(offset)
                f.write(os.urandom(length))
        print(f"made {path} ({size} bytes)")


if __name__ == "__main__":
    main(Path(sys.argv[1]))

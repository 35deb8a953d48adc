"""Make the demo VM's two raw disks: odd sizes, one mostly data, one mostly holes."""

import os
import sys
from pathlib import Path

MiB = 1024 * 1024
DISKS = {
    "demo-disk0.img": (256 * MiB + 12345, [(0, 96 * MiB), (200 * MiB, 8 * MiB), (256 * MiB, 12345)]),
    "demo-disk1.img": (1024 * MiB + 511, [(64 * MiB, 4 * MiB), (700 * MiB + 3, 1 * MiB), (1024 * MiB - 1, 512)]),
}


def main(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, (size, ranges) in DISKS.items():
        path = directory / name
        if path.exists():
            continue
        with open(path, "wb") as f:
            f.truncate(size)
            for offset, length in ranges:
                f.seek(offset)
                f.write(os.urandom(length))
        print(f"made {path} ({size} bytes)")


if __name__ == "__main__":
    main(Path(sys.argv[1]))

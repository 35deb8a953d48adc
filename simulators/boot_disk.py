"""The bootable guest disk of the failover tests and benches:
scripts/make_boot_disk.py (a script, so loaded by path) as a module with
build_boot_disk(path, marker), set_marker(path, marker), read_marker(path)
and find_kernel()."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "make_boot_disk.py"


def boot_disk_builder():
    spec = importlib.util.spec_from_file_location("make_boot_disk", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

"""How long each boot probe takes to see the same guest boot, and what the
screen probe's OCR costs. A benchmark script, not a test.

The guest is scripts/make_boot_disk.py's: built twice from the same kernel
and initramfs, once printing on its serial console (for the console probe)
and once on its screen only (--screen-only, for the screen and network
probes); either asks for a DHCP lease right after printing its marker. Each
run boots a fresh VM (libvirt, TCG where KVM cannot run a guest) on an
isolated NAT network with DHCP (simulators.dhcp_network), and times
verify_boot with one probe, from the VM's start to the evidence. The
screen probe's OCR is timed per tesseract run: wall time and the process's
CPU time (user + system, from the children's rusage); screenshots that
repeat an image already read are not OCRed again (counted as skipped).

    .venv/bin/python -m bench.boot_probe_bench [--reps 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import setup_django
from simulators.boot_disk import boot_disk_builder
from simulators.dhcp_network import dhcp_network

REGEX = r"BOOT-MARKER: \w+"
TIMEOUT_S = 300


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="boot-probe-bench-"))
    os.environ["DATABASE_URL"] = f"sqlite:///{workdir / 'bench.sqlite3'}"
    os.environ["OMA_RUN_DIR"] = str(workdir / "run")
    setup_django()
    from replication.platforms.base import NIC, VMShape
    from replication.platforms.local import boot_probes
    from replication.platforms.local.libvirt import LibvirtDestination

    ocr_runs: list[tuple[float, float]] = []  # (wall s, CPU s) per tesseract run
    reads = {"screenshots": 0}
    real_ocr, real_read = boot_probes.ocr, boot_probes.ScreenReader.read

    def timed_ocr(image, work_dir):
        before, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
        text = real_ocr(image, work_dir)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        ocr_runs.append((time.perf_counter() - t0, (after.ru_utime - before.ru_utime)
                         + (after.ru_stime - before.ru_stime)))
        return text

    def counted_read(self):
        reads["screenshots"] += 1
        return real_read(self)

    boot_probes.ocr, boot_probes.ScreenReader.read = timed_ocr, counted_read
    builder = boot_disk_builder()
    disks = {"serial": workdir / "serial.img", "screen": workdir / "screen.img"}
    builder.build_boot_disk(disks["serial"], "BENCH")
    builder.build_boot_disk(disks["screen"], "BENCH", screen_only=True)
    dest = LibvirtDestination("qemu:///system", workdir / "run")
    plan = [("console", "serial"), ("screen", "screen"), ("network", "screen")]
    times: dict[str, list[float]] = {probe: [] for probe, _ in plan}
    try:
        with dhcp_network(prefix="oma-bench") as network:
            for rep in range(args.reps):
                for probe, disk in plan:
                    name = f"oma-bench-probe-{probe}"
                    dest.destroy(name)
                    handles = dest.protect([str(disks[disk])], f"{name}-{rep}")
                    try:
                        dest.define_vm(name, VMShape(cpus=1, memory_mib=256, nics=(NIC(mac="52:54:00:be:0b:01"),)),
                                       [(handles[0], "disk-2000")], network=network)
                        dest.start(name)
                        t0 = time.monotonic()
                        evidence = dest.verify_boot(name, [probe], REGEX, TIMEOUT_S, lambda: None)
                        times[probe].append(time.monotonic() - t0)
                        if not args.json:
                            print(f"run {rep + 1} {probe:8s} {times[probe][-1]:6.2f} s  {evidence.text}")
                    finally:
                        dest.destroy(name)
                        dest.discard_protection(handles)
    finally:
        dest.close()
        shutil.rmtree(workdir, ignore_errors=True)
    result = {
        "reps": args.reps,
        "verify_boot_median_s": {p: round(statistics.median(v), 2) for p, v in times.items()},
        "verify_boot_s": {p: [round(x, 2) for x in v] for p, v in times.items()},
        "ocr_runs": len(ocr_runs),
        "screenshots": reads["screenshots"],
        "ocr_wall_median_s": round(statistics.median(w for w, _ in ocr_runs), 3),
        "ocr_cpu_median_s": round(statistics.median(c for _, c in ocr_runs), 3),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print("boot verification, start to evidence (median of "
          f"{args.reps}): " + ", ".join(f"{p} {s} s" for p, s in result["verify_boot_median_s"].items()))
    print(f"OCR per check: {result['ocr_cpu_median_s']} s CPU ({result['ocr_wall_median_s']} s wall), median of "
          f"{result['ocr_runs']} tesseract runs for {result['screenshots']} screenshots "
          f"({result['screenshots'] - result['ocr_runs']} repeats not read again)")


if __name__ == "__main__":
    main()

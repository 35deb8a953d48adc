"""Benchmark the copy engine against nbdcopy and qemu-img on this machine.

Every case starts its own nbdkit source and target servers on Unix sockets
and runs each tool as a separate process, several times, in one run:

  dense      a dense source file (default 4 GiB), full copy
  sparse     nbdkit sparse-random (default 8 GiB, 10 % data), full copy
  incr-1%    1 % of an 8 GiB disk changed, in scattered 64 KiB..1 MiB areas
  incr-5%    5 % changed, the same way
  progress   the dense case with and without the progress bar

Full-copy targets live on tmpfs by default, so the page cache's writeback to
disk does not decide the ranking; pass --target-dir to put them on disk.

It prints, per case and tool, the median seconds, MB/s (disk size / s),
CPU seconds per GB of data (the copying process only, not the servers),
peak RSS, and the ratio of nbdcopy's time to the engine's (>1: engine faster).

    .venv/bin/python bench/copy_bench.py [--reps 3] [--scale 1.0] [--workdir /var/tmp/copy-bench]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GiB = 1 << 30
MiB = 1 << 20
PROJECT_ROOT = Path(__file__).resolve().parent.parent
ENGINE = [sys.executable, "-m", "vma_agent.copy"]


class Server:
    def __init__(self, sockdir: Path, name: str, *args: str):
        self.socket = sockdir / f"{name}.sock"
        self.proc = subprocess.Popen(["nbdkit", "--foreground", "--exit-with-parent", "--unix", str(self.socket),
                                      *args], stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not self.socket.exists():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"nbdkit {args} did not start")
            time.sleep(0.02)
        self.uri = f"nbd+unix:///?socket={self.socket}"

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


def timed(cmd: list[str]) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds, peak RSS in MiB) of one process."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - start
    out, err = proc.stdout.read(), proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {err.decode()[-500:]} {out.decode()[-500:]}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss // 1024


def fresh_target(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


def make_dense(path: Path, size: int) -> None:
    if path.exists() and path.stat().st_size == size:
        return
    rng = random.Random(1)
    block = rng.randbytes(8 * MiB)
    with open(path, "wb") as f:
        for offset in range(0, size, len(block)):
            # Vary each block so no tool can dedupe or detect zeros.
            f.write(offset.to_bytes(8, "little") + block[8:min(len(block), size - offset)])


def changed_areas(size: int, percent: float, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    target, areas, total = size * percent / 100, [], 0
    while total < target:
        length = rng.choice([64, 128, 256, 1024]) * 1024
        offset = rng.randrange(0, size - length) // 65536 * 65536
        areas.append((offset, length))
        total += length
    return areas


def tools(src: str, dst: str) -> dict[str, list[str]]:
    return {
        "engine": [*ENGINE, "--no-progress", src, dst],
        "nbdcopy": ["nbdcopy", src, dst],
        "qemu-img": ["qemu-img", "convert", "-n", "-W", "-m", "16", "-f", "raw", "-O", "raw", src, dst],
    }


def run_case(name, runs: dict[str, list[str]], reps: int, reset, data_bytes: int, disk_bytes: int) -> dict:
    samples = {tool: [] for tool in runs}
    for cmd in runs.values():  # one untimed run each: caches and allocations warm for everyone
        reset()
        timed(cmd)
    for _ in range(reps):
        for tool, cmd in runs.items():  # interleaved, so drift hits every tool alike
            reset()
            os.sync()  # no run pays for the previous one's dirty pages
            samples[tool].append(timed(cmd))
    rows = {}
    for tool, values in samples.items():
        wall = statistics.median(v[0] for v in values)
        cpu = statistics.median(v[1] for v in values)
        rows[tool] = {"seconds": round(wall, 3), "MB_s": round(disk_bytes / wall / 1e6, 1),
                      "cpu_s_per_GB": round(cpu / max(data_bytes / 1e9, 1e-9), 3),
                      "peak_rss_MiB": max(v[2] for v in values), "runs": [round(v[0], 3) for v in values]}
    print_case(name, rows)
    return rows


def print_case(name: str, rows: dict) -> None:
    reference = rows.get("nbdcopy") or rows.get("engine (full)")
    print(f"\n== {name}")
    print(f"  {'tool':<18} {'median s':>9} {'MB/s':>9} {'CPU s/GB':>9} {'RSS MiB':>8} {'ref/this':>9}  runs")
    for tool, row in rows.items():
        ratio = reference["seconds"] / row["seconds"] if reference else float("nan")
        print(f"  {tool:<18} {row['seconds']:>9.3f} {row['MB_s']:>9.1f} {row['cpu_s_per_GB']:>9.3f} "
              f"{row['peak_rss_MiB']:>8} {ratio:>9.2f}  {row['runs']}")
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every size (0.25 for a quick look)")
    parser.add_argument("--workdir", default="/var/tmp/copy-bench", help="where the source files live")
    parser.add_argument("--target-dir", default="/dev/shm/copy-bench",
                        help="where the full-copy targets live (tmpfs keeps disk writeback out of the comparison)")
    parser.add_argument("--cases", default="dense,sparse,incremental,progress")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args()
    cases = set(args.cases.split(","))
    workdir, target_dir = Path(args.workdir), Path(args.target_dir)
    workdir.mkdir(parents=True, exist_ok=True)
    target_dir.mkdir(parents=True, exist_ok=True)
    sockdir = Path(tempfile.mkdtemp(prefix="bench-"))
    dense_size = int(4 * GiB * args.scale) // MiB * MiB
    big_size = int(8 * GiB * args.scale) // MiB * MiB
    results = {}
    print(f"copy benchmark: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}, reps={args.reps}, "
          f"scale={args.scale}, sources in {workdir}, full-copy targets in {target_dir}")
    servers = []
    try:
        def serve(name, *a):
            servers.append(Server(sockdir, name, *a))
            return servers[-1]

        if cases & {"dense", "progress"}:
            src_file, dst_file = workdir / "dense-src.img", target_dir / "dense-dst.img"
            make_dense(src_file, dense_size)
            fresh_target(dst_file, dense_size)
            src = serve("dense-src", "--readonly", "file", str(src_file))
            dst = serve("dense-dst", "file", str(dst_file))
            reset = lambda: fresh_target(dst_file, dense_size)  # noqa: E731
            if "dense" in cases:
                results["dense"] = run_case(f"dense full copy, {dense_size / GiB:.1f} GiB", tools(src.uri, dst.uri),
                                            args.reps, reset, dense_size, dense_size)
            if "progress" in cases:
                runs = {"engine (no bar)": [*ENGINE, "--no-progress", src.uri, dst.uri],
                        "engine (progress)": [*ENGINE, src.uri, dst.uri]}
                results["progress"] = run_case("progress reporting cost (dense)", runs, args.reps, reset,
                                               dense_size, dense_size)

        if "sparse" in cases:
            dst_file = target_dir / "sparse-dst.img"
            fresh_target(dst_file, big_size)
            src = serve("sparse-src", "--readonly", "sparse-random", f"size={big_size}", "percent=10", "seed=7")
            dst = serve("sparse-dst", "file", str(dst_file))
            results["sparse"] = run_case(f"sparse full copy, {big_size / GiB:.1f} GiB with 10 % data",
                                         tools(src.uri, dst.uri), args.reps,
                                         lambda: fresh_target(dst_file, big_size), big_size // 10, big_size)

        if "incremental" in cases:
            dst_file = workdir / "incr-dst.img"
            fresh_target(dst_file, big_size)
            src = serve("incr-src", "--readonly", "pattern", f"size={big_size}")
            dst = serve("incr-dst", "file", str(dst_file))
            runs = {"engine (full)": [*ENGINE, "--no-progress", src.uri, dst.uri]}
            for percent in (1, 5):
                extents = workdir / f"extents-{percent}.json"
                areas = changed_areas(big_size, percent, seed=percent)
                extents.write_text(json.dumps(areas))
                runs[f"engine ({percent} % chg)"] = [*ENGINE, "--no-progress", "--extents", str(extents),
                                                   src.uri, dst.uri]
            results["incremental"] = run_case(f"incremental vs full, {big_size / GiB:.1f} GiB disk", runs,
                                              args.reps, lambda: None, big_size, big_size)
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(sockdir, ignore_errors=True)
        shutil.rmtree(target_dir, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

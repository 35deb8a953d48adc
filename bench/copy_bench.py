"""Benchmark the copy engine against nbdcopy on this machine, on the cases
that matter in production: targets on disk, slow (high-latency) sources.

Every case starts its own nbdkit source and target servers on Unix sockets
and runs each tool as a separate process, several times, interleaved in a
balanced order (each run starts after a sync, on a fresh target):

  file-disk      a page-cached 2 GiB file (nbdkit file) -> file on disk
  pattern-disk   nbdkit pattern 2 GiB -> file on disk, target pre-allocated
  pattern4-disk  nbdkit pattern 4 GiB -> file on disk
  delay1         nbdkit pattern 1 GiB, 1 ms per read (delay filter) -> file on disk
  delay3         768 MiB, 3 ms per read -> file on disk
  delay5         1 GiB, 5 ms per read -> file on disk
  sparse         nbdkit sparse-random 8 GiB with 10 % data -> file on disk
  lan1g          nbdkit pattern 512 MiB behind a 1 Gbit/s link (rate filter)
                 and 1 ms per read: ESXi's NBD transport over a gigabit LAN
  incr-delay5    5 ms per read, 4 GiB: full copy vs 1 % changed in scattered
                 64 KiB..1 MiB areas (an extent list)
  rss            peak RSS of the engine copying 1 GiB and 8 GiB (to nbdkit null)
  limit          a copy limited to 20 MiB/s, changed to 60 MiB/s mid-copy:
                 the rates before and after, from the progress samples

The engine flushes the target as it goes and at the end (its checkpoint
cursor only counts flushed data), so it is paired with nbdcopy twice: as
nbdcopy runs by default (no flush: the data may still be in the page cache
when it exits) and with --flush (durable, the engine's promise). A fourth
row, "disk alone (dd)", writes the case's data straight to the target file
with dd and fdatasync: the disk's own floor for a durable copy.

It prints, per case and tool, the median seconds, MB/s (disk size / s),
CPU seconds per GB of data (the copying process only, not the servers),
peak RSS, and nbdcopy's time / the tool's (ref/this; >1: faster than
nbdcopy), and nbdcopy --flush's time / the tool's (flush/this).

    .venv/bin/python -m bench.copy_bench [--reps 5] [--scale 1.0] [--cases delay5,sparse]
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

from bench.common import ROOT as PROJECT_ROOT

GiB = 1 << 30
MiB = 1 << 20

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


ENGINE_ARGS: list[str] = []  # --engine-args: try other settings against the same reference


def tools(src: str, dst: str, dst_file: Path, data_bytes: int) -> dict[str, list[str]]:
    return {
        "engine": [*ENGINE, "--no-progress", *ENGINE_ARGS, src, dst],
        "nbdcopy": ["nbdcopy", src, dst],
        "nbdcopy --flush": ["nbdcopy", "--flush", src, dst],
        # The disk's own floor: the case's data written straight to the
        # target file and made durable, no NBD at all.
        "disk alone (dd)": ["dd", "if=/dev/zero", f"of={dst_file}", "bs=1M", f"count={data_bytes // MiB}",
                            "conv=fdatasync,notrunc", "status=none"],
    }


def run_case(name, runs: dict[str, list[str]], reps: int, reset, data_bytes: int, disk_bytes: int) -> dict:
    samples = {tool: [] for tool in runs}
    for cmd in runs.values():  # one untimed run each: caches and allocations warm for everyone
        reset()
        timed(cmd)
    tools_in_order = list(runs.items())
    orders = balanced_orders(len(tools_in_order))
    for rep in range(reps):
        # Interleaved, so drift hits every tool alike, and in orders where
        # each tool follows each other tool equally often: whatever one run
        # leaves behind (a disk still busy with discards or writeback, a
        # source's rate bucket refilled while a run did not read it) falls
        # on every tool alike. A rotation of one order would not do: it
        # keeps every tool behind the same one.
        for position in orders[rep % len(orders)]:
            tool, cmd = tools_in_order[position]
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


def balanced_orders(n: int) -> list[list[int]]:
    """Orders of n tools in which each tool directly follows each other
    tool equally often (a Williams design: n orders for an even n, 2n for
    an odd one)."""
    first, low, high = [0], 1, n - 1
    while len(first) < n:
        first.append(low)
        low += 1
        if len(first) < n:
            first.append(high)
            high -= 1
    orders = [[(tool + shift) % n for tool in first] for shift in range(n)]
    return orders if n % 2 == 0 else orders + [order[::-1] for order in orders]


def print_case(name: str, rows: dict) -> None:
    reference = rows.get("nbdcopy") or rows.get("engine (full)") or next(iter(rows.values()))
    durable = rows.get("nbdcopy --flush")
    print(f"\n== {name}")
    print(f"  {'tool':<18} {'median s':>9} {'MB/s':>9} {'CPU s/GB':>9} {'RSS MiB':>8} {'ref/this':>9}"
          + (f" {'flush/this':>10}" if durable else "") + "  runs")
    for tool, row in rows.items():
        ratio = reference["seconds"] / row["seconds"]
        print(f"  {tool:<18} {row['seconds']:>9.3f} {row['MB_s']:>9.1f} {row['cpu_s_per_GB']:>9.3f} "
              f"{row['peak_rss_MiB']:>8} {ratio:>9.2f}"
              + (f" {durable['seconds'] / row['seconds']:>10.2f}" if durable else "") + f"  {row['runs']}")
    sys.stdout.flush()


def preallocate(path: Path, size: int) -> None:
    fresh_target(path, size)
    subprocess.run(["fallocate", "-l", str(size), str(path)], check=True)


def live_limit(sockdir: Path, workdir: Path) -> dict:
    """An in-process copy at 20 MiB/s whose limit is raised to 60 MiB/s
    halfway through: the rate from the progress samples on each side."""
    from vma_agent.copy import RateLimit, copy_image

    size = 1 * GiB
    dst_file = workdir / "limit-dst.img"
    fresh_target(dst_file, size)
    src, dst = Server(sockdir, "limit-src", "--readonly", "pattern", f"size={size}"), None
    try:
        dst = Server(sockdir, "limit-dst", "file", str(dst_file))
        limit = RateLimit(20 * MiB)
        samples, changed_at = [], {}

        def progress(p):
            samples.append((time.monotonic(), p.bytes_done))
            if p.elapsed_s >= 10 and not changed_at:
                limit.set(60 * MiB)
                changed_at["t"] = time.monotonic()

        cancel = __import__("threading").Event()

        def stop_later(p):
            progress(p)
            if changed_at and time.monotonic() - changed_at["t"] >= 10:
                cancel.set()

        try:
            copy_image(src.uri, dst.uri, limit=limit, progress=stop_later, progress_interval_s=0.5, cancel=cancel)
        except Exception as exc:  # noqa: BLE001 - the bench cancels it on purpose
            if type(exc).__name__ != "CopyCancelled":
                raise
    finally:
        src.stop()
        if dst:
            dst.stop()
    t0 = changed_at["t"]

    def rate(points):
        (ta, ba), (tb, bb) = points[0], points[-1]
        return (bb - ba) / (tb - ta) / MiB

    before = [p for p in samples if t0 - 8 <= p[0] <= t0]
    after = [p for p in samples if t0 + 2 <= p[0]]  # the first samples after the change still average the old rate
    row = {"before_MiB_s": round(rate(before), 1), "after_MiB_s": round(rate(after), 1), "samples": len(samples)}
    print(f"\n== live limit: 20 MiB/s raised to 60 MiB/s mid-copy\n  measured from progress samples: "
          f"{row['before_MiB_s']} MiB/s before, {row['after_MiB_s']} MiB/s after ({row['samples']} samples)")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every size (0.25 for a quick look)")
    parser.add_argument("--workdir", default="/var/tmp/copy-bench", help="where sources and targets live (on disk)")
    parser.add_argument("--cases", default="file-disk,pattern-disk,pattern4-disk,delay1,delay3,delay5,sparse,"
                                           "lan1g,incr-delay5,rss,limit")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument("--engine-args", default="", help='extra engine options, e.g. "--connections 2 --depth 16"')
    args = parser.parse_args()
    ENGINE_ARGS.extend(args.engine_args.split())
    cases = args.cases.split(",")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    sockdir = Path(tempfile.mkdtemp(prefix="bench-"))

    def sized(gib: float) -> int:
        return int(gib * GiB * args.scale) // MiB * MiB

    # The engine runs byte-compiled, as installed (pip compiles what it
    # installs); without this a shell with PYTHONDONTWRITEBYTECODE would
    # compile it again on every run.
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(PROJECT_ROOT / "vma_agent")], check=True)
    results = {}
    print(f"copy benchmark: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}, reps={args.reps}, "
          f"engine options [{args.engine_args}], scale={args.scale}, "
          f"sources and targets in {workdir} ({filesystem(workdir)})")
    servers = []

    def serve(name, *a):
        servers.append(Server(sockdir, name, *a))
        return servers[-1]

    def full_copy(case: str, title: str, source_args: list[str], size: int, data: int | None = None,
                  prepare=fresh_target) -> None:
        dst_file = workdir / f"{case}-dst.img"
        prepare(dst_file, size)
        src = serve(f"{case}-src", "--readonly", *source_args)
        dst = serve(f"{case}-dst", "file", str(dst_file))
        results[case] = run_case(title, tools(src.uri, dst.uri, dst_file, data or size), args.reps,
                                 lambda: prepare(dst_file, size), data or size, size)

    try:
        for case in cases:
            if case == "file-disk":
                size = sized(2)
                src_file = workdir / "dense-src.img"
                make_dense(src_file, size)
                full_copy(case, f"page-cached {iec(size)} file -> file on disk", ["file", str(src_file)], size)
            elif case == "pattern-disk":
                size = sized(2)
                full_copy(case, f"nbdkit pattern {iec(size)} -> pre-allocated file on disk",
                          ["pattern", f"size={size}"], size, prepare=preallocate)
            elif case == "pattern4-disk":
                size = sized(4)
                full_copy(case, f"nbdkit pattern {iec(size)} -> file on disk", ["pattern", f"size={size}"], size)
            elif case.startswith("delay") and case[5:].isdigit():
                ms = int(case[5:])
                size = sized({1: 1, 3: 0.75, 5: 1}.get(ms, 1))
                full_copy(case, f"nbdkit pattern {iec(size)}, {ms} ms per read -> file on disk",
                          ["--filter=delay", "pattern", f"size={size}", f"rdelay={ms}ms"], size)
            elif case == "sparse":
                size = sized(8)
                full_copy(case, f"sparse-random {iec(size)} with 10 % data -> file on disk",
                          ["sparse-random", f"size={size}", "percent=10", "seed=7"], size, data=size // 10)
            elif case == "lan1g":
                size = sized(0.5)
                full_copy(case, f"nbdkit pattern {iec(size)}, 1 Gbit/s and 1 ms per read -> file on disk",
                          # A link has no credit to burst with after a pause: the
                          # filter's default would let whichever tool follows an
                          # idle moment read its first 2 s at any speed.
                          ["--filter=rate", "--filter=delay", "pattern", f"size={size}", "rate=1G",
                           "burstiness=0.2", "rdelay=1ms"],
                          size)
            elif case == "incr-delay5":
                size = sized(4)
                dst_file = workdir / "incr-dst.img"
                fresh_target(dst_file, size)
                src = serve("incr-src", "--readonly", "--filter=delay", "pattern", f"size={size}", "rdelay=5ms")
                dst = serve("incr-dst", "file", str(dst_file))
                extents = workdir / "extents-1.json"
                extents.write_text(json.dumps(changed_areas(size, 1, seed=1)))
                runs = {"engine (full)": [*ENGINE, "--no-progress", src.uri, dst.uri],
                        "engine (1 % chg)": [*ENGINE, "--no-progress", "--extents", str(extents), src.uri, dst.uri]}
                results[case] = run_case(f"incremental vs full over a 5 ms source, {iec(size)} disk", runs,
                                         args.reps, lambda: None, size, size)
            elif case == "rss":
                results[case] = {}
                for gib in (1, 8):
                    size = sized(gib)
                    src = serve(f"rss-src-{gib}", "--readonly", "pattern", f"size={size}")
                    dst = serve(f"rss-dst-{gib}", "null", f"size={size}")
                    results[case][iec(size)] = run_case(
                        f"peak RSS, {iec(size)} (pattern -> null)",
                        {f"engine {iec(size)}": [*ENGINE, "--no-progress", src.uri, dst.uri]},
                        args.reps, lambda: None, size, size)
            elif case == "limit":
                results[case] = live_limit(sockdir, workdir)
            else:
                parser.error(f"unknown case {case}")
            for server in servers:
                server.stop()
            servers.clear()
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(sockdir, ignore_errors=True)
        for leftover in workdir.glob("*-dst.img"):
            leftover.unlink()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def filesystem(path: Path) -> str:
    out = subprocess.run(["df", "--output=fstype,source", str(path)], capture_output=True, text=True).stdout
    return " on ".join(out.splitlines()[-1].split())


def iec(n: float) -> str:
    return f"{n / GiB:g} GiB" if n >= GiB else f"{n / MiB:g} MiB"


if __name__ == "__main__":
    main()

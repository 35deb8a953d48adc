"""What journaling costs a copy: the copy engine writing a cycle's layer (a
qcow2 file over the volume's raw file, served by qemu-nbd as the local
provider serves it) against writing the raw volume file through `nbdkit
file` as a cycle without a journal does. The same source for both: a file
of random data behind nbdkit's delay filter (each read the given
milliseconds late, as an ESXi NBD transport answers).

Two cases: a full copy of the disk, and an incremental (a share of the disk
changed in scattered extents of 64 KiB to 1 MiB, only they copied, the
engine given the list). A layer is fresh for every run; the raw file is
fresh (sparse) for every full copy and overwritten in place by every
incremental. Variants run in rotating order; the script prints the median
and the spread of the wall seconds, the CPU seconds of the copying process
and of the target's server, the layer/raw ratio of the medians, and the
layer's size beside the data it holds.

    .venv/bin/python -m bench.journal_bench [--size-mib 768] [--delay-ms 3] [--reps 5] [--changed-pct 10]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import tempfile
import time
import types
from pathlib import Path

from bench.common import ROOT
from replication.platforms.local import journal
from replication.platforms.local.volumes import LocalVolumeProvider
from vma_agent.copy import copy_image

MiB = 1 << 20
EXPORT = "migration-vol-00000000-0000-0000-0000-0000000000be"
# qemu-nbd's I/O settings compared, beside the provider's default.
def _serve(cache: str, aio: str) -> list[str]:
    return [f"--cache={cache}", f"--aio={aio}", "--discard=unmap", "--detect-zeroes=off"]


# (qemu-img create -o, qemu-nbd's I/O settings) compared, the provider's first.
LAYER_VARIANTS = {
    "layer (the provider's settings)": (journal.LAYER_OPTIONS, journal.SERVE_OPTIONS),
    "layer 64K clusters, writeback threads": ("cluster_size=65536", _serve("writeback", "threads")),
    "layer 64K clusters, writeback io_uring": ("cluster_size=65536", _serve("writeback", "io_uring")),
    "layer 64K clusters, none native": ("cluster_size=65536", _serve("none", "native")),
    "layer 2M clusters+subclusters, writeback io_uring": ("cluster_size=2M,extended_l2=on",
                                                          _serve("writeback", "io_uring")),
    "layer 2M clusters+subclusters, none native": ("cluster_size=2M,extended_l2=on", _serve("none", "native")),
    "layer 1M clusters, none native": ("cluster_size=1M", _serve("none", "native")),
    "layer 512K clusters+subclusters, none native": ("cluster_size=512K,extended_l2=on", _serve("none", "native")),
    "layer 256K clusters+subclusters, none native": ("cluster_size=256K,extended_l2=on", _serve("none", "native")),
}


VARIANTS: list[str] = []


def server_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(run, server_pid: int) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds of this process, CPU seconds of the server."""
    server, wall, cpu = server_cpu(server_pid), time.monotonic(), time.process_time()
    run()
    return time.monotonic() - wall, time.process_time() - cpu, server_cpu(server_pid) - server


def changed_extents(size: int, pct: float, seed: int = 28) -> list[tuple[int, int]]:
    """Scattered extents of 64 KiB to 1 MiB, 64 KiB aligned, about pct % of the disk."""
    rng, want, taken = random.Random(seed), size * pct / 100, set()
    extents, total = [], 0
    while total < want:
        length = rng.randrange(1, 17) * 64 * 1024
        offset = rng.randrange(0, (size - length) // (64 * 1024)) * 64 * 1024
        blocks = set(range(offset // (64 * 1024), (offset + length) // (64 * 1024)))
        if blocks & taken:
            continue
        taken |= blocks
        extents.append((offset, length))
        total += length
    return sorted(extents)


class Bench:
    def __init__(self, work: Path, sockdir: Path, src_uri: str, size: int):
        self.provider = LocalVolumeProvider(work / "volumes", sockdir)
        self.vol = types.SimpleNamespace(export_name=EXPORT, size_bytes=size)
        self.src_uri, self.size, self.runs = src_uri, size, 0
        self.layer_bytes: dict[str, list[int]] = {}
        self.provider.create_volume(EXPORT, size)

    @property
    def raw(self) -> Path:
        return self.provider.volume_path(EXPORT)

    def onto_raw(self, extents, fresh: bool):
        if fresh:
            self.raw.unlink(missing_ok=True)
            self.provider.create_volume(EXPORT, self.size)
        os.sync()
        uri = self.provider.open_layer(self.vol, "first", None)  # in place, through nbdkit
        pid = int(self.provider.pidfile.read_text())
        return timed(lambda: copy_image(self.src_uri, uri, extents=extents, target_is_zeroed=fresh), pid)

    def into_layer(self, name, extents, options):
        self.runs += 1
        journal.LAYER_OPTIONS, journal.SERVE_OPTIONS = options
        cycle = f"c{self.runs}"
        os.sync()
        uri = self.provider.open_layer(self.vol, cycle, str(self.raw))
        layer = self.provider.journal.layer_path(EXPORT, cycle)
        pid = self.provider.journal.server_pids(layer)[0]
        result = timed(lambda: copy_image(self.src_uri, uri, extents=extents), pid)
        handle = self.provider.seal_layer(self.vol, cycle, str(self.raw))
        self.layer_bytes.setdefault(name, []).append(self.provider.layer_bytes(handle))
        self.provider.drop_layer(handle)
        return result


def run_case(bench: Bench, reps: int, extents, full: bool) -> dict[str, list[tuple[float, float, float]]]:
    variants = {"raw file, nbdkit file (no journal)": lambda: bench.onto_raw(extents, fresh=full)}
    for name, options in LAYER_VARIANTS.items():
        if VARIANTS and not any(word in name for word in VARIANTS):
            continue
        variants[name] = lambda name=name, options=options: bench.into_layer(name, extents, options)
    results: dict[str, list] = {name: [] for name in variants}
    names = list(variants)
    for rep in range(reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            results[name].append(variants[name]())
    return results


def report(title: str, results, data_bytes: int) -> None:
    print(f"\n{title}")
    print(f"{'variant':55} {'median s':>9} {'min-max s':>13} {'MB/s':>7} {'CPU s':>6} {'server CPU s':>12} "
          f"{'x raw':>6}")
    raw = statistics.median(w for w, _, _ in next(iter(results.values())))
    for name, runs in results.items():
        walls = [w for w, _, _ in runs]
        median = statistics.median(walls)
        print(f"{name:55} {median:9.2f} {min(walls):6.2f}-{max(walls):<6.2f} {data_bytes / median / 1e6:7.0f} "
              f"{statistics.median(c for _, c, _ in runs):6.2f} {statistics.median(s for _, _, s in runs):12.2f} "
              f"{raw / median:6.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=768)
    parser.add_argument("--delay-ms", type=float, default=3.0)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--changed-pct", type=float, default=10.0)
    parser.add_argument("--dir", type=Path, default=ROOT / "var" / "journal-bench",
                        help="where the volume and its layers live: a directory on disk, not tmpfs")
    parser.add_argument("--variants", default="", help="comma-separated words: only layer variants naming one")
    args = parser.parse_args()
    VARIANTS.extend(word for word in args.variants.split(",") if word)
    size = args.size_mib * MiB
    args.dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=args.dir))
    sockdir = Path(tempfile.mkdtemp(prefix="jb", dir="/tmp"))
    source = work / "source.img"
    with open(source, "wb") as f:
        for _ in range(args.size_mib):
            f.write(os.urandom(MiB))
    extents = changed_extents(size, args.changed_pct)
    changed = sum(length for _, length in extents)
    from vma_agent.nbdkit import serve_readonly
    try:
        with serve_readonly(lambda sock: ["nbdkit", "--foreground", "--exit-with-parent", "--readonly", "--unix",
                                          str(sock), "--filter=delay", "file", f"file={source}",
                                          f"rdelay={args.delay_ms}ms"]) as src_uri:
            bench = Bench(work, sockdir, src_uri, size)
            full = run_case(bench, args.reps, None, full=True)
            full_layers = dict(bench.layer_bytes)
            bench.layer_bytes.clear()
            incremental = run_case(bench, args.reps, extents, full=False)
            bench.provider.stop_export_server()
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(sockdir, ignore_errors=True)
    print(f"{args.size_mib} MiB disk of random data; source {args.delay_ms:g} ms per read (nbdkit delay); target "
          f"files on disk under {args.dir}; {args.reps} runs each, in rotating order; the copy engine's defaults")
    report("full copy", full, size)
    for name, sizes in full_layers.items():
        print(f"  {name}: layer size after a full copy {statistics.median(sizes) / MiB:.1f} MiB")
    report(f"incremental: {len(extents)} extents, {changed / MiB:.1f} MiB ({args.changed_pct:g} %) changed",
           incremental, changed)
    for name, sizes in bench.layer_bytes.items():
        print(f"  {name}: layer size median {statistics.median(sizes) / MiB:.1f} MiB for {changed / MiB:.1f} MiB "
              f"changed ({statistics.median(sizes) / changed:.3f}x)")


if __name__ == "__main__":
    main()

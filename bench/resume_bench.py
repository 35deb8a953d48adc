"""What a resumed copy costs: a copy cut off at half a disk resumes from its
cursor, first comparing the data below it with the source
(COPY_COMPARE_RESUMED, on by default) or not; beside it, the same
comparison one read at a time (the first version of it) and nbdcopy
--flush copying the whole disk again (what a run without a cursor costs).

A slow source (nbdkit's delay filter on a file, each read waiting the given
milliseconds, as an ESXi NBD transport does) and a target file on disk
(reset from a template and synced before every run). Runs alternate between
the variants; the script prints the median and the spread of the seconds,
and the CPU seconds of the copying process.

    .venv/bin/python -m bench.resume_bench [--size-mib 1024] [--delay-ms 3] [--reps 5]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from bench.common import ROOT as PROJECT_ROOT
from vma_agent.copy import copy_image

MiB = 1 << 20


def serve(sockdir: Path, name: str, *args: str) -> tuple[subprocess.Popen, str]:
    socket = sockdir / f"{name}.sock"
    proc = subprocess.Popen(["nbdkit", "-f", "-U", str(socket), *args])
    deadline = time.monotonic() + 10
    while not socket.exists():
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit(f"nbdkit {name} did not start")
        time.sleep(0.01)
    return proc, f"nbd+unix:///?socket={socket}"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MiB):
            digest.update(chunk)
    return digest.hexdigest()


def reset_target(template: Path, target: Path) -> None:
    shutil.copyfile(template, target)
    with open(target, "rb+") as f:
        os.fsync(f.fileno())


def in_process(run) -> tuple[float, float]:
    wall, cpu = time.monotonic(), time.process_time()
    run()
    return time.monotonic() - wall, time.process_time() - cpu


def nbdcopy_flush(src: str, dst: str) -> tuple[float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = time.monotonic()
    subprocess.run(["nbdcopy", "--flush", src, dst], check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.monotonic() - wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--delay-ms", type=float, default=3.0)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=PROJECT_ROOT / "var" / "resume-bench",
                        help="where the target lives: a directory on disk, not tmpfs")
    args = parser.parse_args()
    size, cursor = args.size_mib * MiB, args.size_mib * MiB // 2
    args.dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=args.dir))
    sockdir = Path(tempfile.mkdtemp(prefix="rb", dir="/tmp"))
    source, template, target = work / "source.img", work / "template.img", work / "target.img"
    with open(source, "wb") as f:
        for _ in range(args.size_mib):
            f.write(os.urandom(MiB))
    # What the cut-off run left: the first half copied and flushed, the rest not yet.
    with open(source, "rb") as src, open(template, "wb") as out:
        out.write(src.read(cursor))
        out.truncate(size)
    reset_target(template, target)
    source_sha = sha256(source)
    servers = []
    try:
        proc, src_uri = serve(sockdir, "src", "--readonly", "--filter=delay", "file", str(source),
                              f"rdelay={args.delay_ms}ms")
        servers.append(proc)
        proc, dst_uri = serve(sockdir, "dst", "file", str(target))
        servers.append(proc)
        variants = {
            "resume, compare below the cursor (default)": lambda: in_process(
                lambda: copy_image(src_uri, dst_uri, resume_from=cursor, compare_resumed=True)),
            "resume, compare one read at a time": lambda: in_process(
                lambda: copy_image(src_uri, dst_uri, resume_from=cursor, compare_resumed=True, depth=1)),
            "resume, no compare": lambda: in_process(
                lambda: copy_image(src_uri, dst_uri, resume_from=cursor, compare_resumed=False)),
            "nbdcopy --flush, the whole disk again": lambda: nbdcopy_flush(src_uri, dst_uri),
        }
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
        names = list(variants)
        for rep in range(args.reps):
            for name in names[rep % len(names):] + names[:rep % len(names)]:
                reset_target(template, target)
                results[name].append(variants[name]())
                if shutil.disk_usage(work).free < size:
                    raise SystemExit("the disk is nearly full")
                if sha256(target) != source_sha:
                    raise SystemExit(f"{name}: the target differs from the source")
    finally:
        for proc in servers:
            proc.terminate()
            proc.wait()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(sockdir, ignore_errors=True)
    print(f"{args.size_mib} MiB disk of random data, cut off at {cursor // MiB} MiB; source {args.delay_ms:g} ms "
          f"per read; target a file on disk; {args.reps} runs each, in rotating order")
    print(f"{'variant':45} {'median s':>9} {'min-max s':>13} {'CPU s':>7}")
    for name, runs in results.items():
        walls = [wall for wall, _ in runs]
        cpus = [cpu for _, cpu in runs]
        print(f"{name:45} {statistics.median(walls):9.2f} {min(walls):6.2f}-{max(walls):<6.2f} "
              f"{statistics.median(cpus):7.2f}")


if __name__ == "__main__":
    main()

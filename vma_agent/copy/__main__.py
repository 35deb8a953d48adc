"""python -m vma_agent.copy SRC_URI DST_URI [options]: copy one disk over NBD
with a progress bar on the terminal, then print one JSON line of figures."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading

from vma_agent.copy import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_CONNECTIONS,
    DEFAULT_DEPTH,
    CopyCancelled,
    CopyError,
    RateLimit,
    copy_image,
    dirty_areas,
)
from vma_agent.units import iec, iec_rate


def read_extents_file(path: str) -> list[tuple[int, int]]:
    """A JSON list of [offset, length] pairs, or lines of "offset length"."""
    with open(path) as f:
        text = f.read()
    try:
        if text.lstrip().startswith("["):
            pairs = json.loads(text)
        else:
            pairs = [line.split() for line in text.splitlines() if line.strip() and not line.startswith("#")]
        return [(int(offset), int(length)) for offset, length in pairs]
    except (ValueError, TypeError) as exc:
        raise CopyError(f"{path}: expected [offset, length] pairs: {exc}") from exc


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m vma_agent.copy", description=__doc__)
    parser.add_argument("src_uri")
    parser.add_argument("dst_uri")
    changed = parser.add_mutually_exclusive_group()
    changed.add_argument("--extents", metavar="FILE", help="copy only these areas ([offset, length] pairs)")
    changed.add_argument("--dirty-bitmap", metavar="NAME", help="copy only areas dirty in this qemu bitmap of SRC")
    parser.add_argument("--resume-from", type=int, default=0, metavar="OFFSET",
                        help="continue a copy from its committed cursor")
    parser.add_argument("--limit", type=float, default=None, metavar="BYTES_PER_S", help="bandwidth limit")
    parser.add_argument("--verify", action="store_true", help="read back and compare what was copied")
    parser.add_argument("--target-is-zeroed", action="store_true", help="the target is fresh: skip zero extents")
    parser.add_argument("--chunk", type=int, default=DEFAULT_CHUNK_BYTES, help="request size in bytes")
    parser.add_argument("--connections", type=int, default=DEFAULT_CONNECTIONS, help="connections to the source")
    parser.add_argument("--target-connections", type=int, default=None,
                        help="connections to the target (default: as many as to the source)")
    parser.add_argument("--depth", type=int, default=DEFAULT_DEPTH, help="requests in flight per pipeline")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


# Sizes in IEC units (MiB, GiB), as everywhere: tqdm's own labels are SI. The
# text rides in tqdm's free-form {unit} field (its {postfix} starts with ", ").
BAR_FORMAT = "{desc} {percentage:5.1f}%|{bar}| {unit}"


def progress_text(progress) -> str:
    rate = progress.bytes_done / progress.elapsed_s if progress.elapsed_s > 0 else 0
    return f"{iec(progress.bytes_done)} of {iec(progress.bytes_total)} at {iec_rate(rate)}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cancel = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: cancel.set())
    signal.signal(signal.SIGTERM, lambda *_: cancel.set())
    bar = None
    if not args.no_progress:
        from tqdm import tqdm  # only for the bar

        bar = tqdm(desc="copy", file=sys.stderr, disable=None, bar_format=BAR_FORMAT)

    def show(progress):
        if bar is not None:
            bar.total = progress.bytes_total
            bar.n = progress.bytes_done
            bar.unit = progress_text(progress)
            bar.refresh()

    cursor = {"offset": args.resume_from}
    try:
        extents = None
        if args.extents:
            extents = read_extents_file(args.extents)
        elif args.dirty_bitmap:
            extents = dirty_areas(args.src_uri, args.dirty_bitmap)
        result = copy_image(
            args.src_uri, args.dst_uri, extents=extents, resume_from=args.resume_from,
            chunk_bytes=args.chunk, connections=args.connections,
            target_connections=args.target_connections, depth=args.depth, limit=RateLimit(args.limit),
            verify=args.verify, target_is_zeroed=args.target_is_zeroed, progress=show, progress_interval_s=0.5,
            checkpoint=lambda offset: cursor.update(offset=offset), cancel=cancel,
        )
    except CopyCancelled as exc:
        print(json.dumps({"status": "cancelled", "resume_from": exc.cursor}))
        return 130
    except CopyError as exc:
        print(json.dumps({"status": "failed", "error": str(exc), "resume_from": cursor["offset"]}))
        print(f"copy failed: {exc}", file=sys.stderr)
        return 1
    finally:
        if bar is not None:
            bar.close()
    print(json.dumps({"status": "completed", **result.as_dict()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The copy engine: copy an NBD source export to an NBD target export with
libnbd, reading only allocated data and turning zero extents into zero
requests on the target."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import nbd

from vma_agent.progress import ProgressCallback, ThrottledReporter

DEFAULT_CHUNK_BYTES = 4 * 1024 * 1024
# block_status asks about at most this much at once (its count is 32-bit).
EXTENT_QUERY_BYTES = 1 << 30
STATE_ZERO = 2  # base:allocation flag: the range reads as zeros


class CopyError(RuntimeError):
    """A copy failed; the message names the offset, length and server error."""


@dataclass(frozen=True)
class Extent:
    offset: int
    length: int
    zero: bool


@dataclass
class CopyResult:
    size: int
    bytes_allocated: int = 0  # source data to copy: what progress counts
    bytes_copied: int = 0  # data written to the target
    bytes_zeroed: int = 0  # written as zero requests (zero extents or all-zero data)
    bytes_skipped: int = 0  # not touched at all
    seconds: float = 0.0

    @property
    def throughput_bps(self) -> int:
        """Source data per second, the rate progress is measured in."""
        return int(self.bytes_allocated / self.seconds) if self.seconds > 0 else 0

    def as_dict(self) -> dict:
        return {**asdict(self), "throughput_bps": self.throughput_bps}


def open_export(uri: str, *, want_extents: bool = False) -> nbd.NBD:
    handle = nbd.NBD()
    if want_extents:
        handle.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    try:
        handle.connect_uri(uri)
    except nbd.Error as exc:
        raise CopyError(f"cannot connect to {uri}: {exc.string}") from exc
    return handle


def export_size(uri: str) -> int:
    handle = open_export(uri)
    try:
        return handle.get_size()
    finally:
        handle.shutdown()


def read_extents(handle: nbd.NBD, size: int) -> list[Extent]:
    """The source's allocation map, adjacent extents of one kind merged.
    A server without base:allocation yields one data extent."""
    if not handle.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION):
        return [Extent(0, size, False)] if size else []
    extents: list[Extent] = []

    def collect(metacontext, offset, entries, err):
        if metacontext != nbd.CONTEXT_BASE_ALLOCATION:
            return 0
        pos = offset
        for i in range(0, len(entries), 2):
            length, flags = entries[i], entries[i + 1]
            length = min(length, size - pos)
            if length <= 0:
                break
            zero = bool(flags & STATE_ZERO)
            if extents and extents[-1].zero == zero and extents[-1].offset + extents[-1].length == pos:
                last = extents.pop()
                extents.append(Extent(last.offset, last.length + length, zero))
            else:
                extents.append(Extent(pos, length, zero))
            pos += length
        return 0

    offset = 0
    while offset < size:
        count = min(EXTENT_QUERY_BYTES, size - offset)
        try:
            handle.block_status(count, offset, collect)
        except nbd.Error as exc:
            raise CopyError(f"block status failed at offset {offset} length {count}: {exc.string}") from exc
        covered = extents[-1].offset + extents[-1].length if extents else offset
        if covered <= offset:
            raise CopyError(f"source returned no extents at offset {offset}")
        offset = covered
    return extents


def copy_image(src_uri: str, dst_uri: str, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
               progress: ProgressCallback | None = None,
               progress_interval_s: float = 2.0) -> CopyResult:
    """Copy the whole source export onto the target export.

    Progress counts the bytes of allocated (non-zero) source extents, so 100 %
    means all data to copy has been written. The callback may raise to cancel
    the copy; the exception propagates after the target connection closes."""
    started = time.monotonic()
    src = open_export(src_uri, want_extents=True)
    dst = None
    try:
        dst = open_export(dst_uri)
        size, dst_size = src.get_size(), dst.get_size()
        if dst_size != size:
            raise CopyError(f"target is {dst_size} bytes but the source is {size} bytes; refusing to copy")
        if dst.is_read_only():
            raise CopyError(f"target {dst_uri} is read-only")
        extents = read_extents(src, size)
        data_total = sum(e.length for e in extents if not e.zero)
        reporter = ThrottledReporter(progress, data_total, progress_interval_s)
        reporter.update(0, final=True)
        result = CopyResult(size=size, bytes_allocated=data_total)
        zero_chunk = bytes(chunk_bytes)
        done = 0
        for extent in extents:
            if extent.zero:
                _zero(dst, extent.offset, extent.length, result)
                continue
            end = extent.offset + extent.length
            for offset in range(extent.offset, end, chunk_bytes):
                length = min(chunk_bytes, end - offset)
                try:
                    data = src.pread(length, offset)
                except nbd.Error as exc:
                    raise CopyError(f"read failed at offset {offset} length {length}: {exc.string}") from exc
                if data == zero_chunk[:length]:
                    _zero(dst, offset, length, result)
                else:
                    try:
                        dst.pwrite(data, offset)
                    except nbd.Error as exc:
                        raise CopyError(f"write failed at offset {offset} length {length}: {exc.string}") from exc
                    result.bytes_copied += length
                done += length
                reporter.update(done)
        if dst.can_flush():
            try:
                dst.flush()
            except nbd.Error as exc:
                raise CopyError(f"flush of the target failed: {exc.string}") from exc
        result.seconds = time.monotonic() - started
        reporter.update(done, final=True)
        return result
    finally:
        _close(src)
        if dst is not None:
            _close(dst)


def _close(handle: nbd.NBD) -> None:
    try:
        handle.shutdown()
    except nbd.Error:
        pass  # the connection is already gone; the copy's own error says why


def _zero(dst: nbd.NBD, offset: int, length: int, result: CopyResult) -> None:
    # A zero request covers at most 4 GiB - 1 on the wire; a target without
    # zero support gets explicit zero data, one chunk at a time.
    step = (1 << 30) if dst.can_zero() else DEFAULT_CHUNK_BYTES
    pos, end = offset, offset + length
    while pos < end:
        count = min(end - pos, step)
        try:
            if dst.can_zero():
                dst.zero(count, pos)
            else:
                dst.pwrite(bytes(count), pos)
        except nbd.Error as exc:
            raise CopyError(f"zeroing failed at offset {pos} length {count}: {exc.string}") from exc
        pos += count
    result.bytes_zeroed += length

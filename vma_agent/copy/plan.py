"""What a copy copies: the source's allocation, changed areas (a list, or a
qemu dirty bitmap), and their split into requests."""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Iterable, Iterator

import nbd

from vma_agent.copy.connection import CopyError, close, connect

ZERO_REQUEST_BYTES = 1 << 30  # a zero request's length is 32-bit on the wire
EXTENT_QUERY_BYTES = 1 << 30
STATE_HOLE, STATE_ZERO = 1, 2  # base:allocation flags
STATE_DIRTY = 1  # qemu:dirty-bitmap flag


class Extent(namedtuple("Extent", "offset length zero", defaults=(False,))):
    """An area of the disk: data, or zeros (zero=True). A named tuple, not a
    dataclass: one is made per request, and dataclasses alone cost the CLI
    7 ms of start-up."""

    __slots__ = ()

    @property
    def end(self) -> int:
        return self.offset + self.length


def _walk_block_status(handle: nbd.NBD, context: str, start: int, end: int, on_entry) -> None:
    """Call on_entry(offset, length, flags) for every extent in [start, end)."""
    position = start

    def collect(metacontext, offset, entries, err):
        nonlocal position
        if metacontext != context:
            return 0
        pos = offset
        for i in range(0, len(entries), 2):
            length = min(entries[i], end - pos)
            if length <= 0:
                break
            on_entry(pos, length, entries[i + 1])
            pos += length
        position = max(position, pos)
        return 0

    while position < end:
        count = min(EXTENT_QUERY_BYTES, end - position)
        before = position
        try:
            handle.block_status(count, position, collect)
        except nbd.Error as exc:
            raise CopyError(f"block status failed at offset {position} length {count}: {exc.string}") from exc
        if position <= before:
            raise CopyError(f"server returned no extents at offset {before}")


def allocation_map(handle: nbd.NBD, size: int, start: int = 0) -> list[Extent]:
    """The source's allocation from `start`, adjacent extents of one kind
    merged. A server without base:allocation yields one data extent."""
    if start >= size:
        return []
    if not handle.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION):
        return [Extent(start, size - start)]
    extents: list[Extent] = []

    def add(offset, length, flags):
        zero = bool(flags & STATE_ZERO)
        if extents and extents[-1].zero == zero and extents[-1].end == offset:
            extents[-1] = Extent(extents[-1].offset, extents[-1].length + length, zero)
        else:
            extents.append(Extent(offset, length, zero))

    _walk_block_status(handle, nbd.CONTEXT_BASE_ALLOCATION, start, size, add)
    return extents


def dirty_areas(uri: str, bitmap: str) -> list[tuple[int, int]]:
    """Areas marked dirty in a qemu persistent bitmap, served by qemu-nbd
    (`qemu:dirty-bitmap:NAME`): a changed-block source without VMware."""
    context = f"qemu:dirty-bitmap:{bitmap}"
    handle = connect(uri, meta_context=context)
    try:
        if not handle.can_meta_context(context):
            raise CopyError(f"{uri} does not serve the dirty bitmap {bitmap!r}")
        areas: list[tuple[int, int]] = []
        _walk_block_status(handle, context, 0, handle.get_size(),
                           lambda off, length, flags: areas.append((off, length)) if flags & STATE_DIRTY else None)
        return coalesce(areas)
    finally:
        close(handle)


def coalesce(areas: Iterable[tuple[int, int]], size: int | None = None) -> list[tuple[int, int]]:
    """Sort areas, merge overlapping and adjacent ones, clip them to `size`."""
    merged: list[list[int]] = []
    for offset, length in sorted(areas):
        if offset < 0 or length < 0:
            raise CopyError(f"invalid changed area offset {offset} length {length}")
        end = offset + length if size is None else min(offset + length, size)
        if end <= offset:
            continue
        if merged and offset <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([offset, end])
    return [(start, end - start) for start, end in merged]


def with_gaps_zeroed(plan: list[Extent], size: int) -> list[Extent]:
    filled, offset = [], 0
    for extent in plan + [Extent(size, 0)]:
        if extent.offset > offset:
            filled.append(Extent(offset, extent.offset - offset, True))
        if extent.length:
            filled.append(extent)
        offset = extent.end
    return filled


def iter_items(extents: list[Extent], chunk_bytes: int) -> Iterator[Extent]:
    """The plan's extents in requests: data in chunks, and a data extent's
    tail in power-of-two pieces (so every buffer comes from a few pooled
    sizes, see Pipeline._buffer); zero runs in the largest zero requests the
    protocol takes."""
    for extent in extents:
        if extent.zero:
            for offset in range(extent.offset, extent.end, ZERO_REQUEST_BYTES):
                yield Extent(offset, min(ZERO_REQUEST_BYTES, extent.end - offset), True)
            continue
        offset = extent.offset
        while extent.end - offset >= chunk_bytes:
            yield Extent(offset, chunk_bytes)
            offset += chunk_bytes
        for piece in _powers_of_two(extent.end - offset):
            yield Extent(offset, piece)
            offset += piece


def _powers_of_two(length: int) -> list[int]:
    """4097 -> [4096, 1]: the binary pieces of a length, largest first."""
    return [1 << bit for bit in range(length.bit_length() - 1, -1, -1) if length >> bit & 1]


def count_items(extents: list[Extent], chunk_bytes: int) -> int:
    count = 0
    for extent in extents:
        if extent.zero:
            count += -(-extent.length // ZERO_REQUEST_BYTES)
        else:
            count += extent.length // chunk_bytes + (extent.length % chunk_bytes).bit_count()
    return count

"""Comparing what an earlier run left below its resume cursor with the
source, before a resumed copy skips it: a resumed copy then ends equal to
the source whatever the cursor said.

Reads go out `depth` at a time on each side (one connection each) and are
settled oldest first, so the first chunk found to differ is the lowest one.
A VMware source answers each read in milliseconds: one read at a time would
compare a large disk for hours where a pipeline takes minutes."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator

import nbd

from vma_agent.copy.connection import CopyError, close, connect
from vma_agent.copy.plan import Extent
from vma_agent.progress import ThrottledReporter


class CompareCancelled(Exception):
    """The copy was cancelled while the data below its cursor was compared."""


def _chunks(plan: list[Extent], cursor: int, chunk_bytes: int) -> Iterator[tuple[int, int]]:
    for item in plan:
        if item.zero or item.offset >= cursor:
            continue
        end = min(item.end, cursor)
        for offset in range(item.offset, end, chunk_bytes):
            yield offset, min(chunk_bytes, end - offset)


def _settle(handle: nbd.NBD, cookie: int) -> None:
    while not handle.aio_command_completed(cookie):
        handle.poll(-1)


def compare_below(src: nbd.NBD, dst_uri: str, plan: list[Extent], cursor: int, chunk_bytes: int, depth: int,
                  reporter: ThrottledReporter, cancel: threading.Event) -> tuple[int, int | None]:
    """Compare the plan's data below `cursor` on the target with the source:
    (bytes compared and equal, offset of the first chunk that differs or
    None). Progress goes to `reporter` as the compared bytes (a callback
    that raises stops the comparison, as it stops a copy); `cancel` stops
    it with CompareCancelled."""
    dst = connect(dst_uri)
    inflight: deque[tuple[int, int, nbd.Buffer, int, nbd.Buffer, int]] = deque()
    compared = 0
    differed_at: int | None = None
    try:
        chunks = _chunks(plan, cursor, chunk_bytes)
        while True:
            while differed_at is None and len(inflight) < depth and (chunk := next(chunks, None)) is not None:
                offset, length = chunk
                src_buf, dst_buf = nbd.Buffer(length), nbd.Buffer(length)
                inflight.append((offset, length, src_buf, src.aio_pread(src_buf, offset),
                                 dst_buf, dst.aio_pread(dst_buf, offset)))
            if not inflight:
                break
            offset, length, src_buf, src_cookie, dst_buf, dst_cookie = inflight.popleft()
            try:
                _settle(src, src_cookie)
                _settle(dst, dst_cookie)
            except nbd.Error as exc:
                raise CopyError(f"comparing below the resume offset {cursor} failed at offset {offset}: "
                                f"{exc.string}") from exc
            if differed_at is not None:
                continue  # draining what is still in flight on the source, which the copy goes on using
            if src_buf.to_bytearray() != dst_buf.to_bytearray():
                differed_at = offset
                continue
            compared += length
            reporter.update(compared)
            if cancel.is_set():
                raise CompareCancelled(f"copy cancelled while comparing below the resume offset {cursor}")
    finally:
        close(dst)
    return compared, differed_at

"""The copy engine: copy an NBD source export onto an NBD target export.

A full copy reads only the source's allocated extents and turns zero
extents into zero requests; an extent-list copy (incrementals) copies only
the given areas (plan.py). The data moves through pipelines of many
requests in flight per connection (pipeline.py; a failed request is copied
again synchronously, retry.py), under a bandwidth limit that can change
while the copy runs (ratelimit.py). The calling thread
never touches data: it reports progress, commits the checkpoint cursor
(everything below it written and flushed) and watches for cancel.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import nbd

from vma_agent.copy.compare import CompareCancelled, compare_below
from vma_agent.copy.connection import Connections, ConnectTimeout, CopyError, close, connect, export_size
from vma_agent.copy.pipeline import FLUSH_BYTES, FLUSH_INTERVAL_S, CopyRun
from vma_agent.copy.plan import Extent, allocation_map, coalesce, count_items, dirty_areas, with_gaps_zeroed
from vma_agent.copy.ratelimit import TICK_S, RateLimit
from vma_agent.progress import ProgressCallback, ThrottledReporter

__all__ = ["CopyCancelled", "CopyError", "CopyResult", "RateLimit", "coalesce", "copy_image", "dirty_areas",
           "export_size", "ConnectTimeout"]

MiB = 1024 * 1024
# Chosen with bench/copy_bench.py (figures in the README): 512 KiB x 32 per
# source connection writes a file target fastest. Data in flight is at most
# source connections x depth x chunk (32 MiB here); a stop does not wait for
# the reads in flight (pipeline.py), so the depth does not slow a stop.
DEFAULT_CHUNK_BYTES = 512 * 1024
DEFAULT_CONNECTIONS = 2
DEFAULT_DEPTH = 32
# One I/O thread drives every connection: a second one waiting for the GIL
# stalls its whole pipeline (README: the copy engine's figures).
MAX_PIPELINES = 1
MAX_REQUEST_BYTES = 32 * MiB  # the NBD protocol's practical limit for one read/write


class CopyCancelled(Exception):
    """The copy stopped on request; everything below `cursor` is written and flushed."""

    def __init__(self, cursor: int):
        super().__init__(f"copy cancelled; committed up to offset {cursor}")
        self.cursor = cursor


class CopyResult:
    """What a copy did. A plain class: dataclasses alone cost the CLI 7 ms of start-up."""

    FIELDS = ("size", "bytes_allocated", "bytes_copied", "bytes_zeroed", "bytes_skipped", "bytes_read",
              "resumed_from", "bytes_resumed", "resume_compared", "resume_differed_at", "verified", "seconds")

    def __init__(self, size: int, *, bytes_allocated: int = 0, bytes_skipped: int = 0, resumed_from: int = 0,
                 bytes_resumed: int = 0):
        self.size = size
        self.bytes_allocated = bytes_allocated  # source data to copy: what progress counts
        self.bytes_copied = 0  # data written to the target
        self.bytes_zeroed = 0  # written as zero requests (zero extents or all-zero data)
        # Not written at all: holes on a fresh target, unchanged areas, below the cursor.
        self.bytes_skipped = bytes_skipped
        self.bytes_read = 0  # data read from the source
        self.resumed_from = resumed_from
        self.bytes_resumed = bytes_resumed  # data below resumed_from, copied by an earlier run
        # compare_resumed: the data below the given cursor compared with the
        # source, and where the target first differed (the copy resumed there).
        self.resume_compared = 0
        self.resume_differed_at: int | None = None
        self.verified = False
        self.seconds = 0.0

    @property
    def throughput_bps(self) -> int:
        """Source data per second in this run, the rate progress is measured in."""
        return int((self.bytes_allocated - self.bytes_resumed) / self.seconds) if self.seconds > 0 else 0

    def as_dict(self) -> dict:
        return {**{name: getattr(self, name) for name in self.FIELDS}, "throughput_bps": self.throughput_bps}

    def __repr__(self) -> str:
        return f"CopyResult({self.as_dict()})"


def copy_image(
    src_uri: str, dst_uri: str, *, extents: list[tuple[int, int]] | None = None, zero_unlisted: bool = False,
    resume_from: int = 0, chunk_bytes: int = DEFAULT_CHUNK_BYTES, connections: int = DEFAULT_CONNECTIONS,
    target_connections: int | None = None, depth: int = DEFAULT_DEPTH, limit: RateLimit | None = None,
    verify: bool = False, compare_resumed: bool = False, target_is_zeroed: bool = False, retries: int = 3,
    progress: ProgressCallback | None = None, progress_interval_s: float = 2.0,
    checkpoint: Callable[[int], None] | None = None, checkpoint_interval_s: float = 2.0,
    flush_bytes: int = FLUSH_BYTES, flush_interval_s: float = FLUSH_INTERVAL_S, cancel: threading.Event | None = None,
) -> CopyResult:
    """Copy the source export onto the target export and return what was done.

    extents: copy only these (offset, length) areas (an incremental); None
        copies the whole disk, reading only allocated data.
    zero_unlisted: with extents, the areas outside them read as zeros on the
        source (a full copy from a list of allocated areas): they are zeroed
        on the target too, which may hold an older copy.
    resume_from: a cursor from an earlier run's checkpoint; nothing below it
        is copied again.
    compare_resumed: with resume_from, first compare the data below it with
        the source (read both, write nothing) and resume at the first chunk
        that differs instead: a resumed copy then ends equal to the source
        whatever the cursor said. Zero areas below the cursor are not read.
    verify: read back what this run copied and compare it with the source.
    connections: connections to the source (a VMware host limits them: keep
        it small there, the depth carries the speed); target_connections:
        to the target, the same number unless given.
    depth: requests in flight per source connection; data in flight is at
        most connections x depth x chunk_bytes.
    target_is_zeroed: the target is known to read as zeros (a fresh volume),
        so zero extents need no request at all.
    progress: called from the calling thread at most every progress_interval_s
        or 1 % of the data; raising from it stops the copy (the cursor is
        committed first) and the exception propagates.
    checkpoint: called with the committed cursor at least every
        checkpoint_interval_s, and once at the end. The target is flushed
        whenever flush_bytes were written since the last flush, and at least
        every flush_interval_s (or checkpoint_interval_s, if shorter).
    cancel: set it to stop the copy within a second; CopyCancelled follows.
    """
    if not 0 < chunk_bytes <= MAX_REQUEST_BYTES:
        raise CopyError(f"chunk size must be between 1 byte and {MAX_REQUEST_BYTES} bytes")
    target_connections = target_connections or connections
    if connections < 1 or target_connections < 1 or depth < 1:
        raise CopyError("connections, target connections and depth must be at least 1")
    started = time.monotonic()
    cancel = cancel or threading.Event()
    plan = CopyPlan.make(src_uri, dst_uri, extents=extents, zero_unlisted=zero_unlisted, resume_from=resume_from,
                         compare_resumed=compare_resumed, chunk_bytes=chunk_bytes, depth=depth,
                         reporter=lambda total: ThrottledReporter(progress, total, progress_interval_s),
                         cancel=cancel)
    result = plan.result()
    plan.reporter.update(plan.done_before, final=True)
    if not plan.items:
        result.seconds = time.monotonic() - started
        if checkpoint:
            checkpoint(plan.end)
        return result
    # Without multi-conn, parallel connections could still read fine, but a
    # target might then cache writes per connection: keep one to be safe.
    if not plan.multi_conn:
        connections = target_connections = 1
    pool: list[Connections] = []
    try:
        for sources, targets in _spread(connections, target_connections, plan.items):
            pool.append(Connections(src_uri, dst_uri, sources, targets))
        run = CopyRun(plan.todo, chunk_bytes=chunk_bytes, depth=depth, target_is_zeroed=target_is_zeroed,
                      limit=limit or RateLimit(), retries=retries,
                      flush_interval_s=min(flush_interval_s, checkpoint_interval_s), flush_bytes=flush_bytes)
        stop_reason = _supervise(run, pool, plan, cancel, checkpoint, checkpoint_interval_s)
        _finish(run, pool[0], plan, result, stop_reason, checkpoint, verify, chunk_bytes)
        result.seconds = time.monotonic() - started
        plan.reporter.update(plan.data_total, final=True)
        return result
    finally:
        for conns in pool:
            conns.close()


class CopyPlan:
    """What a copy run copies, read from the source before it starts: the
    disk's size, its plan of data and zero extents, what is left of it
    above the resume cursor (after comparing below it, when asked) and in
    how many requests."""

    def __init__(self, size: int, multi_conn: bool, extents: list[Extent], resume_from: int,
                 reporter: ThrottledReporter, compared: int = 0, differed_at: int | None = None, *,
                 chunk_bytes: int):
        self.size = size
        self.multi_conn = multi_conn
        self.extents = extents
        self.data_total = sum(e.length for e in extents if not e.zero)
        self.resume_from = resume_from
        self.reporter = reporter
        self.compared, self.differed_at = compared, differed_at
        self.done_before = sum(min(e.end, resume_from) - e.offset for e in extents
                               if not e.zero and e.offset < resume_from)
        self.todo = [Extent(max(e.offset, resume_from), e.end - max(e.offset, resume_from), e.zero)
                     for e in extents if e.end > resume_from]
        self.items = count_items(self.todo, chunk_bytes)
        self.end = extents[-1].end if extents else resume_from

    @classmethod
    def make(cls, src_uri: str, dst_uri: str, *, extents: list[tuple[int, int]] | None, zero_unlisted: bool,
             resume_from: int, compare_resumed: bool, chunk_bytes: int, depth: int,
             reporter: Callable[[int], ThrottledReporter], cancel: threading.Event) -> CopyPlan:
        """Check the source and the target, map what to copy, and with
        compare_resumed find where the target first differs below the cursor."""
        src = connect(src_uri, meta_context=nbd.CONTEXT_BASE_ALLOCATION)
        try:
            size, multi_conn = _check_target(src, dst_uri)
            if not 0 <= resume_from <= size:
                raise CopyError(f"resume offset {resume_from} is outside the disk (0..{size})")
            if extents is None:
                plan = allocation_map(src, size)
            else:
                plan = [Extent(offset, length) for offset, length in coalesce(extents, size)]
                if zero_unlisted:
                    plan = with_gaps_zeroed(plan, size)
            progress = reporter(sum(e.length for e in plan if not e.zero))
            compared, differed_at = 0, None
            if compare_resumed and resume_from > 0:
                try:
                    compared, differed_at = compare_below(src, dst_uri, plan, resume_from, chunk_bytes, depth,
                                                          progress, cancel)
                except CompareCancelled:
                    raise CopyCancelled(resume_from) from None  # nothing written: the cursor stands
                if differed_at is not None:
                    resume_from = differed_at
            return cls(size, multi_conn, plan, resume_from, progress, compared, differed_at, chunk_bytes=chunk_bytes)
        finally:
            close(src)

    def result(self) -> CopyResult:
        result = CopyResult(size=self.size, bytes_allocated=self.data_total, resumed_from=self.resume_from,
                            bytes_resumed=self.done_before, bytes_skipped=self.size)
        result.resume_compared, result.resume_differed_at = self.compared, self.differed_at
        return result


def _check_target(src: nbd.NBD, dst_uri: str) -> tuple[int, bool]:
    """The source's size, and whether both sides have multi-conn; refuses a
    target that cannot hold the disk or cannot be written."""
    dst = connect(dst_uri)
    try:
        size, dst_size = src.get_size(), dst.get_size()
        # A larger target (a cloud volume rounded up to its offering's
        # unit) holds the disk in its first `size` bytes; a smaller one cannot.
        if dst_size < size:
            raise CopyError(f"target is {dst_size} bytes but the source is {size} bytes; refusing to copy")
        if dst.is_read_only():
            raise CopyError(f"target {dst_uri} is read-only")
        return size, src.can_multi_conn() and dst.can_multi_conn()
    finally:
        close(dst)


def _supervise(run: CopyRun, pool: list[Connections], plan: CopyPlan, cancel: threading.Event,
               checkpoint: Callable[[int], None] | None, checkpoint_interval_s: float) -> BaseException | None:
    """Run the pipelines to their end from the calling thread, which reports
    progress, commits the cursor and watches for cancel. Returns what
    stopped them early (an exception from the progress callback, or one
    raised here, e.g. a task's time limit), if anything did."""
    threads = [threading.Thread(target=run.work, args=(conns,), name=f"copy-{i}", daemon=True)
               for i, conns in enumerate(pool)]
    run.workers_left = len(threads)
    for thread in threads:
        thread.start()
    last_checkpoint = time.monotonic()
    stop_reason: BaseException | None = None
    try:
        while not run.all_stopped.wait(TICK_S):
            if cancel.is_set() and not run.stop.is_set():
                run.stop.set()
            if stop_reason is None and not run.stop.is_set():
                try:
                    plan.reporter.update(plan.done_before + run.bytes_done)
                except BaseException as exc:  # noqa: BLE001 - re-raised once the cursor is committed
                    stop_reason = exc
                    run.stop.set()
            if checkpoint and time.monotonic() - last_checkpoint >= checkpoint_interval_s:
                checkpoint(run.cursor())
                last_checkpoint = time.monotonic()
    except BaseException as exc:  # noqa: BLE001 - e.g. a task's time limit, raised here by a signal
        # The copy threads must stop before their connections close.
        stop_reason = stop_reason or exc
        run.stop.set()
    for thread in threads:
        thread.join()
    return stop_reason


def _finish(run: CopyRun, conns: Connections, plan: CopyPlan, result: CopyResult,
            stop_reason: BaseException | None, checkpoint: Callable[[int], None] | None, verify: bool,
            chunk_bytes: int) -> None:
    """Commit the final cursor, then raise why the run stopped short, or
    verify what it copied and record its figures in `result`."""
    cursor = run.cursor()
    if checkpoint:
        checkpoint(cursor)
    if run.error is not None:
        raise run.error
    if stop_reason is not None:
        raise stop_reason
    if not run.finished():
        raise CopyCancelled(cursor)
    if verify:
        _verify(conns, plan.todo, chunk_bytes)
        result.verified = True
    result.bytes_copied, result.bytes_zeroed = run.copied, run.zeroed
    result.bytes_read = run.bytes_done
    result.bytes_skipped = plan.size - run.copied - run.zeroed


def _spread(sources: int, targets: int, items: int) -> list[tuple[int, int]]:
    """(source, target) connection counts of each pipeline: at most
    MAX_PIPELINES, no more than either side's connections or the items,
    every connection dealt to one of them."""
    pipelines = max(1, min(sources, targets, items, MAX_PIPELINES))
    return [(len(range(i, sources, pipelines)), len(range(i, targets, pipelines))) for i in range(pipelines)]


def _verify(conns: Connections, extents: list[Extent], chunk_bytes: int) -> None:
    """Read back what was copied and compare it with the source."""
    for item in extents:
        for offset in range(item.offset, item.end, chunk_bytes):
            length = min(chunk_bytes, item.end - offset)
            try:
                target = conns.dst.pread(length, offset)
                source = bytes(length) if item.zero else conns.src.pread(length, offset)
            except nbd.Error as exc:
                raise CopyError(f"verify read failed at offset {offset} length {length}: {exc.string}") from exc
            if target != source:
                raise CopyError(f"verification failed: target differs from source at offset {offset} "
                                f"length {length}")

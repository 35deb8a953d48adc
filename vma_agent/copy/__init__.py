"""The copy engine: copy an NBD source export onto an NBD target export.

Several connection pairs copy in parallel, one thread each: libnbd's
synchronous calls wait in C with the GIL released, which costs less CPU
than driving requests from a Python event loop. A full copy reads only the
source's allocated extents and turns zero extents into zero requests; an
extent-list copy (incrementals) copies only the given areas. The calling
thread never touches data: it reports progress, commits the checkpoint
cursor (everything below it written and flushed) and watches for cancel.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import nbd
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from vma_agent.progress import ProgressCallback, ThrottledReporter

MiB = 1024 * 1024
# Defaults measured with bench/copy_bench.py. Data in flight is at most
# connections x chunk.
DEFAULT_CHUNK_BYTES = 1 * MiB
DEFAULT_CONNECTIONS = 4
MAX_REQUEST_BYTES = 32 * MiB  # the NBD protocol's practical limit for one read/write
ZERO_REQUEST_BYTES = 1 << 30  # a zero request's length is 32-bit on the wire
EXTENT_QUERY_BYTES = 1 << 30
STATE_HOLE, STATE_ZERO = 1, 2  # base:allocation flags
STATE_DIRTY = 1  # qemu:dirty-bitmap flag
TICK_S = 0.1


class CopyError(RuntimeError):
    """A copy failed; the message names the offset, length and server error."""


class CopyCancelled(Exception):
    """The copy stopped on request; everything below `cursor` is written and flushed."""

    def __init__(self, cursor: int):
        super().__init__(f"copy cancelled; committed up to offset {cursor}")
        self.cursor = cursor


@dataclass(frozen=True)
class Extent:
    offset: int
    length: int
    zero: bool = False

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass
class CopyResult:
    size: int
    bytes_allocated: int = 0  # source data to copy: what progress counts
    bytes_copied: int = 0  # data written to the target
    bytes_zeroed: int = 0  # written as zero requests (zero extents or all-zero data)
    bytes_skipped: int = 0  # not written at all: holes on a fresh target, unchanged areas, below the cursor
    bytes_read: int = 0  # data read from the source
    resumed_from: int = 0
    bytes_resumed: int = 0  # data below resumed_from, copied by an earlier run
    verified: bool = False
    seconds: float = 0.0

    @property
    def throughput_bps(self) -> int:
        """Source data per second in this run, the rate progress is measured in."""
        return int((self.bytes_allocated - self.bytes_resumed) / self.seconds) if self.seconds > 0 else 0

    def as_dict(self) -> dict:
        return {**asdict(self), "throughput_bps": self.throughput_bps}


class RateLimit:
    """A bandwidth limit shared by the copy threads, changeable while a copy
    runs (`set`). Each read waits for the end of its own time slot on a shared
    schedule, so N bytes take at least N / rate seconds and idle time never
    turns into a burst."""

    def __init__(self, bytes_per_s: float | None = None, *, clock=time.monotonic, sleep=time.sleep):
        self._lock = threading.Lock()
        self._rate = bytes_per_s
        self._clock, self._sleep = clock, sleep  # injectable: the tests drive a clock of their own
        self._next = clock()

    @property
    def bytes_per_s(self) -> float | None:
        return self._rate

    def set(self, bytes_per_s: float | None) -> None:
        with self._lock:
            self._rate = bytes_per_s if bytes_per_s and bytes_per_s > 0 else None
            self._next = self._clock()

    def acquire(self, nbytes: int, cancel: threading.Event) -> bool:
        """Wait until nbytes may be read; False if `cancel` was set meanwhile."""
        with self._lock:
            if not self._rate:
                return not cancel.is_set()
            self._next = max(self._clock(), self._next) + nbytes / self._rate
            slot_end = self._next
        # Wait in small steps so a cancel is seen promptly.
        while (delay := slot_end - self._clock()) > 0 and not cancel.is_set():
            self._sleep(min(delay, TICK_S))
        return not cancel.is_set()


def connect(uri: str, *, meta_context: str | None = None) -> nbd.NBD:
    handle = nbd.NBD()
    if meta_context:
        handle.add_meta_context(meta_context)
    if "tls-psk-file=" in uri:
        # A TLS-PSK export names its key file in the URI (the key itself is
        # never in a URI or on a command line); libnbd reads it only if allowed.
        handle.set_uri_allow_local_file(True)
    try:
        handle.connect_uri(uri)
    except nbd.Error as exc:
        raise CopyError(f"cannot connect to {uri}: {exc.string}") from exc
    return handle


def close(handle: nbd.NBD | None) -> None:
    if handle is None:
        return
    try:
        handle.shutdown()
    except nbd.Error:
        pass  # the connection is already gone; the copy's own error says why


def export_size(uri: str) -> int:
    handle = connect(uri)
    try:
        return handle.get_size()
    finally:
        close(handle)


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


def _with_gaps_zeroed(plan: list[Extent], size: int) -> list[Extent]:
    filled, offset = [], 0
    for extent in plan + [Extent(size, 0)]:
        if extent.offset > offset:
            filled.append(Extent(offset, extent.offset - offset, True))
        if extent.length:
            filled.append(extent)
        offset = extent.end
    return filled


def _split(extents: Iterable[Extent], chunk_bytes: int) -> list[Extent]:
    items: list[Extent] = []
    for extent in extents:
        step = ZERO_REQUEST_BYTES if extent.zero else chunk_bytes
        for offset in range(extent.offset, extent.end, step):
            items.append(Extent(offset, min(step, extent.end - offset), extent.zero))
    return items


class _RequestFailed(Exception):
    """One NBD request failed; retried, then reported with what it was."""

    def __init__(self, operation: str, error: nbd.Error):
        super().__init__(operation)
        self.operation = operation
        self.message = error.string


class _Connections:
    """One worker's source and target connections, reconnected after a
    broken connection so a retry has something to retry on."""

    def __init__(self, src_uri: str, dst_uri: str):
        self.src_uri, self.dst_uri = src_uri, dst_uri
        self.src = connect(src_uri)
        self.dst = connect(dst_uri)
        self.repair_error: CopyError | None = None

    def repair(self) -> None:
        """Reconnect dead connections; remembers why that failed, if it did."""
        self.repair_error = None
        for name, uri in (("src", self.src_uri), ("dst", self.dst_uri)):
            handle = getattr(self, name)
            if handle.aio_is_dead() or handle.aio_is_closed():
                close(handle)
                try:
                    setattr(self, name, connect(uri))
                except CopyError as exc:
                    self.repair_error = exc
                    return

    def close(self) -> None:
        close(self.src)
        close(self.dst)


class _Copy:
    """One copy run: the shared state between the worker threads and the
    calling thread."""

    def __init__(self, items: list[Extent], *, chunk_bytes: int, target_is_zeroed: bool,
                 limit: RateLimit, retries: int, flush_interval_s: float):
        self.items = items
        self.chunk_bytes = chunk_bytes
        self.target_is_zeroed = target_is_zeroed
        self.limit = limit
        self.retries = retries
        self.flush_interval_s = flush_interval_s
        self.durable = [False] * len(items)  # written and flushed: what the cursor counts
        self.next_item = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.workers_left = 0
        self.all_stopped = threading.Event()  # every worker has returned
        self.error: BaseException | None = None
        self.bytes_done = 0  # data bytes of finished items
        self.copied = self.zeroed = 0
        self.cursor_index = 0

    # --- worker side ---------------------------------------------------
    def work(self, conns: _Connections) -> None:
        try:
            self._stream(conns)
        except BaseException as exc:  # noqa: BLE001 - handed to the calling thread
            with self.lock:
                self.error = self.error or exc
            self.stop.set()
        finally:
            with self.lock:
                self.workers_left -= 1
                if self.workers_left == 0:
                    self.all_stopped.set()

    def _claim(self) -> int | None:
        with self.lock:
            if self.next_item >= len(self.items):
                return None
            self.next_item += 1
            return self.next_item - 1

    def _finish(self, index: int, outcome: str) -> None:
        item = self.items[index]
        with self.lock:
            if outcome == "copied":
                self.copied += item.length
            elif outcome == "zeroed":
                self.zeroed += item.length
            if not item.zero:
                self.bytes_done += item.length

    def _stream(self, conns: _Connections) -> None:
        """Copy items until none are left or the copy stops. Each request is
        a synchronous libnbd call, which waits in C with the GIL released, so
        the connection pairs run in parallel at C speed. Every `flush_interval_s`
        the thread flushes its own target connection (no thread ever touches
        another's handles); a flush makes the writes finished before it
        durable, and only durable items move the cursor."""
        unflushed: list[int] = []
        last_flush = time.monotonic()
        zeros = bytes(self.chunk_bytes)
        while not self.stop.is_set():
            index = self._claim()
            if index is None:
                break
            item = self.items[index]
            if not item.zero and not self.limit.acquire(item.length, self.stop):
                break  # stopped while waiting for bandwidth; the item stays undone
            try:
                outcome = self._one(conns, item, zeros)
            except _RequestFailed:
                outcome = self._retrying(conns, item, zeros)
            self._finish(index, outcome)
            unflushed.append(index)
            if time.monotonic() - last_flush >= self.flush_interval_s:
                self._flush(conns, unflushed)
                last_flush = time.monotonic()
        self._flush(conns, unflushed)

    def _flush(self, conns: _Connections, unflushed: list[int]) -> None:
        if unflushed and conns.dst.can_flush():
            try:
                conns.dst.flush()
            except nbd.Error as exc:
                raise CopyError(f"flush of the target failed: {exc.string}") from exc
        with self.lock:
            for index in unflushed:
                self.durable[index] = True
        unflushed.clear()

    def _retrying(self, conns: _Connections, item: Extent, zeros: bytes) -> str:
        attempts = Retrying(stop=stop_after_attempt(self.retries), wait=wait_exponential(0.2, max=5),
                            retry=retry_if_exception_type(_RequestFailed), reraise=True,
                            before_sleep=lambda state: conns.repair())
        conns.repair()
        try:
            return attempts(self._one, conns, item, zeros)
        except _RequestFailed as exc:
            # A connection that could not be re-established says more than
            # the dead handle's own complaint.
            reason = f"connection lost and {conns.repair_error}" if conns.repair_error else exc.message
            raise CopyError(f"{exc.operation} failed at offset {item.offset} length {item.length}: "
                            f"{reason}") from exc

    def _one(self, conns: _Connections, item: Extent, zeros: bytes) -> str:
        """Copy one item; returns "copied", "zeroed" or "skipped"."""
        if not item.zero:
            try:
                data = conns.src.pread(item.length, item.offset)
            except nbd.Error as exc:
                raise _RequestFailed("read", exc) from exc
            if data != zeros[:item.length]:
                try:
                    conns.dst.pwrite(data, item.offset)
                except nbd.Error as exc:
                    raise _RequestFailed("write", exc) from exc
                return "copied"
        # Zero extents, and data that reads as zeros, are written as zeros.
        if self.target_is_zeroed:
            return "skipped"
        try:
            _zero(conns.dst, item.offset, item.length, self.chunk_bytes)
        except nbd.Error as exc:
            raise _RequestFailed("zero", exc) from exc
        return "zeroed"

    # --- calling-thread side -------------------------------------------
    def cursor(self) -> int:
        """The committed cursor: every item below it is written and flushed."""
        with self.lock:
            while self.cursor_index < len(self.items) and self.durable[self.cursor_index]:
                self.cursor_index += 1
            index = self.cursor_index
        return self.items[index].offset if index < len(self.items) else self.items[-1].end

    def finished(self) -> bool:
        return self.cursor_index == len(self.items)


def _zero(dst: nbd.NBD, offset: int, length: int, chunk_bytes: int) -> None:
    if dst.can_zero():
        dst.zero(length, offset)
        return
    # A target without zero support gets explicit zero data, one chunk at a time.
    for pos in range(offset, offset + length, chunk_bytes):
        dst.pwrite(bytes(min(chunk_bytes, offset + length - pos)), pos)


def copy_image(
    src_uri: str,
    dst_uri: str,
    *,
    extents: list[tuple[int, int]] | None = None,
    zero_unlisted: bool = False,
    resume_from: int = 0,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    connections: int = DEFAULT_CONNECTIONS,
    limit: RateLimit | None = None,
    verify: bool = False,
    target_is_zeroed: bool = False,
    retries: int = 3,
    progress: ProgressCallback | None = None,
    progress_interval_s: float = 2.0,
    checkpoint: Callable[[int], None] | None = None,
    checkpoint_interval_s: float = 2.0,
    cancel: threading.Event | None = None,
) -> CopyResult:
    """Copy the source export onto the target export and return what was done.

    extents: copy only these (offset, length) areas (an incremental); None
        copies the whole disk, reading only allocated data.
    zero_unlisted: with extents, the areas outside them read as zeros on the
        source (a full copy from a list of allocated areas): they are zeroed
        on the target too, which may hold an older copy.
    resume_from: a cursor from an earlier run's checkpoint; nothing below it
        is copied again.
    target_is_zeroed: the target is known to read as zeros (a fresh volume),
        so zero extents need no request at all.
    progress: called from the calling thread at most every progress_interval_s
        or 1 % of the data; raising from it stops the copy (the cursor is
        committed first) and the exception propagates.
    checkpoint: called with the committed cursor at least every
        checkpoint_interval_s, and once at the end.
    cancel: set it to stop the copy within a second; CopyCancelled follows.
    """
    if not 0 < chunk_bytes <= MAX_REQUEST_BYTES:
        raise CopyError(f"chunk size must be between 1 byte and {MAX_REQUEST_BYTES} bytes")
    started = time.monotonic()
    limit = limit or RateLimit()
    cancel = cancel or threading.Event()
    src = connect(src_uri, meta_context=nbd.CONTEXT_BASE_ALLOCATION)
    pool: list[_Connections] = []
    try:
        dst = connect(dst_uri)
        try:
            size, dst_size = src.get_size(), dst.get_size()
            # A larger target (a cloud volume rounded up to its offering's
            # unit) holds the disk in its first `size` bytes; a smaller one cannot.
            if dst_size < size:
                raise CopyError(f"target is {dst_size} bytes but the source is {size} bytes; refusing to copy")
            if dst.is_read_only():
                raise CopyError(f"target {dst_uri} is read-only")
            multi_conn = src.can_multi_conn() and dst.can_multi_conn()
        finally:
            close(dst)
        if not 0 <= resume_from <= size:
            raise CopyError(f"resume offset {resume_from} is outside the disk (0..{size})")
        if extents is None:
            plan = allocation_map(src, size)
        else:
            plan = [Extent(offset, length) for offset, length in coalesce(extents, size)]
            if zero_unlisted:
                plan = _with_gaps_zeroed(plan, size)
        done_before = sum(min(e.end, resume_from) - e.offset for e in plan if not e.zero and e.offset < resume_from)
        data_total = sum(e.length for e in plan if not e.zero)
        todo = [Extent(max(e.offset, resume_from), e.end - max(e.offset, resume_from), e.zero)
                for e in plan if e.end > resume_from]
        items = _split(todo, chunk_bytes)
    finally:
        close(src)

    result = CopyResult(size=size, bytes_allocated=data_total, resumed_from=resume_from,
                        bytes_resumed=done_before, bytes_skipped=size)
    reporter = ThrottledReporter(progress, data_total, progress_interval_s)
    reporter.update(done_before, final=True)
    if not items:
        result.seconds = time.monotonic() - started
        if checkpoint:
            checkpoint(plan[-1].end if plan else resume_from)
        return result

    # Without multi-conn, parallel connections could still read fine, but a
    # target might then cache writes per connection: keep one to be safe.
    count = max(1, min(connections if multi_conn else 1, len(items)))
    pool = []
    try:
        for _ in range(count):
            pool.append(_Connections(src_uri, dst_uri))
        run = _Copy(items, chunk_bytes=chunk_bytes, target_is_zeroed=target_is_zeroed,
                    limit=limit, retries=retries, flush_interval_s=checkpoint_interval_s)
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
                        reporter.update(done_before + run.bytes_done)
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
            _verify(pool[0], items, chunk_bytes)
            result.verified = True
        result.bytes_copied, result.bytes_zeroed = run.copied, run.zeroed
        result.bytes_read = run.bytes_done
        result.bytes_skipped = size - run.copied - run.zeroed
        result.seconds = time.monotonic() - started
        reporter.update(data_total, final=True)
        return result
    finally:
        for conns in pool:
            conns.close()


def _verify(conns: _Connections, items: list[Extent], chunk_bytes: int) -> None:
    """Read back what was copied and compare it with the source."""
    for item in items:
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

"""The copy's data path: pipelines of many requests in flight, reads and
writes overlapped.

A pipeline is one thread driving a share of the source and target
connections. It keeps up to `depth` requests outstanding per source
connection (libnbd aio calls with completion callbacks) and waits in
poll(2) on all its sockets at once: a read's latency overlaps the other
reads and the writes, as nbdcopy does. Reads go round-robin over its source
connections, writes over its target connections. A completed read becomes a
write of the same buffer (or a zero request when it reads as zeros).
Requests are chunks, or power-of-two pieces of an extent's tail, and their
buffers come from per-size pools: memory follows the requests in flight
(depth x chunk per source connection, at most twice that with the pieces),
never the disk's size or how fragmented it is.

A request that fails is retried synchronously (retry.py) once the pipeline
has drained, on reconnected handles if the connection died; after the last
retry the copy fails with the request's offset, length and the server's
reason. Completed writes become durable with a flush every flush interval;
only durable items move the committed cursor. A stop waits for the target's
writes in flight and flushes them, but abandons the reads in flight: a slow
or stalled source cannot hold a stop up.
"""

from __future__ import annotations

import errno as errno_codes
import math
import os
import select
import threading
import time
from collections import deque

import nbd

from vma_agent.copy.connection import Connections, CopyError
from vma_agent.copy.plan import Extent, iter_items
from vma_agent.copy.ratelimit import TICK_S, RateLimit
from vma_agent.copy.retry import retrying, run_sync

POLL_IN = select.POLLIN | select.POLLHUP | select.POLLERR
POLL_BROKEN = select.POLLHUP | select.POLLERR | select.POLLNVAL
_DIRECTIONS = nbd.AIO_DIRECTION_READ | nbd.AIO_DIRECTION_WRITE
# The poll events for each direction libnbd wants to go.
POLL_EVENTS = {direction: (POLL_IN if direction & nbd.AIO_DIRECTION_READ else 0)
               | (select.POLLOUT if direction & nbd.AIO_DIRECTION_WRITE else 0) for direction in range(4)}
# The target is flushed once this much was written since the last flush, so
# its writeback runs beside the copy instead of all at its end...
FLUSH_BYTES = 256 << 20
# ...and at least this often, so a slow copy (a source over a LAN) ends with
# little left to flush. Both chosen with bench/copy_bench.py (see the README).
FLUSH_INTERVAL_S = 0.5


class CopyRun:
    """One copy run: the items to copy, and the state shared by the
    pipelines and the calling thread. Items are made from the plan as they
    are claimed, in offset order, and only those not yet durable are held:
    memory follows the data in flight, not the disk's size."""

    def __init__(self, extents: list[Extent], *, chunk_bytes: int, depth: int, target_is_zeroed: bool,
                 limit: RateLimit, retries: int, flush_interval_s: float, flush_bytes: int = FLUSH_BYTES):
        self.chunk_bytes = chunk_bytes
        self.depth = depth
        self.target_is_zeroed = target_is_zeroed
        self.limit = limit
        self.retries = retries
        self.flush_interval_s = flush_interval_s
        self.flush_bytes = flush_bytes
        self.plan_end = extents[-1].end if extents else 0
        self._items = iter_items(extents, chunk_bytes)
        self._next: Extent | None = next(self._items, None)  # the next item to claim
        self.claimed = 0
        self.outstanding: dict[int, Extent] = {}  # claimed, not yet durable, in claim (= offset) order
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.workers_left = 0
        self.all_stopped = threading.Event()  # every pipeline has returned
        self.error: BaseException | None = None
        self.bytes_done = 0  # data bytes of finished items
        self.copied = self.zeroed = 0

    # --- pipeline side -------------------------------------------------
    def work(self, conns: Connections) -> None:
        try:
            Pipeline(self, conns).drive()
        except BaseException as exc:  # noqa: BLE001 - handed to the calling thread
            with self.lock:
                self.error = self.error or exc
            self.stop.set()
        finally:
            with self.lock:
                self.workers_left -= 1
                if self.workers_left == 0:
                    self.all_stopped.set()

    def claim(self) -> tuple[int, Extent] | None:
        with self.lock:
            item = self._next
            if item is None:
                return None
            self._next = next(self._items, None)
            index, self.claimed = self.claimed, self.claimed + 1
            self.outstanding[index] = item
            return index, item

    def finish(self, item: Extent, outcome: str) -> None:
        with self.lock:
            if outcome == "copied":
                self.copied += item.length
            elif outcome == "zeroed":
                self.zeroed += item.length
            if not item.zero:
                self.bytes_done += item.length

    def make_durable(self, indexes: list[int]) -> None:
        with self.lock:
            for index in indexes:
                self.outstanding.pop(index, None)

    # --- calling-thread side -------------------------------------------
    def cursor(self) -> int:
        """The committed cursor: everything below it is written and flushed."""
        with self.lock:
            if self.outstanding:
                return next(iter(self.outstanding.values())).offset
            return self._next.offset if self._next is not None else self.plan_end

    def finished(self) -> bool:
        with self.lock:
            return self._next is None and not self.outstanding


class Pipeline:
    """One thread's requests in flight on its connections. Only this thread
    touches its handles; the completion callbacks run inside its own libnbd
    calls and only queue what happened."""

    def __init__(self, run: CopyRun, conns: Connections):
        self.run = run
        self.conns = conns
        # What the completion callbacks saw: (kind, position, index, buffer, errno, generation).
        self.events: deque[tuple] = deque()
        # Items with a request in flight, per connection position.
        self.src_busy: list[set[int]] = [set() for _ in conns.srcs]
        self.dst_busy: list[set[int]] = [set() for _ in conns.dsts]
        self.in_flight = 0
        self.max_in_flight = run.depth * len(conns.srcs)
        self.flushes: dict[int, tuple[int, list[int]]] = {}  # flushes in flight: (target position, items)
        self.flush_count = 0
        self.failed: list[int] = []  # items whose request failed: copied again, synchronously
        self.redo: list[int] = []  # written, but the flush that would make them durable was lost
        self.unflushed: list[int] = []  # written (on any target connection), not yet flushed
        self.unflushed_bytes = 0
        self.last_flush = time.monotonic()
        self.free_buffers: dict[int, list[nbd.Buffer]] = {}  # by size
        self.extents: dict[int, Extent] = {}  # this pipeline's items until they are durable
        self.held: tuple[int, float] | None = None  # the next item, waiting for its rate-limit slot
        self.claimed_all = False
        self.poller = select.poll()
        self.polled: dict[int, int] = {}  # fd -> the events it is registered for
        self.dead: set[int] = set()  # fds of dead connections, until the retry reconnects
        self.owners: dict[int, tuple] = {}  # fd -> (handle, side, busy, position)
        self.watched_generation = -1

    # --- the loop ------------------------------------------------------
    def drive(self) -> None:
        run = self.run
        while True:
            stopping = run.stop.is_set()
            if not stopping and not self.failed and not self.redo and self.in_flight < self.max_in_flight:
                self._issue()
            busy = self.in_flight + len(self.flushes)
            if not stopping and (self.failed or self.redo) and busy == 0:
                self._retry_failed()
                continue
            if stopping or (busy == 0 and self.claimed_all and self.held is None):
                if not self._target_draining():
                    return
            elif not self.failed and not self.redo:  # after a lost connection, flush once it is back
                self._flush_if_due()
            self._wait(self._timeout())
            self._handle_events()

    def _target_draining(self) -> bool:
        """The pipeline's end, when the plan is done or on a stop: wait for
        the target's writes in flight, then one flush makes every completed
        write durable. A stop waits for nothing else: reads in flight are
        abandoned (a slow source could take many seconds to answer them all;
        copy_image cuts those connections) and nothing that failed is
        retried; those items stay above the cursor, copied again on resume.
        False once there is nothing left to wait for."""
        if not any(self.dst_busy) and not self.flushes and self.unflushed:
            self._flush()
        return any(self.dst_busy) or bool(self.flushes)

    def _timeout(self) -> float:
        if self.held is not None and not self.run.stop.is_set():
            return min(TICK_S, max(0.001, self.run.limit.wait_time(self.held[1])))
        return TICK_S

    def _issue(self) -> None:
        run = self.run
        while not run.stop.is_set() and self.in_flight < self.max_in_flight:
            if self.held is None:
                claimed = run.claim()
                if claimed is None:
                    self.claimed_all = True
                    return
                index, item = claimed
                self.extents[index] = item
                self.held = (index, 0.0 if item.zero else run.limit.reserve(item.length))
            index, slot_end = self.held
            if slot_end and run.limit.wait_time(slot_end) > 0:
                return  # its bandwidth slot has not come yet
            self.held = None
            item = self.extents[index]
            if item.zero:
                self._zero(index)
            else:
                self._read(index)

    @staticmethod
    def _least_busy(busy: list[set[int]], among: list[int] | None = None) -> int:
        """The connection (of `among`, or of all when `among` is empty or
        not given) with the fewest requests in flight: a slow connection
        gets fewer, and reads and writes each spread evenly."""
        return min(among or range(len(busy)), key=lambda position: len(busy[position]))

    def _read(self, index: int) -> None:
        item = self.extents[index]
        buffer = self._buffer(item.length)
        position = self._least_busy(self.src_busy)
        handle = self.conns.srcs[position]
        self._submit("read", position, index, buffer, handle.aio_pread, buffer, item.offset)

    def _write(self, index: int, buffer: nbd.Buffer) -> None:
        position = self._least_busy(self.dst_busy)
        handle = self.conns.dsts[position]
        self._submit("write", position, index, buffer, handle.aio_pwrite, buffer, self.extents[index].offset)

    def _zero(self, index: int) -> None:
        run, item = self.run, self.extents[index]
        position = self._least_busy(self.dst_busy)
        handle = self.conns.dsts[position]
        if run.target_is_zeroed:
            self._done(index, "skipped")
        elif handle.can_zero():
            self._submit("zero", position, index, None, handle.aio_zero, item.length, item.offset)
        else:
            self._done(index, run_sync(self.conns, item, run))

    def _submit(self, kind: str, position: int, index: int, buffer, call, *args) -> None:
        """Send one request; its completion queues (kind, position, index,
        buffer, errno, generation)."""
        generation = self.conns.generation
        if kind != "flush":
            (self.src_busy if kind == "read" else self.dst_busy)[position].add(index)
            self.in_flight += 1

        def done(error) -> int:
            self.events.append((kind, position, index, buffer, error.value, generation))
            return 1

        try:
            call(*args, completion=done)
        except nbd.Error as exc:  # refused before it was sent: a dead or broken connection
            self.events.append((kind, position, index, buffer, exc.errnum or errno_codes.EIO, generation))

    def _handle_events(self) -> None:
        while self.events:
            kind, position, index, buffer, error, generation = self.events.popleft()
            if generation != self.conns.generation:
                continue  # a late answer on a replaced connection; the item is already being retried
            if kind == "flush":
                self._flushed(index, error)
                continue
            busy = (self.src_busy if kind == "read" else self.dst_busy)[position]
            if index not in busy:
                continue  # already given up with its lost connection
            busy.discard(index)
            self.in_flight -= 1
            if error:
                self._release(buffer)
                self.failed.append(index)
            elif kind != "read":
                self._release(buffer)
                self._done(index, "copied" if kind == "write" else "zeroed")
            elif self.run.stop.is_set():
                self._release(buffer)  # stopping: not written, so it stays above the cursor
            elif buffer.is_zero():
                # Data that reads as zeros is written as a zero request.
                self._release(buffer)
                self._zero(index)
            else:
                self._write(index, buffer)

    def _done(self, index: int, outcome: str) -> None:
        self.run.finish(self.extents[index], outcome)
        self.unflushed.append(index)
        self.unflushed_bytes += self.extents[index].length

    def _watch(self) -> None:
        """(Re)build the poll set after the connections changed."""
        self.watched_generation = self.conns.generation
        for fd in self.polled:
            self.poller.unregister(fd)
        self.polled.clear()
        self.owners = {}
        for side, busy in ((self.conns.srcs, self.src_busy), (self.conns.dsts, self.dst_busy)):
            for position, handle in enumerate(side):
                self.owners[handle.aio_get_fd()] = (handle, side, busy, position)
        self.dead.clear()

    def _arm(self) -> bool:
        """Poll each live socket for what its connection waits on now (libnbd's
        direction); False when no connection is alive."""
        if self.watched_generation != self.conns.generation:
            self._watch()
        polled, dead = self.polled, self.dead
        for fd, (handle, *_) in self.owners.items():
            if fd in dead:
                continue
            events = POLL_EVENTS[handle.aio_get_direction() & _DIRECTIONS]
            if polled.get(fd) != events:
                if fd in polled:
                    self.poller.modify(fd, events)
                else:
                    self.poller.register(fd, events)
                polled[fd] = events
        return bool(polled)

    def _wait(self, timeout_s: float) -> None:
        """Wait on every socket at once; let libnbd read and write what is
        ready. The loop's hot path: it runs once or twice per request."""
        if not self._arm():
            return  # every connection is dead: the retry reconnects them
        polled, dead = self.polled, self.dead
        for fd, revents in self.poller.poll(math.ceil(timeout_s * 1000)):
            handle, side, busy, position = self.owners[fd]
            try:
                if revents & select.POLLOUT:
                    handle.aio_notify_write()
                if revents & POLL_IN:
                    handle.aio_notify_read()
            except nbd.Error:
                # The call fails when libnbd loses the connection; a failed
                # request is reported by its own completion instead.
                if handle.aio_is_dead():
                    revents |= POLL_BROKEN
            if revents & POLL_BROKEN:
                # A dead connection: nothing more comes from it until the retry reconnects.
                dead.add(fd)
                self.poller.unregister(fd)
                del polled[fd]
                self._lost(side, busy, position)

    def _lost(self, side: list[nbd.NBD], busy: list[set[int]], position: int) -> None:
        """A dead connection answers nothing more: what was in flight on it
        is copied again once the pipeline has drained."""
        self.failed.extend(busy[position])
        self.in_flight -= len(busy[position])
        busy[position].clear()
        if side is self.conns.dsts:
            for flush_id, (target, batch) in list(self.flushes.items()):
                if target == position:
                    self.redo.extend(batch)
                    del self.flushes[flush_id]

    def _retry_failed(self) -> None:
        failed, self.failed = sorted(set(self.failed)), []
        redo, self.redo = sorted(set(self.redo)), []
        for index in failed:
            self._done(index, retrying(self.conns, self.extents[index], self.run))
        for index in redo:  # counted when first written
            retrying(self.conns, self.extents[index], self.run)
            self.unflushed.append(index)
        self.last_flush = 0  # make them durable before going on

    # --- durability ----------------------------------------------------
    def _flush_if_due(self) -> None:
        if not self.flushes and (time.monotonic() - self.last_flush >= self.run.flush_interval_s
                                 or self.unflushed_bytes >= self.run.flush_bytes):
            self._flush()

    def _flush(self) -> None:
        """One flush makes every write completed before it durable, on
        whichever target connection it was written: the target has
        multi-conn when there are several (copy_image keeps one otherwise),
        and multi-conn promises exactly that. One flush per batch, not one
        per connection: each is an fdatasync of the whole image on a file
        target, and more of them only stall its writers."""
        self.last_flush = time.monotonic()
        batch, self.unflushed, self.unflushed_bytes = self.unflushed, [], 0
        if not batch:
            return
        live = [position for position, handle in enumerate(self.conns.dsts) if not handle.aio_is_dead()]
        position = self._least_busy(self.dst_busy, live)
        handle = self.conns.dsts[position]
        if not handle.can_flush():
            self._durable(batch)
            return
        self.flush_count += 1
        self.flushes[self.flush_count] = (position, batch)
        self._submit("flush", position, self.flush_count, None, handle.aio_flush)

    def _flushed(self, flush_id: int, error: int) -> None:
        if flush_id not in self.flushes:
            return  # its connection was lost; its items are being written again
        position, batch = self.flushes.pop(flush_id)
        if error and self.conns.dsts[position].aio_is_dead():
            self.redo.extend(batch)  # its connection died: written again, and flushed, once it is back
        elif error:
            raise CopyError(f"flush of the target failed: {os.strerror(error)}")
        else:
            self._durable(batch)

    def _durable(self, batch: list[int]) -> None:
        self.run.make_durable(batch)
        for index in batch:
            del self.extents[index]

    # --- buffers -------------------------------------------------------
    def _buffer(self, length: int) -> nbd.Buffer:
        pool = self.free_buffers.get(length)
        return pool.pop() if pool else nbd.Buffer(length)

    def _release(self, buffer: nbd.Buffer | None) -> None:
        """Every buffer goes back to its size's pool, never to the garbage
        collector: libnbd 1.14's Python aio calls keep a reference to each
        buffer they are given (measured: a fresh buffer per request is never
        freed). Reusing a few buffers of a few sizes (chunks, and the
        power-of-two pieces of extent tails) bounds that to the data in
        flight; each size's pool holds at most the requests that were in
        flight at once."""
        if buffer is not None:
            self.free_buffers.setdefault(buffer.size(), []).append(buffer)

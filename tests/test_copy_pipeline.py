"""The copy engine's pipelines: many requests in flight per connection,
source and target connection counts apart. Real nbdkit servers, real
libnbd; data is checked by sha256, never by timing."""

import random
import socket
import subprocess
import threading

import pytest

from tests.helpers import MiB, make_image, sha256, wait_until
from vma_agent import nbdkit
from vma_agent.copy import CopyCancelled, CopyError, RateLimit, copy_image

pytestmark = pytest.mark.integration


def odd_image(path, seed=3):
    """Odd size, holes, zero runs inside data, data in the last partial block."""
    size = 21 * MiB + 12_345
    image = make_image(path, size, [(0, 3 * MiB + 7), (5 * MiB, 4 * MiB), (13 * MiB + 511, 2 * MiB),
                                    (size - 777, 777)], seed=seed)
    with open(image, "r+b") as f:  # runs of allocated zeros inside the data
        for offset in (MiB, 6 * MiB + 4096, 14 * MiB):
            f.seek(offset)
            f.write(bytes(MiB + 100))
    return image, size


@pytest.mark.parametrize("connections,target_connections,depth,chunk", [
    (1, 1, 1, MiB),  # one request at a time: the old engine's shape
    (4, 4, 64, 256 * 1024),  # nbdcopy's shape
    (2, 4, 32, MiB),  # more target connections than source connections
    (4, 1, 8, 64 * 1024),  # a VMware-like source limit against a single target
    (3, 2, 5, 3 * MiB + 1),  # odd numbers everywhere
])
def test_pipelines_copy_an_odd_disk_exactly(tmp_path, serve, connections, target_connections, depth, chunk):
    src, size = odd_image(tmp_path / "src.img")
    dst = make_image(tmp_path / "dst.img", size, [(0, size)], seed=99)  # a used volume: everything must be rewritten
    result = copy_image(serve("--readonly", "file", str(src)).uri, serve("file", str(dst)).uri,
                        connections=connections, target_connections=target_connections, depth=depth,
                        chunk_bytes=chunk)
    assert sha256(dst) == sha256(src)
    assert result.bytes_copied + result.bytes_zeroed + result.bytes_skipped == size
    assert result.bytes_zeroed >= 3 * MiB  # the zero runs inside data went as zero requests


def test_an_extent_list_copy_through_deep_pipelines_touches_only_the_listed_areas(tmp_path, serve):
    size = 32 * MiB
    old = make_image(tmp_path / "old.img", size, [(0, size)], seed=1)
    new = tmp_path / "new.img"
    new.write_bytes(old.read_bytes())
    rng = random.Random(5)
    areas = [(rng.randrange(0, size - MiB) // 512 * 512, rng.choice([512, 4096, 65536, 300_000]))
             for _ in range(200)]
    with open(new, "r+b") as f:
        for offset, length in areas:
            f.seek(offset)
            f.write(rng.randbytes(length))
    dst = tmp_path / "dst.img"
    dst.write_bytes(old.read_bytes())
    result = copy_image(serve("--readonly", "file", str(new)).uri, serve("file", str(dst)).uri,
                        extents=areas, connections=2, depth=64, chunk_bytes=64 * 1024)
    assert sha256(dst) == sha256(new)
    assert result.bytes_read <= sum(length for _, length in areas)


def test_cancel_with_many_requests_in_flight_commits_only_what_reached_the_target(tmp_path, serve):
    size = 64 * MiB
    src = make_image(tmp_path / "src.img", size, [(0, size)], seed=4)
    dst = make_image(tmp_path / "dst.img", size, [])
    # Slow reads keep 64 requests outstanding per connection; the target's
    # writeback cache holds writes until a flush, so only a flush puts them
    # in the file: what the cursor covers must be in the file.
    source = serve("--readonly", "--filter=delay", "file", str(src), "rdelay=200ms")
    target = serve("--filter=cache", "file", str(dst), "cache=writeback")
    cancel, cursors = threading.Event(), []
    progress = []
    thread = threading.Thread(target=lambda: progress.append(_cancelled(
        source.uri, target.uri, cancel, cursors)), daemon=True)
    thread.start()
    wait_until(lambda: cursors and cursors[-1] >= 4 * MiB, 60, "part of the disk committed")
    cancel.set()
    thread.join(30)
    assert not thread.is_alive()
    (outcome,) = progress
    assert isinstance(outcome, CopyCancelled) and 4 * MiB <= outcome.cursor < size
    target.kill()  # whatever the cache still held unflushed is lost now
    assert same_prefix(src, dst, outcome.cursor)


def _cancelled(src_uri, dst_uri, cancel, cursors):
    try:
        copy_image(src_uri, dst_uri, connections=2, depth=64, chunk_bytes=64 * 1024, cancel=cancel,
                   checkpoint=cursors.append, checkpoint_interval_s=0.2)
    except CopyCancelled as exc:
        return exc
    return None


def pause_control(path, command: bytes) -> None:
    """Drive nbdkit's pause filter: b"p" holds every request it receives from
    then on (acknowledged with b"P" once those already received are
    answered), b"r" lets them through again."""
    with socket.socket(socket.AF_UNIX) as control:
        control.settimeout(30)
        control.connect(str(path))
        control.sendall(command)
        assert control.recv(1) == command.upper()


def test_a_stop_abandons_the_reads_a_stalled_source_never_answers(tmp_path, sockdir, serve):
    size = 64 * MiB
    src = make_image(tmp_path / "src.img", size, [(0, size)], seed=12)
    dst = make_image(tmp_path / "dst.img", size, [])
    control = sockdir / "pause.sock"
    source = serve("--readonly", "--filter=pause", "--filter=delay", "file", str(src), "rdelay=50ms",
                   f"pause-control={control}")
    target = serve("file", str(dst))
    cancel, copying, outcome = threading.Event(), threading.Event(), []

    def run():
        try:
            copy_image(source.uri, target.uri, chunk_bytes=64 * 1024, cancel=cancel, progress_interval_s=0.05,
                       progress=lambda p: p.bytes_done >= 2 * MiB and copying.set())
            outcome.append("completed")
        except CopyCancelled as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        assert copying.wait(60), "the copy never got going"
        pause_control(control, b"p")  # the source answers nothing more: the pipeline's reads hang
        cancel.set()
        thread.join(60)
        assert not thread.is_alive(), "the stop waited for reads the stalled source never answers"
    finally:
        if thread.is_alive():  # the stop hung on the stalled reads: let them through so the thread ends
            pause_control(control, b"r")
            thread.join(60)
    (cancelled,) = outcome
    assert isinstance(cancelled, CopyCancelled) and 2 * MiB <= cancelled.cursor < size
    # Resumed from a fresh server, as a new run would be: the stalled one may
    # still be failing the requests of the connections that were cut.
    copy_image(serve("--readonly", "file", str(src)).uri, target.uri, resume_from=cancelled.cursor)
    assert sha256(dst) == sha256(src)


def broken_mid_copy(src_uri, dst_uri, fault, **options) -> tuple[CopyError, int]:
    """Run a copy in a thread, call fault() once 2 MiB are committed, and
    return the copy's error and its last committed cursor."""
    cursors, errors = [], []

    def run():
        try:
            copy_image(src_uri, dst_uri, connections=2, depth=32, retries=2, checkpoint=cursors.append,
                       checkpoint_interval_s=0.2, **options)
        except CopyError as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    wait_until(lambda: cursors and cursors[-1] >= 2 * MiB, 60, "the copy under way")
    fault()
    thread.join(60)
    assert not thread.is_alive()
    assert len(errors) == 1, f"the copy did not fail: cursor {cursors[-1]}"
    return errors[0], cursors[-1]


def same_prefix(a_path, b_path, length) -> bool:
    with open(a_path, "rb") as a, open(b_path, "rb") as b:
        return a.read(length) == b.read(length)


def test_a_source_that_dies_with_requests_in_flight_is_a_clear_error(tmp_path, serve):
    size = 64 * MiB
    src = make_image(tmp_path / "src.img", size, [(0, size)], seed=5)
    dst = make_image(tmp_path / "dst.img", size, [])
    source = serve("--readonly", "--filter=delay", "file", str(src), "rdelay=200ms")
    error, cursor = broken_mid_copy(source.uri, serve("file", str(dst)).uri, source.kill, chunk_bytes=256 * 1024)
    assert "read failed at offset" in str(error) and "length 262144" in str(error), error
    assert "connection lost and cannot connect" in str(error), error
    assert same_prefix(src, dst, cursor)  # what the cursor covered is on the target, whole


def test_a_target_that_starts_refusing_writes_mid_pipeline_fails_the_copy_naming_the_write(tmp_path, serve):
    size = 64 * MiB
    src = make_image(tmp_path / "src.img", size, [(0, size)], seed=6)
    dst = make_image(tmp_path / "dst.img", size, [])
    trigger = tmp_path / "target-broken"
    source = serve("--readonly", "--filter=delay", "file", str(src), "rdelay=200ms")
    target = serve("--filter=error", "file", str(dst), "error-pwrite=EIO", "error-pwrite-rate=100%",
                   f"error-pwrite-file={trigger}")
    error, cursor = broken_mid_copy(source.uri, target.uri, trigger.touch, chunk_bytes=64 * 1024)
    assert "write failed at offset" in str(error) and "length 65536" in str(error), error
    assert "Input/output error" in str(error), error
    assert same_prefix(src, dst, cursor)


def test_a_target_restarted_mid_copy_is_reconnected_and_the_copy_completes(tmp_path, serve):
    """The target's server dies with writes in flight and comes back on the
    same socket: the pipeline reconnects, writes again what it had not made
    durable, and finishes whole, instead of failing the copy."""
    size = 48 * MiB
    src = make_image(tmp_path / "src.img", size, [(0, size)], seed=11)
    dst = make_image(tmp_path / "dst.img", size, [])
    slow_target = ("--filter=delay", "file", str(dst), "wdelay=30ms")  # writes still in flight when it dies
    target = serve(*slow_target)
    restarted: list[subprocess.Popen] = []

    def restart_target_once(progress) -> None:
        if restarted or progress.bytes_done < 12 * MiB:
            return
        target.kill()
        target.socket.unlink(missing_ok=True)
        restarted.append(subprocess.Popen(["nbdkit", "--foreground", "--exit-with-parent", "--unix",
                                           str(target.socket), *slow_target], stderr=subprocess.DEVNULL))
        wait_until(lambda: target.socket.exists() and nbdkit.socket_accepts(target.socket), 10,
                   "the target to serve again", interval=0.02)

    try:
        source = serve("--readonly", "--filter=delay", "file", str(src), "rdelay=30ms")
        result = copy_image(source.uri, target.uri, connections=2, target_connections=2, depth=8,
                            chunk_bytes=256 * 1024, progress=restart_target_once, progress_interval_s=0.05,
                            checkpoint_interval_s=0.01, flush_bytes=256 * 1024, retries=6)
    finally:
        for process in restarted:
            process.terminate()
            process.wait()
    assert restarted, "the copy ended before the target was restarted"
    assert result.bytes_read >= size
    assert sha256(dst) == sha256(src)


def test_a_resumed_pipeline_copy_copies_only_above_its_cursor(tmp_path, serve):
    size = 40 * MiB + 3
    src = make_image(tmp_path / "src.img", size, [(0, size)], seed=7)
    dst = make_image(tmp_path / "dst.img", size, [])
    head = 16 * MiB
    with open(src, "rb") as a, open(dst, "r+b") as b:  # an earlier run's committed part
        b.write(a.read(head))
    result = copy_image(serve("--readonly", "file", str(src)).uri, serve("file", str(dst)).uri,
                        resume_from=head, connections=4, depth=32, chunk_bytes=512 * 1024)
    assert sha256(dst) == sha256(src)
    assert result.bytes_read == size - head and result.bytes_resumed == head


def flushes_seen(stats_file) -> int:
    """The flush count nbdkit's stats filter wrote when its server stopped."""
    lines = [line for line in stats_file.read_text().splitlines() if line.startswith("flush:")]
    assert lines, stats_file.read_text()
    return int(lines[0].split()[1].rstrip(","))


def test_flushes_come_every_flush_bytes_so_writeback_runs_beside_the_copy(tmp_path, serve):
    flush_bytes = 8 * MiB
    size = 4 * flush_bytes + MiB
    src = make_image(tmp_path / "src.img", size, [(0, size)], seed=8)
    dst = make_image(tmp_path / "dst.img", size, [])
    target = serve("--filter=stats", "file", str(dst), f"statsfile={tmp_path / 'stats.txt'}", "statsappend=true")
    copy_image(serve("--readonly", "file", str(src)).uri, target.uri, connections=1, depth=16,
               checkpoint_interval_s=3600, flush_interval_s=3600, flush_bytes=flush_bytes)
    target.stop()
    # At least one flush while copying (the next waits for the one in
    # flight, so not quite one per flush_bytes), and the last one.
    assert flushes_seen(tmp_path / "stats.txt") >= 2
    assert sha256(dst) == sha256(src)


def test_a_slow_copy_flushes_every_flush_interval_however_little_it_wrote(tmp_path, serve):
    """A copy from a slow source (a LAN) writes far less than flush_bytes per
    second: it still flushes every flush_interval_s, so it ends with little
    left to flush. 12 MiB at 8 MiB/s takes at least 1.4 s: some 6 flushes
    every 0.25 s, and 1 (the last) without them."""
    size = 12 * MiB
    src = make_image(tmp_path / "src.img", size, [(0, size)], seed=9)
    dst = make_image(tmp_path / "dst.img", size, [])
    target = serve("--filter=stats", "file", str(dst), f"statsfile={tmp_path / 'stats.txt'}", "statsappend=true")
    copy_image(serve("--readonly", "file", str(src)).uri, target.uri, limit=RateLimit(8 * MiB),
               checkpoint_interval_s=3600, flush_interval_s=0.25)
    target.stop()
    assert flushes_seen(tmp_path / "stats.txt") >= 3
    assert sha256(dst) == sha256(src)


def test_one_flush_covers_the_writes_of_every_target_connection(tmp_path, serve):
    """The target has multi-conn: a flush on one connection makes the writes
    completed on all of them durable, so a batch costs one flush, not one per
    connection (each is an fdatasync of the whole image on a file target).
    Flushing each of the 4 connections would take about 12 here."""
    flush_bytes = 8 * MiB
    size = 8 * flush_bytes
    src = make_image(tmp_path / "src.img", size, [(0, size)], seed=10)
    dst = make_image(tmp_path / "dst.img", size, [])
    target = serve("--filter=stats", "file", str(dst), f"statsfile={tmp_path / 'stats.txt'}", "statsappend=true")
    copy_image(serve("--readonly", "file", str(src)).uri, target.uri, connections=4, target_connections=4,
               depth=4, chunk_bytes=MiB, checkpoint_interval_s=3600, flush_interval_s=3600,
               flush_bytes=flush_bytes)
    target.stop()
    assert 2 <= flushes_seen(tmp_path / "stats.txt") <= size // flush_bytes + 1
    assert sha256(dst) == sha256(src)


def test_memory_stays_bounded_over_thousands_of_odd_sized_areas(tmp_path, serve):
    """libnbd 1.14's Python aio calls keep every buffer they are given: a
    fresh buffer per odd-sized area would hold the whole copy in memory
    (1200 areas of ~160 KiB: 190 MiB). Pooled power-of-two buffers keep the
    engine's Python memory to its requests in flight."""
    import tracemalloc

    size = 256 * MiB
    src = make_image(tmp_path / "src.img", size, [(offset, 64 * MiB) for offset in range(0, size, 64 * MiB)],
                     seed=9)
    dst = make_image(tmp_path / "dst.img", size, [])
    areas = [(index * 212_992, 131_072 + 4097 * (index % 8) + index % 13) for index in range(1200)]
    tracemalloc.start()
    try:
        result = copy_image(serve("--readonly", "file", str(src)).uri, serve("file", str(dst)).uri, extents=areas,
                            zero_unlisted=False, connections=2, depth=8, chunk_bytes=2 * MiB)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    copied = sum(length for _, length in areas)
    assert result.bytes_read == copied > 150 * MiB
    assert peak < 48 * MiB, f"{peak / MiB:.0f} MiB of Python memory for {copied / MiB:.0f} MiB copied"
    with open(src, "rb") as a, open(dst, "rb") as b:
        for offset, length in areas[::97]:
            a.seek(offset)
            b.seek(offset)
            assert a.read(length) == b.read(length)

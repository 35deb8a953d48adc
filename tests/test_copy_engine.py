"""The copy engine against real nbdkit servers and real libnbd (no Django)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading

import pytest

from tests.helpers import PROJECT_ROOT, MiB, NbdkitProcess, make_image, sha256, wait_until
from vma_agent.copy import CopyCancelled, CopyError, RateLimit, coalesce, copy_image, dirty_areas
from vma_agent.copy.ratelimit import CATCH_UP_S

pytestmark = pytest.mark.integration


def test_full_copy_of_sparse_odd_sized_image_matches_source(tmp_path, serve):
    size = 9 * MiB + 4097  # not a multiple of the chunk size
    src = make_image(tmp_path / "src.img", size, [(0, MiB + 3), (5 * MiB, 300_000), (size - 4097, 4097)])
    dst = make_image(tmp_path / "dst.img", size, [])
    calls = []
    result = copy_image(serve("--readonly", "file", str(src)).uri, serve("file", str(dst)).uri,
                        chunk_bytes=MiB, progress=calls.append, progress_interval_s=0)
    assert sha256(dst) == sha256(src)
    assert result.size == size
    # Only allocated data is counted and copied; holes become zero requests.
    assert 0 < result.bytes_allocated < size // 2
    assert result.bytes_copied <= result.bytes_allocated
    assert result.bytes_copied + result.bytes_zeroed == size
    done = [c.bytes_done for c in calls]
    assert done == sorted(done), "progress never goes backwards"
    assert calls[0].bytes_done == 0
    assert calls[-1].bytes_done == result.bytes_allocated and calls[-1].percent == 100.0


def test_copy_onto_a_used_volume_clears_what_the_source_no_longer_has(tmp_path, serve):
    size = 6 * MiB + 1
    src = make_image(tmp_path / "src.img", size, [(2 * MiB, MiB)], seed=7)
    dst = make_image(tmp_path / "dst.img", size, [(0, size)], seed=8)  # old data everywhere
    copy_image(serve("--readonly", "file", str(src)).uri, serve("file", str(dst)).uri, chunk_bytes=MiB)
    assert sha256(dst) == sha256(src)


def test_full_copy_from_an_area_list_zeroes_the_rest_of_a_used_volume(tmp_path, serve):
    # A VMware full copy lists the allocated areas ("*"); a volume holding an
    # older copy must not keep old data outside them.
    size = 6 * MiB + 4097
    areas = [(MiB, MiB), (size - 4097, 4097)]
    src = make_image(tmp_path / "src.img", size, areas, seed=3)
    dst = make_image(tmp_path / "dst.img", size, [(0, size)], seed=4)
    result = copy_image(serve("--readonly", "file", str(src)).uri, serve("file", str(dst)).uri, extents=areas,
                        zero_unlisted=True, chunk_bytes=MiB)
    assert sha256(dst) == sha256(src)
    assert result.bytes_allocated == MiB + 4097


def test_allocated_chunk_of_zeros_is_written_as_zero_request(tmp_path, serve):
    size = 4 * MiB
    src = tmp_path / "src.img"
    src.write_bytes(bytes(size))  # allocated on disk, but all zeros
    dst = make_image(tmp_path / "dst.img", size, [(0, size)])
    result = copy_image(serve("--readonly", "file", str(src)).uri, serve("file", str(dst)).uri, chunk_bytes=MiB)
    assert result.bytes_copied == 0
    assert result.bytes_zeroed == size
    assert sha256(dst) == sha256(src)


def test_size_mismatch_is_refused_before_copying(tmp_path, serve):
    src = make_image(tmp_path / "src.img", 2 * MiB, [(0, MiB)])
    dst = make_image(tmp_path / "dst.img", MiB, [(0, MiB)], seed=3)
    before = sha256(dst)
    with pytest.raises(CopyError, match="target is 1048576 bytes but the source is 2097152 bytes"):
        copy_image(serve("--readonly", "file", str(src)).uri, serve("file", str(dst)).uri)
    assert sha256(dst) == before


def test_a_larger_target_holds_the_disk_in_its_first_bytes(tmp_path, serve):
    """A cloud volume rounded up to its offering's unit: the copy fills the
    source's size and leaves the rest alone."""
    src = make_image(tmp_path / "src.img", 2 * MiB, [(0, MiB), (MiB + 4096, 8192)])
    dst = make_image(tmp_path / "dst.img", 3 * MiB, [(0, 3 * MiB)], seed=5)
    tail = dst.read_bytes()[2 * MiB:]
    copy_image(serve("--readonly", "file", str(src)).uri, serve("file", str(dst)).uri)
    data = dst.read_bytes()
    assert data[:2 * MiB] == src.read_bytes() and data[2 * MiB:] == tail


def test_read_error_names_offset_and_length(tmp_path, serve):
    size = 4 * MiB
    src = make_image(tmp_path / "src.img", size, [(0, size)])
    dst = tmp_path / "dst.img"
    with open(dst, "wb") as f:
        f.truncate(size)
    failing = serve("--readonly", "--filter=error", "file", str(src), "error-pread=EIO", "error-pread-rate=100%")
    with pytest.raises(CopyError, match=r"read failed at offset \d+ length 1048576: .*Input/output error"):
        copy_image(failing.uri, serve("file", str(dst)).uri, chunk_bytes=MiB)


def test_unreachable_source_is_a_clear_error(tmp_path, serve):
    dst = make_image(tmp_path / "dst.img", MiB, [])
    with pytest.raises(CopyError, match="cannot connect to nbd\\+unix:///\\?socket=/nonexistent.sock"):
        copy_image("nbd+unix:///?socket=/nonexistent.sock", serve("file", str(dst)).uri)


def test_progress_callback_exception_stops_the_copy(tmp_path, serve):
    size = 8 * MiB
    src = make_image(tmp_path / "src.img", size, [(0, size)])
    dst = make_image(tmp_path / "dst.img", size, [])

    class Stop(Exception):
        pass

    def cancel_after_first_chunk(progress):
        if progress.bytes_done > 0:
            raise Stop

    with pytest.raises(Stop):
        copy_image(serve("--readonly", "file", str(src)).uri, serve("file", str(dst)).uri,
                   chunk_bytes=MiB, progress=cancel_after_first_chunk, progress_interval_s=0)


def test_all_holes_disk_reads_nothing(tmp_path, serve):
    size = 64 * MiB + 511
    src = make_image(tmp_path / "src.img", size, [])
    dst = make_image(tmp_path / "dst.img", size, [(0, size)], seed=4)
    result = copy_image(serve("--readonly", "file", str(src)).uri, serve("file", str(dst)).uri, chunk_bytes=MiB)
    assert result.bytes_allocated == 0 and result.bytes_read == 0 and result.bytes_copied == 0
    assert sha256(dst) == sha256(src)


def test_fresh_target_skips_zero_extents(tmp_path, serve):
    size = 16 * MiB
    src = make_image(tmp_path / "src.img", size, [(MiB, MiB)])
    dst = make_image(tmp_path / "dst.img", size, [])
    result = copy_image(serve("--readonly", "file", str(src)).uri, serve("file", str(dst)).uri,
                        chunk_bytes=MiB, target_is_zeroed=True)
    assert result.bytes_zeroed == 0 and result.bytes_skipped == size - result.bytes_copied
    assert sha256(dst) == sha256(src)


def test_coalesce_merges_overlapping_and_adjacent_areas():
    assert coalesce([(100, 50), (0, 10), (10, 5), (120, 100), (500, 0), (900, 200)], size=1000) == [
        (0, 15), (100, 120), (900, 100)]


def test_extent_list_copy_brings_a_stale_target_up_to_date(tmp_path, serve):
    size = 8 * MiB + 123
    old = make_image(tmp_path / "old.img", size, [(0, size)], seed=1)
    dst = tmp_path / "dst.img"
    shutil.copy(old, dst)
    src = tmp_path / "src.img"
    shutil.copy(old, src)
    changed = [(MiB, 4096), (MiB + 2048, 8192), (MiB + 10240, 100), (5 * MiB, 3 * MiB + 123), (5 * MiB, 10)]
    with open(src, "r+b") as f:
        for offset, length in changed:
            f.seek(offset)
            f.write(bytes([7]) * length)
    result = copy_image(serve("--readonly", "file", str(src)).uri, serve("file", str(dst)).uri,
                        extents=changed, chunk_bytes=MiB)
    assert sha256(dst) == sha256(src)
    union = sum(length for _, length in coalesce(changed, size))
    assert result.bytes_read == union == result.bytes_allocated
    assert result.bytes_skipped == size - union


def test_empty_extent_list_completes_at_once_at_100_percent(tmp_path, serve):
    src = make_image(tmp_path / "src.img", 4 * MiB, [(0, 4 * MiB)])
    dst = make_image(tmp_path / "dst.img", 4 * MiB, [])
    calls = []
    result = copy_image(serve("--readonly", "file", str(src)).uri, serve("file", str(dst)).uri,
                        extents=[], progress=calls.append)
    assert result.bytes_read == 0 and result.bytes_copied == 0
    assert calls and calls[-1].percent == 100.0


def test_interrupted_copy_resumes_from_its_cursor_without_recopying(tmp_path, serve):
    size = 32 * MiB + 7
    src = make_image(tmp_path / "src.img", size, [(0, size)], seed=3)
    dst = make_image(tmp_path / "dst.img", size, [])
    src_uri, dst_uri = serve("--readonly", "file", str(src)).uri, serve("file", str(dst)).uri
    cursors = []

    class WorkerKilled(Exception):
        pass

    def die_halfway(progress):
        if progress.bytes_done >= size // 2:
            raise WorkerKilled

    with pytest.raises(WorkerKilled):
        copy_image(src_uri, dst_uri, chunk_bytes=MiB, progress=die_halfway, progress_interval_s=0,
                   checkpoint=cursors.append, checkpoint_interval_s=0, limit=RateLimit(64 * MiB),
                   connections=1)
    cursor = cursors[-1]
    assert size // 4 < cursor < size, "the cursor was committed mid-disk"
    assert sha256(dst) != sha256(src)

    calls = []
    result = copy_image(src_uri, dst_uri, chunk_bytes=MiB, resume_from=cursor, progress=calls.append)
    assert sha256(dst) == sha256(src)
    assert result.bytes_read == size - cursor, "nothing below the cursor is read again"
    assert calls[0].bytes_done == cursor, "progress resumes where it stopped"


class TimeLimit(Exception):
    pass


def test_a_signal_raised_in_the_copy_loop_stops_the_threads_and_commits_the_cursor(tmp_path, serve):
    # Celery's soft time limit arrives as an exception raised by a signal
    # handler wherever the main thread is: the copy threads must stop (and
    # the cursor be committed) before their connections are closed.
    size = 64 * MiB
    src = make_image(tmp_path / "src.img", size, [(0, size)], seed=5)
    dst = make_image(tmp_path / "dst.img", size, [])
    checkpoints = []

    def alarm(*_):
        raise TimeLimit()

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, 1.0)
    try:
        with pytest.raises(TimeLimit):
            copy_image(serve("--readonly", "file", str(src)).uri, serve("file", str(dst)).uri, chunk_bytes=MiB,
                       limit=RateLimit(8 * MiB), checkpoint=checkpoints.append, checkpoint_interval_s=60)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert not [t.name for t in threading.enumerate() if t.name.startswith("copy-")]
    assert checkpoints and 0 < checkpoints[-1] < size


def test_cancel_stops_within_a_second_with_the_cursor_committed(tmp_path, serve):
    size = 64 * MiB
    src = make_image(tmp_path / "src.img", size, [(0, size)], seed=5)
    dst = make_image(tmp_path / "dst.img", size, [])
    src_uri, dst_uri = serve("--readonly", "file", str(src)).uri, serve("file", str(dst)).uri
    cancel = threading.Event()
    copying = threading.Event()
    outcome = {}

    def run():
        try:
            copy_image(src_uri, dst_uri, chunk_bytes=MiB, limit=RateLimit(8 * MiB), cancel=cancel,
                       progress=lambda p: p.bytes_done >= 2 * MiB and copying.set(), progress_interval_s=0.05)
        except CopyCancelled as exc:
            outcome["cursor"] = exc.cursor

    thread = threading.Thread(target=run)
    thread.start()
    assert copying.wait(30), "the copy never got going"
    cancel.set()
    thread.join(30)
    assert not thread.is_alive(), "the copy did not stop when cancelled"
    assert 0 < outcome["cursor"] < size
    copy_image(src_uri, dst_uri, chunk_bytes=MiB, resume_from=outcome["cursor"])
    assert sha256(dst) == sha256(src)


class FakeClock:
    """A clock the rate limit sleeps on: sleeping advances it, nothing waits."""

    def __init__(self):
        self.now, self.slept = 1000.0, 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.slept += seconds


def test_the_rate_limit_spaces_reads_at_its_rate_and_follows_a_change_at_once():
    clock = FakeClock()
    limit = RateLimit(3 * MiB, clock=clock, sleep=clock.sleep)
    never = threading.Event()
    assert all(limit.acquire(MiB, never) for _ in range(6))
    assert clock.slept == pytest.approx(2.0)  # 6 MiB at 3 MiB/s
    limit.set(None)  # lifted: the next reads wait for nothing
    assert limit.acquire(64 * MiB, never) and clock.slept == pytest.approx(2.0)
    limit.set(MiB)  # lowered: from now on, at the new rate
    assert limit.acquire(MiB, never) and clock.slept == pytest.approx(3.0)
    cancelled = threading.Event()
    cancelled.set()
    assert not limit.acquire(MiB, cancelled)


def test_the_rate_limit_keeps_pace_when_reads_take_their_slots_late_but_saves_no_idle_time():
    clock = FakeClock()
    limit = RateLimit(MiB, clock=clock, sleep=clock.sleep)  # a second per MiB
    start = clock.now
    assert limit.reserve(MiB) == pytest.approx(start + 1.0)
    clock.now = start + 1.01  # the copy loop wakes 10 ms after the slot came
    assert limit.reserve(MiB) == pytest.approx(start + 2.0)  # the next slot follows the last, not the late wake-up
    clock.now = start + 10.0  # then nothing was read for 8 s
    assert limit.reserve(MiB) == pytest.approx(start + 10.0 - CATCH_UP_S + 1.0)  # no more than CATCH_UP_S made up


def test_a_throttled_copy_is_complete(tmp_path, serve):
    size = 6 * MiB
    src = make_image(tmp_path / "src.img", size, [(0, size)], seed=6)
    dst = make_image(tmp_path / "dst.img", size, [])
    copy_image(serve("--readonly", "file", str(src)).uri, serve("file", str(dst)).uri,
               chunk_bytes=MiB, limit=RateLimit(24 * MiB))
    assert sha256(dst) == sha256(src)


def test_source_error_on_one_range_names_that_range(tmp_path, serve):
    size = 8 * MiB
    src = make_image(tmp_path / "src.img", size, [(0, size)], seed=2)
    dst = make_image(tmp_path / "dst.img", size, [])
    # nbdkit's eval plugin: reads at or past 5 MiB fail with EIO.
    failing = serve(
        "--readonly", "eval", f"get_size=echo {size}",
        f"pread=if [ $4 -ge {5 * MiB} ]; then echo 'EIO bad sector' >&2; exit 1; fi; "
        f"dd if={src} iflag=skip_bytes,count_bytes skip=$4 count=$3 status=none",
    )
    with pytest.raises(CopyError, match=f"read failed at offset {5 * MiB} length {MiB}: .*Input/output error"):
        copy_image(failing.uri, serve("file", str(dst)).uri, chunk_bytes=MiB, connections=1, retries=1)


def test_verify_catches_a_target_that_loses_writes(tmp_path, serve):
    size = 4 * MiB
    src = make_image(tmp_path / "src.img", size, [(MiB, MiB)])
    lossy = serve("null", f"size={size}")  # accepts writes, reads back zeros
    with pytest.raises(CopyError, match=f"verification failed: target differs from source at offset {MiB}"):
        copy_image(serve("--readonly", "file", str(src)).uri, lossy.uri, chunk_bytes=MiB, verify=True)
    dst = make_image(tmp_path / "dst.img", size, [])
    result = copy_image(serve("--readonly", "file", str(src)).uri, serve("file", str(dst)).uri, verify=True)
    assert result.verified


def test_dirty_bitmap_incremental_with_qemu_nbd(tmp_path, sockdir):
    size = 16 * MiB
    disk = tmp_path / "disk.qcow2"
    run = lambda *cmd: subprocess.run(cmd, check=True, capture_output=True)  # noqa: E731
    run("qemu-img", "create", "-q", "-f", "qcow2", str(disk), str(size))
    run("qemu-io", "-f", "qcow2", "-c", f"write -P 0x11 0 {size}", str(disk))
    dst = tmp_path / "dst.img"
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(disk), str(dst))  # the full copy
    run("qemu-img", "bitmap", "--add", str(disk), "cbt")
    for offset, length in [(MiB, 65536), (MiB + 65536, 4096), (9 * MiB + 512, 3 * MiB)]:
        run("qemu-io", "-f", "qcow2", "-c", f"write -P 0x22 {offset} {length}", str(disk))
    expected = tmp_path / "expected.img"
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(disk), str(expected))

    sock = sockdir / "q.sock"
    qemu = subprocess.Popen(["qemu-nbd", "--read-only", "--persistent", "-f", "qcow2", "-B", "cbt",
                             f"--socket={sock}", str(disk)])
    target = NbdkitProcess(sockdir, "file", str(dst))
    try:
        wait_until(sock.exists, 10, "qemu-nbd's socket", interval=0.02)
        uri = f"nbd+unix:///?socket={sock}"
        areas = dirty_areas(uri, "cbt")
        changed = sum(length for _, length in areas)
        assert MiB <= changed < 5 * MiB  # dirty granularity rounds up, but far from the whole disk
        result = copy_image(uri, target.uri, extents=areas, chunk_bytes=MiB)
    finally:
        qemu.terminate()
        qemu.wait()
        target.stop()
    assert result.bytes_read == changed
    assert sha256(dst) == sha256(expected)


def test_cli_copies_prints_json_and_resumes_after_sigterm(tmp_path, serve):
    size = 24 * MiB + 5
    src = make_image(tmp_path / "src.img", size, [(0, size)], seed=9)
    dst = make_image(tmp_path / "dst.img", size, [])
    src_uri, dst_uri = serve("--readonly", "file", str(src)).uri, serve("file", str(dst)).uri
    cli = [sys.executable, "-m", "vma_agent.copy", src_uri, dst_uri]
    slow = subprocess.Popen([*cli, "--limit", str(8 * MiB), "--chunk", str(MiB)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, cwd=PROJECT_ROOT)
    def copying() -> bool:
        assert slow.poll() is None, "the CLI exited before copying"
        return os.stat(dst).st_blocks * 512 >= 2 * MiB

    wait_until(copying, 30, "the CLI to be copying")
    slow.send_signal(signal.SIGTERM)
    stopped = json.loads(slow.communicate(timeout=10)[0])
    assert slow.returncode == 130 and stopped["status"] == "cancelled"
    assert 0 < stopped["resume_from"] < size

    done = subprocess.run([*cli, "--resume-from", str(stopped["resume_from"]), "--verify"], capture_output=True,
                          text=True, timeout=60, cwd=PROJECT_ROOT)
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout)
    assert figures["status"] == "completed" and figures["verified"] is True
    assert figures["bytes_read"] == size - stopped["resume_from"]
    assert {"bytes_copied", "bytes_zeroed", "bytes_skipped", "seconds", "throughput_bps"} <= figures.keys()
    assert sha256(dst) == sha256(src)


def test_cli_reports_a_failure_with_exit_1(tmp_path, serve):
    dst = make_image(tmp_path / "dst.img", MiB, [])
    done = subprocess.run([sys.executable, "-m", "vma_agent.copy", "nbd+unix:///?socket=/nonexistent.sock",
                           serve("file", str(dst)).uri], capture_output=True, text=True, timeout=60,
                          cwd=PROJECT_ROOT)
    assert done.returncode == 1
    assert json.loads(done.stdout)["error"].startswith("cannot connect to nbd+unix:///?socket=/nonexistent.sock")


def test_frequent_checkpoints_with_many_connections_complete(tmp_path, serve):
    """Checkpoints while four connections stream must neither stall the copy
    (the threads share no NBD handle) nor commit a cursor past unflushed data."""
    size = 48 * MiB + 3
    src = make_image(tmp_path / "src.img", size, [(0, size)], seed=11)
    dst = make_image(tmp_path / "dst.img", size, [])
    cursors = []
    outcome = {}

    def run():
        outcome["result"] = copy_image(
            serve("--readonly", "file", str(src)).uri, serve("file", str(dst)).uri, chunk_bytes=256 * 1024,
            connections=4, checkpoint=cursors.append, checkpoint_interval_s=0)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "the copy stalled"
    assert sha256(dst) == sha256(src)
    assert cursors == sorted(cursors) and cursors[-1] == size


def test_a_limit_lifted_while_the_copy_runs_lets_it_finish_whole(tmp_path, serve):
    """How fast a copy follows a changed limit is the bench's to measure
    (bench/copy_bench.py); here: lifting it mid-copy, from the copy's own
    progress, lets a copy that would take 16 s at the old rate end, whole."""
    size = 32 * MiB
    src = make_image(tmp_path / "src.img", size, [(0, size)], seed=12)
    dst = make_image(tmp_path / "dst.img", size, [])
    limit = RateLimit(2 * MiB)
    lifted = []

    def progress(p):
        if p.bytes_done >= MiB and not lifted:
            limit.set(None)
            lifted.append(p.bytes_done)

    copy_image(serve("--readonly", "file", str(src)).uri, serve("file", str(dst)).uri, chunk_bytes=MiB,
               limit=limit, progress=progress, progress_interval_s=0.05)
    assert lifted and lifted[0] < size and limit.bytes_per_s is None
    assert sha256(dst) == sha256(src)


def test_a_resumed_copy_compares_below_its_cursor_with_progress_and_resumes_at_the_first_difference(tmp_path, serve):
    size = 24 * MiB + 5
    src = make_image(tmp_path / "src.img", size, [(0, size)], seed=11)
    dst = tmp_path / "dst.img"
    shutil.copyfile(src, dst)
    # The earlier run's data is whole below 9 MiB, differs from 9 MiB + 100 on:
    # a cursor at 20 MiB claims more than the target holds.
    with open(dst, "r+b") as f:
        f.seek(9 * MiB + 100)
        f.write(b"\xff" * (size - 9 * MiB - 100))
    calls = []
    result = copy_image(serve("--readonly", "file", str(src)).uri, serve("file", str(dst)).uri, chunk_bytes=MiB,
                        resume_from=20 * MiB, compare_resumed=True, progress=calls.append, progress_interval_s=0,
                        depth=4)
    assert sha256(dst) == sha256(src)
    assert result.resume_differed_at == 9 * MiB, "the lowest differing chunk, though reads were in flight past it"
    assert result.resume_compared == 9 * MiB
    assert result.resumed_from == 9 * MiB
    done = [c.bytes_done for c in calls]
    assert done == sorted(done), "progress never goes backwards"
    assert 0 < done[0] <= MiB, "the comparison shows progress from its first chunk"


def test_a_cancel_stops_the_comparison_below_the_cursor_with_the_cursor_standing(tmp_path, serve):
    size = 16 * MiB
    src = make_image(tmp_path / "src.img", size, [(0, size)], seed=12)
    dst = tmp_path / "dst.img"
    shutil.copyfile(src, dst)
    cancel = threading.Event()

    def cancel_at_first_progress(progress):
        cancel.set()

    with pytest.raises(CopyCancelled) as stopped:
        copy_image(serve("--readonly", "file", str(src)).uri, serve("file", str(dst)).uri, chunk_bytes=MiB,
                   resume_from=12 * MiB, compare_resumed=True, progress=cancel_at_first_progress,
                   progress_interval_s=0, cancel=cancel)
    assert stopped.value.cursor == 12 * MiB
    assert sha256(dst) == sha256(src), "nothing was written"

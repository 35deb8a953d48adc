"""The copy engine against real nbdkit servers and real libnbd (no Django)."""

import pytest

from tests.helpers import MiB, NbdkitProcess, make_image, sha256
from vma_agent.copy import CopyError, copy_image


@pytest.fixture
def serve(sockdir):
    servers = []

    def start(*args):
        server = NbdkitProcess(sockdir, *args)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def test_full_copy_of_sparse_odd_sized_image_matches_source(tmp_path, serve):
    size = 9 * MiB + 4097  # not a multiple of the chunk size
    src = make_image(tmp_path / "src.img", size, [(0, MiB + 3), (5 * MiB, 300_000), (size - 4097, 4097)])
    dst = tmp_path / "dst.img"
    dst.write_bytes(b"")
    with open(dst, "wb") as f:
        f.truncate(size)
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

"""The local volumes' journal with real qemu-img, qemu-nbd, nbdkit and the
copy engine: a volume's first cycle writes it in place, later cycles write
qcow2 layers of their own; sealed, discarded (the fence), merged, dropped.
Content is checked by sha256 of each chain read back."""

import contextlib
import hashlib
import os
import resource
import secrets
import signal
import subprocess
import threading
import types
from pathlib import Path

import nbd
import pytest

from replication.platforms.base import VolumeError
from replication.platforms.local.volumes import LocalVolumeProvider
from tests.helpers import MiB, free_port, make_image, sha256, slow_nbd_source, wait_until
from vma_agent.copy import CopyError, copy_image, export_size
from vma_agent.nbdkit import process_alive, serve_file_readonly, socket_accepts

pytestmark = pytest.mark.integration

SIZE = 64 * MiB


@pytest.fixture
def provider(tmp_path, sockdir):
    provider = LocalVolumeProvider(tmp_path / "volumes", sockdir)
    yield provider
    provider.stop_export_server()
    for layer in provider.journal.layer_dir.glob("*.qcow2"):
        provider.journal.drop(layer)


def volume(provider, size=SIZE, name="migration-vol-00000000-0000-0000-0000-00000000000a"):
    path = provider.create_volume(name, size)
    return types.SimpleNamespace(export_name=name, size_bytes=size, path=str(path))


def chain_sha(image) -> str:
    """sha256 of what the image (with its backing chain) reads as."""
    out = Path(image).parent.parent / f"read-{secrets.token_hex(4)}.raw"
    try:
        subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", str(image), str(out)], check=True, timeout=120)
        return sha256(out)
    finally:
        out.unlink(missing_ok=True)


def nbd_sha(uri: str) -> str:
    handle = nbd.NBD()
    handle.connect_uri(uri)
    try:
        digest, size = hashlib.sha256(), handle.get_size()
        for offset in range(0, size, 4 * MiB):
            digest.update(handle.pread(min(4 * MiB, size - offset), offset))
        return digest.hexdigest()
    finally:
        handle.shutdown()


def write_cycle(image: Path, areas, seed: int) -> list[tuple[int, int]]:
    """The source changes `areas` (new random data); returns them."""
    make_image(image.with_suffix(".chg"), SIZE, areas, seed=seed)
    with open(image.with_suffix(".chg"), "rb") as chg, open(image, "r+b") as f:
        for offset, length in areas:
            chg.seek(offset)
            f.seek(offset)
            f.write(chg.read(length))
    return areas


def full_first_cycle(provider, vol, src: Path) -> str:
    with serve_file_readonly(src) as uri:
        copy_image(uri, provider.open_layer(vol, "cycle-1", None))
    return provider.seal_layer(vol, "cycle-1", None)


def layer_cycle(provider, vol, src: Path, cycle: str, base: str, areas) -> str:
    with serve_file_readonly(src) as uri:
        copy_image(uri, provider.open_layer(vol, cycle, base), extents=areas)
    return provider.seal_layer(vol, cycle, base)


def test_first_cycle_writes_the_volume_in_place(provider, tmp_path):
    vol = volume(provider)
    src = make_image(tmp_path / "src.img", SIZE, [(0, 3 * MiB), (40 * MiB, 5000)], seed=1)
    assert provider.open_layer(vol, "cycle-1", None) == provider.export_uri(vol.export_name)
    handle = full_first_cycle(provider, vol, src)
    assert handle == str(provider.volume_path(vol.export_name))
    assert sha256(handle) == sha256(src)
    assert "no layer to discard" in provider.discard_layer(vol, "cycle-1", None)
    assert sha256(handle) == sha256(src)
    assert not provider.journal.layer_dir.exists() or not list(provider.journal.layer_dir.iterdir())


def test_a_cycle_writes_its_own_layer_and_leaves_the_point_below_untouched(provider, tmp_path):
    vol = volume(provider)
    src = make_image(tmp_path / "src.img", SIZE, [(0, 8 * MiB), (30 * MiB, 2 * MiB)], seed=1)
    base = full_first_cycle(provider, vol, src)
    before = sha256(base)
    areas = write_cycle(src, [(MiB, 64 * 1024), (5 * MiB, MiB), (31 * MiB, 300 * 1024), (50 * MiB, MiB)], seed=2)

    uri = provider.open_layer(vol, "cycle-2", base)
    assert uri == provider.open_layer(vol, "cycle-2", base)  # found again, same export
    empty = provider.layer_bytes(str(provider.journal.layer_path(vol.export_name, "cycle-2")))
    assert uri.startswith("nbd+unix:///migration-vol-") and ".cycle-2?socket=" in uri
    with serve_file_readonly(src) as src_uri:
        copy_image(src_uri, uri, extents=areas)
    handle = provider.seal_layer(vol, "cycle-2", base)

    assert chain_sha(handle) == sha256(src)
    assert sha256(base) == before, "the point below is byte-identical"
    assert Path(handle).parent == provider.journal.layer_dir
    assert os.stat(handle).st_mode & 0o777 == 0o400
    assert provider.seal_layer(vol, "cycle-2", base) == handle  # sealed again: the same handle
    with pytest.raises(VolumeError, match="sealed"):
        provider.open_layer(vol, "cycle-2", base)
    with pytest.raises(CopyError):
        export_size(uri)  # its export is closed
    changed = sum(length for _, length in areas)
    # The point costs its changed data (and the qcow2 metadata's few clusters), not the disk's size.
    assert changed <= provider.layer_bytes(handle) < changed + empty + 4 * MiB < SIZE // 2


def test_a_layer_server_gone_after_a_restart_is_served_again(provider, tmp_path):
    vol = volume(provider)
    src = make_image(tmp_path / "src.img", SIZE, [(0, 4 * MiB)], seed=1)
    base = full_first_cycle(provider, vol, src)
    areas = write_cycle(src, [(2 * MiB, MiB)], seed=3)
    uri = provider.open_layer(vol, "cycle-2", base)
    with serve_file_readonly(src) as src_uri:
        copy_image(src_uri, uri, extents=areas)  # ends with a flush
    layer = provider.journal.layer_path(vol.export_name, "cycle-2")
    (pid,) = provider.journal.server_pids(layer)
    os.kill(pid, signal.SIGKILL)  # the OMA host restarted
    wait_until(lambda: not process_alive(pid), 10, "the layer's server to be gone")
    again = provider.open_layer(vol, "cycle-2", base)
    assert nbd_sha(again) == sha256(src)
    assert chain_sha(provider.seal_layer(vol, "cycle-2", base)) == sha256(src)


def test_a_layer_over_another_base_is_refused(provider, tmp_path):
    vol = volume(provider)
    base = str(provider.volume_path(vol.export_name))
    provider.open_layer(vol, "cycle-2", base)
    other = make_image(tmp_path / "other.img", SIZE, [])
    with pytest.raises(VolumeError, match="lies over .* not over"):
        provider.open_layer(vol, "cycle-2", str(other))
    with pytest.raises(VolumeError, match="not a plain name"):
        provider.open_layer(vol, "../x", base)


def test_discard_fences_a_copy_that_is_writing(provider, tmp_path, sockdir):
    vol = volume(provider)
    src = make_image(tmp_path / "src.img", SIZE, [(0, 4 * MiB)], seed=1)
    base = full_first_cycle(provider, vol, src)
    before = sha256(base)
    write_cycle(src, [(0, SIZE)], seed=4)
    uri = provider.open_layer(vol, "cycle-2", base)
    slow = slow_nbd_source(sockdir, src, "5ms")
    started, outcome = threading.Event(), {}

    def copy():
        try:
            copy_image(slow.uri, uri, chunk_bytes=256 * 1024, retries=1, progress_interval_s=0,
                       progress=lambda p: p.bytes_done and started.set())
            outcome["result"] = "completed"
        except CopyError as exc:
            outcome["result"] = exc

    thread = threading.Thread(target=copy)
    thread.start()
    try:
        wait_until(started.is_set, 30, "the copy to write into the layer")
        said = provider.discard_layer(vol, "cycle-2", base)
        assert "export closed" in said and "layer removed" in said
        thread.join(60)
        assert not thread.is_alive()
        assert isinstance(outcome["result"], CopyError), outcome
    finally:
        slow.stop()
    with pytest.raises(CopyError):
        export_size(uri)  # the late writer cannot come back
    assert not provider.journal.layer_path(vol.export_name, "cycle-2").exists()
    assert sha256(base) == before
    assert "already discarded" in provider.discard_layer(vol, "cycle-2", base)


def three_points(provider, tmp_path):
    """A volume with three points: the volume file, then two layers."""
    vol = volume(provider)
    src = make_image(tmp_path / "src.img", SIZE, [(0, 4 * MiB)], seed=1)
    p1 = full_first_cycle(provider, vol, src)
    sums = [sha256(src)]
    p2 = layer_cycle(provider, vol, src, "cycle-2", p1,
                     write_cycle(src, [(MiB, MiB), (20 * MiB, 2 * MiB), (60 * MiB, 64 * 1024)], seed=5))
    sums.append(sha256(src))
    p3 = layer_cycle(provider, vol, src, "cycle-3", p2, write_cycle(src, [(20 * MiB, 512 * 1024)], seed=6))
    sums.append(sha256(src))
    return vol, [p1, p2, p3], sums


def test_merge_keeps_every_remaining_point_at_a_cost_of_the_newer_layer(provider, tmp_path):
    vol, (p1, p2, p3), sums = three_points(provider, tmp_path)
    newer_bytes = provider.layer_bytes(p2)
    written_before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_oublock
    assert provider.merge_layers(p1, p2, p3) == p1
    written = (resource.getrusage(resource.RUSAGE_CHILDREN).ru_oublock - written_before) * 512
    assert written <= newer_bytes + MiB, f"merge wrote {written} bytes for a layer of {newer_bytes}"
    assert not Path(p2).exists()
    assert sha256(p1) == sums[1], "the older handle now holds the newer point"
    assert chain_sha(p3) == sums[2]
    assert provider.merge_layers(p1, p2, p3) == p1  # merged already: nothing to do

    assert provider.merge_layers(p1, p3, None) == p1
    assert sha256(p1) == sums[2]
    assert not Path(p3).exists()


def test_merge_of_two_layers_keeps_the_points_around_them(provider, tmp_path):
    vol, (p1, p2, p3), sums = three_points(provider, tmp_path)
    src = tmp_path / "src.img"
    p4 = layer_cycle(provider, vol, src, "cycle-4", p3, write_cycle(src, [(3 * MiB, MiB)], seed=7))
    assert provider.merge_layers(p2, p3, p4) == p2
    assert os.stat(p2).st_mode & 0o777 == 0o400  # still a sealed point
    assert chain_sha(p2) == sums[2]
    assert chain_sha(p4) == sha256(src)
    assert sha256(p1) == sums[0]


@contextlib.contextmanager
def qemu_nbd_serving(sock, image: str, *flags: str):
    """A qemu-nbd holding `image` (and its chain) open, as a test VM would."""
    server = subprocess.Popen(["qemu-nbd", *flags, "-t", "-e", "0", "-f", "qcow2", "-k", str(sock), image])
    try:
        wait_until(lambda: socket_accepts(sock), 10, f"qemu-nbd to serve {image}")
        yield server
    finally:
        server.terminate()
        server.wait(10)


def test_merge_is_refused_while_a_point_it_changes_is_in_use(provider, tmp_path, sockdir):
    vol, (p1, p2, p3), sums = three_points(provider, tmp_path)
    files = [sha256(p) for p in (p1, p2, p3)]
    # A test VM's view of p2's point: a reader of the chain p2 over p1.
    with qemu_nbd_serving(sockdir / "reader.sock", p2, "-r"):
        with pytest.raises(VolumeError, match=r"holds .*open .*end it first"):
            provider.merge_layers(p1, p2, p3)
        assert [sha256(p) for p in (p1, p2, p3)] == files, "nothing changed"

    # A test VM on the newest point (its own overlay over p3, opened as a VM
    # opens it): QEMU's lock keeps p3's header as it is, so the merge waits.
    overlay = tmp_path / "test-vm.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", p3, str(overlay)], check=True)
    with qemu_nbd_serving(sockdir / "reader-3.sock", str(overlay)):
        with pytest.raises(VolumeError, match=r"cycle-3.qcow2 is in use .*Failed to get \"write\" lock"):
            provider.merge_layers(p1, p2, p3)
        assert [sha256(p) for p in (p1, p2, p3)] == files, "nothing changed"
    provider.merge_layers(p1, p2, p3)
    assert chain_sha(p3) == sums[2]


def test_merge_is_refused_while_the_layer_above_is_written(provider, tmp_path):
    vol, (p1, p2, p3), sums = three_points(provider, tmp_path)
    uri = provider.open_layer(vol, "cycle-4", p3)  # a cycle writing over the newest point
    assert uri
    with pytest.raises(VolumeError, match="holds"):
        provider.merge_layers(p2, p3, None)
    above = str(provider.journal.layer_path(vol.export_name, "cycle-4"))
    with pytest.raises(VolumeError, match="is in use .*write.* lock"):
        provider.merge_layers(p2, p3, above)
    assert chain_sha(p3) == sums[2]
    assert chain_sha(above) == sums[2]


def test_drop_removes_layers_only_and_delete_removes_them_all(provider, tmp_path):
    vol, (p1, p2, p3), sums = three_points(provider, tmp_path)
    with pytest.raises(VolumeError, match="not a layer"):
        provider.drop_layer(str(tmp_path / "src.img"))
    provider.drop_layer(p1)  # the volume file: delete(volume)'s, untouched
    assert sha256(p1) == sums[0]
    provider.drop_layer(p3)
    assert not Path(p3).exists()
    provider.open_layer(vol, "cycle-5", p2)
    layer = provider.journal.layer_path(vol.export_name, "cycle-5")
    assert provider.journal.server_pids(layer)
    assert "2 layer(s)" in provider.delete(vol)
    assert not provider.journal.server_pids(layer)
    assert not list(provider.journal.layer_dir.iterdir())
    assert not Path(p1).exists()


def test_a_run_directory_too_deep_for_a_socket_is_refused(tmp_path):
    deep = tmp_path / ("d" * 100)
    provider = LocalVolumeProvider(tmp_path / "volumes", deep)
    vol = volume(provider)
    with pytest.raises(VolumeError, match="too deep for a Unix socket"):
        provider.open_layer(vol, "cycle-2", str(provider.volume_path(vol.export_name)))


@pytest.mark.parametrize("tcp", [False, True])
def test_layers_are_served_over_tls_on_a_socket_or_tcp(tmp_path, sockdir, tcp):
    psk = tmp_path / "export.psk"
    psk.write_text(f"oma:{secrets.token_hex(32)}\n")
    psk.chmod(0o600)
    listen = f"127.0.0.1:{free_port()}" if tcp else ""
    provider = LocalVolumeProvider(tmp_path / "volumes", sockdir, tls_psk_file=psk, listen=listen)
    try:
        vol = volume(provider, size=8 * MiB)
        base = str(provider.volume_path(vol.export_name))
        uri = provider.open_layer(vol, "cycle-2", base)
        export = f"{vol.export_name}.cycle-2"
        if tcp:
            assert uri.startswith("nbds://oma@127.0.0.1:") and uri.endswith(f"/{export}?tls-psk-file={psk}")
            plain = uri.replace("nbds://oma@", "nbd://").split("?")[0]
        else:
            assert uri.startswith(f"nbds+unix://oma@/{export}?socket=") and f"&tls-psk-file={psk}" in uri
            plain = uri.replace("nbds+unix://oma@", "nbd+unix://").split("&")[0]
        src = make_image(tmp_path / "src.img", 8 * MiB, [(MiB, 3 * MiB)], seed=9)
        with serve_file_readonly(src) as src_uri:
            copy_image(src_uri, uri)
        with pytest.raises(CopyError, match="TLS"):
            export_size(plain)
        assert chain_sha(provider.seal_layer(vol, "cycle-2", base)) == sha256(src)
    finally:
        provider.delete(types.SimpleNamespace(export_name="migration-vol-00000000-0000-0000-0000-00000000000a"))
        provider.stop_export_server()


"""Security: the export server over TLS-PSK (copy with the key, refusal
without it), secrets never on command lines, secrets from files."""

import secrets
import subprocess
import sys

import pytest

from replication.platforms.local.volumes import LocalVolumeProvider
from tests.helpers import MiB, make_image, sha256
from vma_agent.copy import CopyError, copy_image, export_size
from vma_agent.nbdkit import serve_file_readonly

pytestmark = pytest.mark.integration


@pytest.fixture
def tls_provider(tmp_path, sockdir):
    psk = tmp_path / "export.psk"
    key = secrets.token_hex(32)
    psk.write_text(f"oma:{key}\n")
    psk.chmod(0o600)
    provider = LocalVolumeProvider(tmp_path / "volumes", sockdir, tls_psk_file=psk)
    provider.ensure_export_server()
    yield provider, key
    provider.stop_export_server()


def command_lines() -> str:
    return subprocess.run(["ps", "-eww", "-o", "args"], capture_output=True, text=True).stdout


def test_export_server_over_tls_psk_copies_and_refuses_clients_without_the_key(tls_provider, tmp_path):
    provider, key = tls_provider
    image = make_image(tmp_path / "src.img", 8 * MiB, [(0, 3 * MiB), (6 * MiB, 4097)], seed=3)
    provider.create_volume("migration-vol-tls", 8 * MiB)
    uri = provider.export_uri("migration-vol-tls")
    assert uri.startswith("nbds+unix://oma@/migration-vol-tls?") and "tls-psk-file=" in uri

    with serve_file_readonly(image) as src:
        result = copy_image(src, uri)
        # The key is read from its file: it is on no command line, the
        # server's included, while the server runs.
        assert key not in command_lines()
        assert "--tls=require" in command_lines()
    assert result.bytes_copied > 0
    assert sha256(provider.volume_path("migration-vol-tls")) == sha256(image)

    plain = f"nbd+unix:///migration-vol-tls?socket={provider.socket_path}"
    with pytest.raises(CopyError, match="TLS"):
        export_size(plain)
    wrong = tmp_path / "wrong.psk"
    wrong.write_text(f"oma:{secrets.token_hex(32)}\n")
    with pytest.raises(CopyError):
        export_size(uri.replace(str(provider.tls_psk_file), str(wrong)))


def test_secrets_come_from_files(tmp_path):
    token_file = tmp_path / "vma-token"
    token_file.write_text("from-a-file\n")
    code = "from django.conf import settings; print(settings.VMA_TOKEN)"
    out = subprocess.run([sys.executable, "-c", f"import django; django.setup(); {code}"], capture_output=True,
                         text=True, env={"PATH": "/usr/bin:/bin", "DJANGO_SETTINGS_MODULE": "oma_site.settings",
                              "VMA_TOKEN_FILE": str(token_file), "PYTHONPATH": "."}, check=False)
    assert out.stdout.strip() == "from-a-file", out.stderr


def test_export_server_on_tcp_for_remote_agents_requires_tls_beyond_loopback(tmp_path, sockdir):
    from replication.platforms.base import VolumeError
    from tests.helpers import free_port

    with pytest.raises(VolumeError, match="without TLS"):
        LocalVolumeProvider(tmp_path / "v", sockdir, listen="0.0.0.0:10809")
    with pytest.raises(VolumeError, match="not IP:PORT"):
        LocalVolumeProvider(tmp_path / "v", sockdir, listen="localhost")

    psk = tmp_path / "export.psk"
    psk.write_text(f"oma:{secrets.token_hex(32)}\n")
    psk.chmod(0o600)
    port = free_port()
    provider = LocalVolumeProvider(tmp_path / "v", sockdir, tls_psk_file=psk, listen=f"127.0.0.1:{port}")
    provider.create_volume("migration-vol-tcp", 4 * MiB)
    provider.ensure_export_server()
    try:
        uri = provider.export_uri("migration-vol-tcp")
        assert uri == f"nbds://oma@127.0.0.1:{port}/migration-vol-tcp?tls-psk-file={psk}"
        image = make_image(tmp_path / "src.img", 4 * MiB, [(MiB, 5000)], seed=4)
        with serve_file_readonly(image) as src:
            copy_image(src, uri)
        assert sha256(provider.volume_path("migration-vol-tcp")) == sha256(image)
        with pytest.raises(CopyError, match="TLS"):
            export_size(f"nbd://127.0.0.1:{port}/migration-vol-tcp")
        assert provider.ensure_export_server() == provider.ensure_export_server()  # found running, not restarted
    finally:
        provider.stop_export_server()


def test_an_export_server_serving_another_volume_directory_is_restarted(tmp_path, sockdir):
    """The export server is found through the run directory; started for one
    OMA_VOLUME_DIR and reused after it changed, every copy would fail with
    "no export named ...". The worker sees what it serves and restarts it."""
    first = LocalVolumeProvider(tmp_path / "volumes-a", sockdir)
    second = LocalVolumeProvider(tmp_path / "volumes-b", sockdir)
    try:
        pid = first.ensure_export_server()
        assert first.ensure_export_server() == pid  # the same directory: reused
        second.create_volume("migration-vol-b", MiB)
        assert second.ensure_export_server() != pid
        assert export_size(second.export_uri("migration-vol-b")) == MiB
    finally:
        second.stop_export_server()

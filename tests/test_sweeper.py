"""The sweepers find real orphans: a source export whose owning process was
SIGKILLed, and a job snapshot left on a vCenter; what is alive stays."""

import logging
import os
import signal
import subprocess
import sys
import tempfile
import textwrap

import pytest

from replication.models import VCenter
from replication.services import sweeper
from replication.services import vmware as vmware_service
from simulators.vcenter import vm_spec
from tests.helpers import PROJECT_ROOT, MiB, make_image, wait_until
from vma_agent import nbdkit

pytestmark = pytest.mark.integration


def test_source_export_of_a_killed_process_is_swept_and_a_live_one_kept(tmp_path, monkeypatch):
    exports = tmp_path / "exports"
    exports.mkdir()
    image = make_image(tmp_path / "src.img", MiB, [(0, 4096)])
    owner = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import tempfile, time
            tempfile.tempdir = {str(exports)!r}
            from vma_agent import nbdkit
            with nbdkit.serve_file_readonly({str(image)!r}) as uri:
                print(uri, flush=True)
                time.sleep(600)
        """)], cwd=PROJECT_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout.readline().startswith("nbd+unix://")
        orphan = next(exports.glob(f"{nbdkit.SOURCE_EXPORT_PREFIX}*"))
        server = int((orphan / "owner").read_text().split()[1])
        os.kill(owner.pid, signal.SIGKILL)  # no `finally` runs: the directory stays
        owner.wait()
        monkeypatch.setattr(tempfile, "tempdir", str(exports))  # this process's exports go there too
        with nbdkit.serve_file_readonly(image) as live_uri:
            live = next(p for p in exports.glob(f"{nbdkit.SOURCE_EXPORT_PREFIX}*") if p != orphan)
            removed = nbdkit.sweep_orphaned_exports(exports)
            assert live.exists() and nbdkit.socket_accepts(live / "nbd.sock"), live_uri
        assert len(removed) == 1 and f"dead process {owner.pid}" in removed[0]
        assert not orphan.exists()
        wait_until(lambda: not nbdkit.process_alive(server), 5, "the orphan's nbdkit to be gone too")
    finally:
        if owner.poll() is None:
            owner.kill()


@pytest.mark.django_db
def test_periodic_snapshot_sweep_removes_orphans_and_survives_an_unreachable_vcenter(vcenter, caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("replication"), "handlers", [caplog.handler])  # it does not propagate
    sim, record = vcenter(vm_spec("web05", [MiB]))
    (vm,) = vmware_service.discover(record, ["web05"])
    with vmware_service.client_for(record) as client:
        client.create_snapshot(vm.moref, "oma-repl-job-20260102-000000.000-000000")
        client.create_snapshot(vm.moref, "operator-snapshot")
    monkeypatch.setenv("VCENTER_PASSWORD_VC_DOWN", "unused")
    VCenter.objects.create(name="vc-down", host="127.0.0.1", port=1, username="u",
                           password_env="VCENTER_PASSWORD_VC_DOWN", thumbprint="AB" * 20)
    removed = sweeper.sweep_snapshots()
    assert removed == ["vc1/web05/oma-repl-job-20260102-000000.000-000000"]
    assert "snapshot sweep of vCenter vc-down failed" in caplog.text
    with vmware_service.client_for(record) as client:
        assert [s.name for s in client.vm_info(vm.moref).snapshots] == ["operator-snapshot"]

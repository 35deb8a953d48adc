"""The production data path for VMware disks: nbdkit's vddk plugin. VDDK
cannot be installed here, so its exact command line is what is tested, and
that the password never appears on it."""

import os
import stat

import pytest

from replication.models import VCenter
from replication.services import orders
from vma_agent import steps
from vma_agent.nbdkit import NbdkitError
from vma_agent.snapshot_sources import ImageDirSource, SnapshotDisk, VddkSource, password_file
from vma_agent.tasks import agent_config

pytestmark = pytest.mark.integration

PASSWORD = "s3cret-Pa55 word"
DISK = SnapshotDisk(vcenter="vc1", vm_moref="vm-42", snapshot_moref="snapshot-7", device_key=2001,
                    backing_file="[LocalDS_0] web01/web01_1.vmdk")


def test_vddk_command_line_reads_the_snapshot_with_the_password_from_a_file():
    source = VddkSource(libdir="/opt/vmware-vix-disklib-distrib", server="vc.example.com", port=8443,
                        username="administrator@vsphere.local", thumbprint="AA:BB", password_file="/run/vma/pw",
                        transports="nbdssl")
    assert source.command(DISK, "/run/vma/src.sock") == [
        "nbdkit", "--foreground", "--exit-with-parent", "--readonly", "--unix", "/run/vma/src.sock",
        "vddk", "libdir=/opt/vmware-vix-disklib-distrib", "server=vc.example.com", "port=8443",
        "user=administrator@vsphere.local", "password=+/run/vma/pw", "thumbprint=AA:BB", "vm=moref=vm-42",
        "snapshot=snapshot-7", "transports=nbdssl", "file=[LocalDS_0] web01/web01_1.vmdk",
    ]


def test_password_file_is_private_and_removed_afterwards():
    with password_file(PASSWORD) as path:
        assert open(path).read() == PASSWORD
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert not os.path.exists(path)


@pytest.mark.django_db
def test_vddk_source_of_a_vcenter_with_the_password_in_the_environment(monkeypatch):
    monkeypatch.setenv("VCENTER_PASSWORD_VC1", PASSWORD)
    vcenter = VCenter.objects.create(name="vc1", host="vc.example.com", username="admin",
                                     password_env="VCENTER_PASSWORD_VC1",
                                     thumbprint="AA:BB")
    ref = orders.vcenter_ref(vcenter)
    with steps.password_file_of(ref) as secret:
        command = steps.vddk_source(ref, secret, agent_config()).command(DISK, "/tmp/x.sock")
        assert f"password=+{secret}" in command
        assert open(secret).read() == PASSWORD
    assert not any(PASSWORD in arg for arg in command)
    assert not os.path.exists(secret)


def test_vddk_source_fails_with_nbdkits_reason_when_vddk_is_missing(tmp_path):
    pw = tmp_path / "pw"
    pw.write_text(PASSWORD)
    source = VddkSource(libdir=str(tmp_path / "no-vddk"), server="127.0.0.1", username="u", thumbprint="AA",
                        password_file=str(pw))
    with pytest.raises(NbdkitError, match="nbdkit exited with status"):
        with source.serve(DISK):
            pass


def test_image_dir_source_layout_and_missing_image(tmp_path):
    source = ImageDirSource(tmp_path)
    assert source.image_path(DISK) == tmp_path / "vc1/vms/vm-42/snapshots/snapshot-7/2001.img"
    with pytest.raises(NbdkitError, match="does not exist"):
        with source.serve(DISK):
            pass

"""Operator-level messages (issue 31): each failure an operator can act on
is said in plain words with what to do, from one table
(replication.services.diagnosis), its raw text kept as the details. Each is
produced for real here: nbdkit without the vddk plugin, a closed port, a
vCenter simulator whose certificate changed, and a replica volume on a
tiny full filesystem (a real copy through the real workers)."""

import subprocess
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import CommandError, call_command

from replication.choices import DiskStatus, JobStatus, SyncType
from replication.models import VCenter
from replication.services import diagnosis, volumes
from replication.services.inventory import register_image_vm
from replication.services.jobs import start_replication
from replication.services.vmware import register_vcenter
from simulators.vcenter import vm_spec
from tests.helpers import MiB, free_port, make_image, wait_for_job
from vma_agent import nbdkit
from vma_agent.snapshot_sources import SnapshotDisk, VddkSource
from vma_agent.vmware import VSphereError

NO_VDDK = diagnosis.KNOWN[0].message
CERTIFICATE = diagnosis.KNOWN[1].message
UNREACHABLE = diagnosis.KNOWN[2].message
FULL = diagnosis.KNOWN[3].message


def test_the_table_names_what_to_do_and_keeps_the_raw_text():
    assert [k.name for k in diagnosis.KNOWN] == ["no-vddk", "certificate-changed", "vcenter-unreachable",
                                                 "volume-dir-full"]
    assert all("then" in k.message for k in diagnosis.KNOWN)  # each says what to do next
    assert diagnosis.operator_text("something else broke") == "something else broke"  # unknown: untouched


def test_nbdkit_without_the_vddk_plugin(tmp_path):
    password = tmp_path / "password"
    password.write_text("secret")
    source = VddkSource(libdir="/usr/lib/vmware-vix-disklib", server="vcenter.example", username="u",
                        thumbprint="AA" * 20, password_file=str(password))
    disk = SnapshotDisk(vcenter="vc1", vm_moref="vm-1", snapshot_moref="snapshot-1", device_key=2000,
                        backing_file="[ds] vm/vm.vmdk")
    with pytest.raises(nbdkit.NbdkitError) as raised, source.serve(disk):
        pass
    raw = str(raised.value)
    assert "cannot open plugin" in raw and "vddk" in raw  # the real failure of this machine's nbdkit
    text = diagnosis.operator_text(raw)
    assert text.startswith(NO_VDDK) and text.endswith(f"Details: {raw}")


@pytest.mark.django_db
def test_a_vcenter_on_a_closed_port(tmp_path):
    password = Path(settings.OMA_SECRETS_DIR) / "closed-port.password"
    password.parent.mkdir(parents=True, exist_ok=True)
    password.write_text("secret")
    password.chmod(0o600)
    port = free_port()  # nothing listens there
    with pytest.raises(VSphereError) as raised:
        register_vcenter("vc-closed", "127.0.0.1", "u", "AA" * 20, port=port, password_file=str(password))
    text = str(raised.value)
    assert text.startswith(UNREACHABLE), text
    assert f"Details: cannot reach vCenter 127.0.0.1:{port}:" in text and "refused" in text
    assert not VCenter.objects.exists()  # nothing recorded


@pytest.mark.django_db
def test_a_vcenter_whose_certificate_changed(vcenter, vcsim_factory, tmp_path):
    old, record = vcenter(vm_spec("cert01", capacities=[MiB]))
    new = vcsim_factory({"vms": [vm_spec("cert01", capacities=[MiB])]})
    assert new.thumbprint != old.thumbprint  # another certificate
    # The vCenter's address now answers with the new certificate.
    VCenter.objects.filter(pk=record.pk).update(port=new.port, password_file=str(new.password_file))
    with pytest.raises(CommandError) as raised:
        call_command("discover", "--vcenter", record.name)
    text = str(raised.value)
    assert text.startswith(CERTIFICATE), text
    assert f"presented certificate thumbprint {new.thumbprint}, not the pinned {record.thumbprint}" in text


@pytest.fixture
def tiny_filesystem(tmp_path):
    """A 2 MiB tmpfs, unmounted at the end (lazily: an export server may
    still hold a file open there)."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_a_copy_onto_a_full_volume_filesystem(celery_worker_process, tmp_path, tiny_filesystem):
    image = make_image(tmp_path / "big.img", 8 * MiB, [(0, 8 * MiB)], seed=7)
    vm = register_image_vm("vm-full", [str(image)])
    volume = volumes.volume_for(vm.disks.get())
    # The volume's file lives on the tiny filesystem: the first cycle writes it in place.
    link = Path(settings.OMA_VOLUME_DIR) / volume.export_name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.unlink(missing_ok=True)
    link.symlink_to(tiny_filesystem / volume.export_name)
    try:
        job = wait_for_job(start_replication(vm, SyncType.FULL).id, timeout=120)
    finally:
        link.unlink(missing_ok=True)
    assert job.status == JobStatus.FAILED
    assert FULL in job.error_message, job.error_message
    assert "Details:" in job.error_message and "No space left on device" in job.error_message
    disk = job.disks.get()
    assert disk.status == DiskStatus.FAILED and disk.error_message.startswith(FULL), disk.error_message
    page_events = list(job.events.values_list("message", flat=True))
    assert any(FULL in message for message in page_events)

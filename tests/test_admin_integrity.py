"""The admin cannot put wrong data into the inventory: a disk enters through
add_vm's checks (absolute, readable, raw, capacity read from the source),
and what the system owns (changeIds, capacities, keys, volume paths) is
read-only there."""

import subprocess

import pytest
from django.contrib.auth.models import User

from replication.models import SourceDisk, TargetVolume, VirtualMachine
from replication.services.inventory import register_image_vm
from tests.helpers import MiB, make_image

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin(client):
    client.force_login(User.objects.create_superuser("admin", password="s3cret-pass"))
    return client


def vm_form(name: str, disks: list[str], initial: int = 0, **fields) -> dict:
    data = {"name": name, "source_kind": "image", "agent": "local", "firmware": "bios", "nics": "[]",
            "snapshots": "[]", "disks-TOTAL_FORMS": str(len(disks)), "disks-INITIAL_FORMS": str(initial),
            "disks-MIN_NUM_FORMS": "0", "disks-MAX_NUM_FORMS": "1000", **fields}
    for i, locator in enumerate(disks):
        data[f"disks-{i}-locator"] = locator
    return data


def test_a_disk_added_in_the_admin_passes_add_vms_checks(admin, tmp_path):
    qcow2 = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow2), "64M"], check=True)
    for locator, reason in [(str(qcow2), "is qcow2: an image VM&#x27;s disks are raw"),
                            ("disk.img", "disk path must be absolute"),
                            (str(tmp_path / "missing.img"), "does not exist")]:
        page = admin.post("/admin/replication/virtualmachine/add/", vm_form("vm-admin", [locator]))
        assert page.status_code == 200 and reason in page.content.decode(), (locator, page.content[:2000])
        assert not VirtualMachine.objects.filter(name="vm-admin").exists()

    raw = make_image(tmp_path / "disk.img", 3 * MiB + 512, [(0, MiB)])
    page = admin.post("/admin/replication/virtualmachine/add/", vm_form("vm-admin", [str(raw)]))
    assert page.status_code == 302, page.content[:3000]
    disk = SourceDisk.objects.get(vm__name="vm-admin")
    assert (disk.disk_key, disk.locator, disk.capacity_bytes) == ("disk-2000", str(raw), 3 * MiB + 512)


def test_state_the_system_owns_is_read_only_in_the_admin(admin, tmp_path):
    raw = make_image(tmp_path / "disk.img", 2 * MiB, [(0, MiB)])
    vm = register_image_vm("vm-owned", [str(raw)])
    disk = vm.disks.get()
    SourceDisk.objects.filter(pk=disk.pk).update(change_id="52 aa/7")
    data = vm_form("vm-owned", [str(raw)], initial=1, **{"disks-0-id": str(disk.pk), "disks-0-vm": str(vm.pk),
                                                         "disks-0-change_id": "52 aa/99",
                                                         "disks-0-capacity_bytes": "1"})
    page = admin.post(f"/admin/replication/virtualmachine/{vm.pk}/change/", data)
    assert page.status_code == 302, page.content[:3000]
    disk.refresh_from_db()
    assert (disk.change_id, disk.capacity_bytes) == ("52 aa/7", 2 * MiB)  # the typed values were not taken

    volume = TargetVolume.objects.create(source_disk=disk, size_bytes=2 * MiB, path="/var/volumes/x")
    form = admin.get(f"/admin/replication/targetvolume/{volume.pk}/change/").content.decode()
    assert 'name="path"' not in form and 'name="size_bytes"' not in form and 'name="cloud_volume_id"' not in form

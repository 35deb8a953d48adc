import json
import subprocess
import sys

import pytest
from django.core.management import CommandError, call_command

from replication.models import VirtualMachine
from tests.helpers import PROJECT_ROOT, MiB, NbdkitProcess, make_image, sha256, wait_for_job, worker_env

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def run(*args, **kwargs):
    """Run a management command in-process; returns what it printed."""
    from io import StringIO

    out = StringIO()
    call_command(*args, stdout=out, stderr=StringIO(), **kwargs)
    return out.getvalue()


def manage(*args):
    """Run manage.py in a subprocess on the test database, as an operator would."""
    return subprocess.run([sys.executable, "manage.py", *args], cwd=PROJECT_ROOT, env=worker_env(),
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def images(tmp_path):
    return [make_image(tmp_path / "a.img", 3 * MiB + 1, [(0, MiB)], seed=1),
            make_image(tmp_path / "b.img", 2 * MiB, [(MiB, 5000)], seed=2)]


def test_add_vm_registers_disks_in_order(images):
    out = run("add_vm", "web01", "--disk", str(images[0]), "--disk", str(images[1]))
    vm = VirtualMachine.objects.get(name="web01")
    assert [(d.disk_key, d.capacity_bytes, d.locator) for d in vm.disks.all()] == [
        ("disk-2000", 3 * MiB + 1, str(images[0])), ("disk-2001", 2 * MiB, str(images[1]))]
    assert "web01 disk-2001 2097152" in out


def test_add_vm_accepts_an_nbd_uri(images, sockdir):
    server = NbdkitProcess(sockdir, "--readonly", "file", str(images[0]))
    try:
        run("add_vm", "nbd01", "--disk", server.uri)
    finally:
        server.stop()
    assert VirtualMachine.objects.get(name="nbd01").disks.get().capacity_bytes == 3 * MiB + 1


@pytest.mark.parametrize("disk, reason", [
    ("{tmp}/nonexistent.img", "disk image {tmp}/nonexistent.img does not exist"),
    ("relative.img", "disk path must be absolute"),
    ("nbd+unix:///?socket={tmp}/nonexistent.sock", "cannot read NBD source nbd+unix:///?socket={tmp}/nonexistent.sock"),
])
def test_add_vm_refuses_bad_disks(disk, reason, tmp_path):
    disk, reason = disk.format(tmp=tmp_path), reason.format(tmp=tmp_path)
    with pytest.raises(CommandError, match=reason.replace("?", r"\?").replace("+", r"\+")):
        run("add_vm", "bad", "--disk", disk)
    assert not VirtualMachine.objects.exists()


def test_add_vm_takes_qcow2_and_refuses_other_formats(tmp_path):
    vmdk = tmp_path / "disk.vmdk"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", str(vmdk), "1M"], check=True)
    with pytest.raises(CommandError, match="is vmdk, neither raw nor qcow2"):
        run("add_vm", "v", "--disk", str(vmdk))
    qcow2 = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow2), "3M"], check=True)
    overlay = tmp_path / "overlay.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(qcow2), "-F", "qcow2", str(overlay)],
                   check=True)
    with pytest.raises(CommandError, match="has a backing file"):
        run("add_vm", "o", "--disk", str(overlay))
    assert not VirtualMachine.objects.exists()
    run("add_vm", "q", "--disk", str(qcow2))
    vm = VirtualMachine.objects.get(name="q")
    assert vm.source_kind == "qcow2" and vm.disks.get().capacity_bytes == 3 * 1024 * 1024


def test_add_vm_refuses_a_duplicate_name_and_keeps_the_first(images):
    run("add_vm", "dup", "--disk", str(images[0]))
    with pytest.raises(CommandError, match="a VM named 'dup' already exists"):
        run("add_vm", "dup", "--disk", str(images[1]))
    assert VirtualMachine.objects.get(name="dup").disks.get().locator == str(images[0])


def test_add_vm_error_exits_non_zero_with_one_line_reason(tmp_path):
    result = manage("add_vm", "x", "--disk", f"{tmp_path}/nonexistent.img")
    assert result.returncode != 0
    assert result.stderr.strip() == f"CommandError: disk image {tmp_path}/nonexistent.img does not exist"


def test_replicate_unknown_vm_exits_non_zero():
    result = manage("replicate", "no-such-vm")
    assert result.returncode != 0
    assert "no VM named 'no-such-vm'" in result.stderr


def test_replicate_incremental_of_image_vm_is_refused(images):
    run("add_vm", "img", "--disk", str(images[0]))
    with pytest.raises(CommandError, match="only a full copy is possible"):
        run("replicate", "img", "--incremental")


def test_replicate_wait_jobs_and_volumes(celery_worker_process, images):
    run("add_vm", "web02", "--disk", str(images[0]), "--disk", str(images[1]))
    result = manage("replicate", "web02", "--full", "--wait", "--timeout", "90")
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.splitlines()[0]
    assert wait_for_job(job_id).status == "completed"
    assert f"job {job_id} completed" in result.stdout
    assert "disk-2001 completed" in result.stderr  # the live bars

    jobs = json.loads(run("jobs", "--json"))
    assert jobs[0]["id"] == job_id and jobs[0]["vm"] == "web02"
    assert jobs[0]["status"] == "completed" and jobs[0]["progress_percent"] == 100.0
    assert jobs[0]["bytes_transferred"] == jobs[0]["total_bytes"] > 0
    assert job_id in run("jobs")

    volumes = json.loads(run("volumes", "web02", "--json"))
    assert [v["disk"] for v in volumes] == ["disk-2000", "disk-2001"]
    for volume, image in zip(volumes, images, strict=True):
        assert volume["export_name"] == f"migration-vol-{volume['volume_id']}"
        assert sha256(volume["path"]) == sha256(image)


def test_replicate_wait_exits_non_zero_when_the_job_fails(celery_worker_process, images):
    run("add_vm", "doomed", "--disk", str(images[0]))
    images[0].unlink()
    result = manage("replicate", "doomed", "--wait", "--timeout", "90")
    assert result.returncode != 0
    assert "failed: disk-2000: source image" in result.stderr


def test_volumes_of_unknown_vm_is_an_error():
    with pytest.raises(CommandError, match="no VM named 'ghost'"):
        run("volumes", "ghost", "--json")


def test_jobs_json_is_empty_list_without_jobs():
    assert json.loads(run("jobs", "--json")) == []

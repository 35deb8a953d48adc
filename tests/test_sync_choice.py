"""`replicate` and the GUI's Replicate button default to "auto": incremental
when every disk holds a committed changeId, full otherwise; --full and
--incremental force it, and an incremental with nothing committed is refused
with the reason (no job, no change). Real qcow2 source (qemu dirty bitmaps),
real OMA and agent workers."""

import subprocess

import pytest
from django.core.management import CommandError, call_command
from django.test import Client
from django.urls import reverse

from replication.choices import JobStatus, SyncType
from replication.models import ReplicationJob
from replication.services.inventory import register_image_vm
from replication.services.jobs import AUTO, ReplicationError, choose_sync_type
from tests.helpers import MiB, make_image, user_with_role, wait_for_job

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def qcow2_vm(tmp_path, name):
    image = tmp_path / f"{name}.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", str(image), "8M"], check=True, capture_output=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 2M", str(image)], check=True,
                   capture_output=True)
    return register_image_vm(name, [str(image)]), image


def replicate_cli(*args) -> ReplicationJob:
    from io import StringIO

    out = StringIO()
    call_command("replicate", *args, "--wait", "--timeout", "120", stdout=out, stderr=StringIO())
    job = ReplicationJob.objects.get(pk=out.getvalue().split()[0])
    assert job.status == JobStatus.COMPLETED, job.error_message
    return job


def test_replicate_cli_picks_incremental_once_a_changeid_is_committed(celery_worker_process, tmp_path):
    vm, image = qcow2_vm(tmp_path, "auto-cli")
    with pytest.raises(CommandError, match=r"no committed changeId for disk-2000: an incremental copy needs a "
                                           r"completed replication to start from; run a full one \(or choose auto\)"):
        call_command("replicate", "auto-cli", "--incremental")
    assert not ReplicationJob.objects.filter(vm=vm).exists()  # refused: nothing started

    first = replicate_cli("auto-cli")  # auto, nothing committed: full
    assert first.sync_type == SyncType.FULL and first.disks.get().sync_type == SyncType.FULL
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x22 4M 64k", str(image)], check=True,
                   capture_output=True)
    second = replicate_cli("auto-cli")  # auto, a changeId committed: incremental
    assert second.sync_type == SyncType.INCREMENTAL and second.disks.get().sync_type == SyncType.INCREMENTAL
    assert second.disks.get().bytes_total == 64 * 1024  # only what changed
    forced = replicate_cli("auto-cli", "--full")
    assert forced.sync_type == SyncType.FULL and forced.disks.get().sync_type == SyncType.FULL
    assert replicate_cli("auto-cli", "--incremental").disks.get().sync_type == SyncType.INCREMENTAL


def test_raw_images_are_always_full_and_bad_choices_are_refused(tmp_path):
    vm = register_image_vm("auto-raw", [str(make_image(tmp_path / "raw.img", MiB, [(0, MiB)]))])
    assert choose_sync_type(vm) == choose_sync_type(vm, AUTO) == SyncType.FULL
    with pytest.raises(ReplicationError, match="only a full copy is possible"):
        choose_sync_type(vm, SyncType.INCREMENTAL)
    with pytest.raises(ReplicationError, match="Unknown replication type 'sideways'; use auto, full, incremental"):
        choose_sync_type(vm, "sideways")


def test_the_replicate_button_defaults_to_auto(celery_worker_process, tmp_path):
    vm, _ = qcow2_vm(tmp_path, "auto-gui")
    client = Client()
    client.force_login(user_with_role("auto-operator", "operator"))
    page = client.get(reverse("vm-list")).content.decode()
    assert '<option value="auto">Auto</option>' in page
    assert page.index('value="auto"') < page.index('value="full"')  # the first option: the default

    refused = client.post(reverse("vm-replicate", args=[vm.id]), {"sync_type": "incremental"}, follow=True)
    assert "no committed changeId for disk-2000" in refused.content.decode()
    assert not ReplicationJob.objects.filter(vm=vm).exists()

    client.post(reverse("vm-replicate", args=[vm.id]), {"sync_type": "auto"})
    first = wait_for_job(ReplicationJob.objects.get(vm=vm).id)
    assert first.status == JobStatus.COMPLETED and first.sync_type == SyncType.FULL
    client.post(reverse("vm-replicate", args=[vm.id]), {})  # the form's default, as a bare POST
    second = wait_for_job(ReplicationJob.objects.filter(vm=vm).exclude(pk=first.pk).get().id)
    assert second.status == JobStatus.COMPLETED and second.sync_type == SyncType.INCREMENTAL

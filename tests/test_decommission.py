"""Decommissioning a VM on a real local volume destination: a real worker
pair replicates it, its replicas are compared as a task, then the VM is
decommissioned: its replica files are gone, its history stays, it leaves
the lists and is never replicated again."""

from io import StringIO
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from replication.choices import FailoverKind, FailoverStatus, JobStatus, VMState
from replication.models import (
    ChecksumRun,
    FailoverJob,
    ReplicationJob,
    TargetVolume,
    VirtualMachine,
    VMContext,
    VMStateChange,
)
from replication.services import checksums, scheduler
from replication.services.inventory import register_image_vm
from replication.services.jobs import ReplicationError, start_replication
from tests.helpers import MiB, make_image, wait_for_job, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def replicated_vm(tmp_path, name):
    images = [make_image(tmp_path / f"{name}-{i}.img", 4 * MiB + 4096 * i, [(0, 2 * MiB)], seed=i + 7)
              for i in range(2)]
    vm = register_image_vm(name, [str(image) for image in images])
    job = wait_for_job(start_replication(vm).id)
    assert job.status == JobStatus.COMPLETED, job.error_message
    return vm, images


def test_decommission_removes_the_replicas_and_keeps_the_history(celery_worker_process, tmp_path):
    vm, images = replicated_vm(tmp_path, "vm-retire")
    volumes = list(TargetVolume.objects.filter(source_disk__vm=vm))
    paths = [Path(volume.path) for volume in volumes]
    assert len(paths) == 2 and all(path.exists() for path in paths)

    # The settings page's comparison runs as a task on the OMA's worker.
    run = checksums.start(vm, "tester")
    wait_until(lambda: ChecksumRun.objects.get(pk=run.pk).status != "running", 60, "the checksum task")
    run.refresh_from_db()
    assert run.status == "match", (run.error, run.disks)
    assert [d["verdict"] for d in run.disks] == ["match", "match"]
    out = StringIO()
    call_command("checksums", vm.name, stdout=out)  # the command compares the same way, at once
    assert out.getvalue().count("MATCH") == 2 and run.disks[0]["source"] in out.getvalue()
    # A replica changed behind the OMA's back is seen.
    with open(paths[0], "r+b") as f:
        f.write(b"tampered")
    with pytest.raises(CommandError, match="target differs from source for disk-2000"):
        call_command("checksums", vm.name, stdout=StringIO())
    run = checksums.start(vm, "tester")
    wait_until(lambda: ChecksumRun.objects.get(pk=run.pk).status != "running", 60, "the checksum task")
    run.refresh_from_db()
    assert run.status == "mismatch" and [d["verdict"] for d in run.disks] == ["mismatch", "match"]

    group = scheduler.create_group("retire-group")
    scheduler.add_vms(group, [vm])
    ended = FailoverJob.objects.create(vm=vm, kind=FailoverKind.TEST, status=FailoverStatus.ENDED,
                                       actor="tester")
    jobs_before = set(ReplicationJob.objects.filter(vm=vm).values_list("id", flat=True))

    with pytest.raises(CommandError, match="--yes"):
        call_command("decommission", vm.name, stdout=StringIO(), stderr=StringIO())
    assert all(path.exists() for path in paths), "nothing removed without --yes"

    out = StringIO()
    call_command("decommission", vm.name, "--yes", "--actor", "alice", stdout=out)
    assert "vm-retire: decommissioned; 2 replica volume(s) removed" in out.getvalue()
    assert not any(path.exists() for path in paths), "the replica files are gone"
    for volume in TargetVolume.objects.filter(pk__in=[v.pk for v in volumes]):
        assert volume.retired_at is not None and volume.source_disk is None and volume.path == ""

    vm = VirtualMachine.objects.get(pk=vm.pk)
    assert VMContext.of(vm).state == VMState.DECOMMISSIONED and vm.group is None
    assert set(ReplicationJob.objects.filter(vm=vm).values_list("id", flat=True)) == jobs_before
    assert FailoverJob.objects.filter(pk=ended.pk).exists()
    last = VMStateChange.objects.filter(context__vm=vm).last()
    assert last.to_state == VMState.DECOMMISSIONED and "for alice" in last.actor
    assert vm not in VirtualMachine.objects.in_service()

    with pytest.raises(ReplicationError, match="the VM is decommissioned"):
        start_replication(vm)
    with pytest.raises(scheduler.ScheduleError, match="vm-retire are decommissioned"):
        scheduler.add_vms(group, [vm])
    with pytest.raises(CommandError, match="already decommissioned"):
        call_command("decommission", vm.name, "--yes", stdout=StringIO())


def test_decommission_is_refused_while_a_test_failover_is_open(celery_worker_process, tmp_path):
    vm, _ = replicated_vm(tmp_path, "vm-busy")
    paths = [Path(v.path) for v in TargetVolume.objects.filter(source_disk__vm=vm)]
    VMContext.of(vm).move(VMState.FAILED_OVER_TEST, actor="tester", reason="a test failover")
    with pytest.raises(CommandError, match="cannot be decommissioned: a test failover is running; end it first"):
        call_command("decommission", vm.name, "--yes", stdout=StringIO())
    assert all(path.exists() for path in paths), "a refusal touches no replica"
    assert VMContext.of(vm).state == VMState.FAILED_OVER_TEST

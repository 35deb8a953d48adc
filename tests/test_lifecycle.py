"""A VM's lifecycle (MigrateKit OSSEA's vm_replication_contexts): one place moves it,
refusing illegal moves with the reason, recording time, actor and reason."""

import pytest

from replication.choices import JobStatus, VMState
from replication.models import IllegalMove, RecoveryPoint, VMContext
from replication.services import jobs, volumes
from replication.services.inventory import register_image_vm
from replication.services.jobs import ReplicationError, start_replication
from tests.helpers import MiB, make_image

pytestmark = pytest.mark.django_db


@pytest.fixture
def vm(tmp_path, monkeypatch):
    monkeypatch.setattr("replication.services.jobs.enqueue_prepare", lambda *args: None)
    return register_image_vm("vm-life", [str(make_image(tmp_path / "d.img", MiB, [(0, 4096)]))])


def complete(job):
    """What a cycle's finalize does once every disk is written."""
    assert job.enter_stage("Initializing", JobStatus.PREPARING)
    assert job.enter_stage("Transfer", JobStatus.REPLICATING)
    for disk in job.disks.all():
        volumes.provision(disk.target_volume, disk.capacity_bytes)  # the replica the copy wrote
        assert disk.start_attempt("t") and disk.complete(bytes_total=4096, bytes_zeroed=0, throughput_bps=1)
    assert job.transition(JobStatus.FINALIZING)
    jobs.commit_and_complete(job)


def test_a_cycle_moves_the_vm_to_replicating_then_ready_for_failover(vm):
    assert VMContext.of(vm).state == VMState.DISCOVERED
    job = start_replication(vm, actor="alice")
    assert VMContext.of(vm).state == VMState.REPLICATING
    complete(job)
    context = VMContext.of(vm)
    assert context.state == VMState.READY_FOR_FAILOVER
    assert [(c.to_state, c.actor) for c in context.changes.all()] == [
        (VMState.REPLICATING, "alice"), (VMState.READY_FOR_FAILOVER, "system")]
    assert job.id in context.changes.first().reason


def test_no_cycle_while_a_failover_holds_the_replica(vm):
    complete(start_replication(vm))
    context = VMContext.of(vm)
    context.move(VMState.FAILED_OVER_TEST, actor="bob", reason="test failover")
    with pytest.raises(ReplicationError, match="a test failover is running"):
        start_replication(vm)
    assert vm.jobs.count() == 1  # nothing stored by the refused start
    context.move(VMState.READY_FOR_FAILOVER, actor="bob", reason="test ended")
    context.move(VMState.FAILED_OVER_LIVE, actor="bob", reason="live failover")
    with pytest.raises(ReplicationError, match="runs on the destination"):
        start_replication(vm)


def test_illegal_moves_are_refused_with_the_reason(vm):
    context = VMContext.of(vm)
    with pytest.raises(IllegalMove, match="no replication cycle has completed yet"):
        context.move(VMState.FAILED_OVER_LIVE, actor="carol")
    assert context.state == VMState.DISCOVERED and context.changes.count() == 0


def cut_off_while_copying(job):
    assert job.enter_stage("Initializing", JobStatus.PREPARING)
    assert job.enter_stage("Transfer", JobStatus.REPLICATING)
    assert job.disks.get().start_attempt("t")
    jobs.fail_job(job.id, "disk-2000: write failed")


def test_a_failed_first_cycle_leaves_no_point_and_a_later_failed_cycle_leaves_the_last_point(vm):
    # The first cycle writes its volumes in place: cut off after copying, there is no point in time.
    cut_off_while_copying(start_replication(vm))
    assert VMContext.of(vm).state == VMState.FAILED
    # One cancelled before any copy started changes nothing: still no point.
    jobs.cancel_job(start_replication(vm).id)
    assert VMContext.of(vm).state == VMState.FAILED

    complete(start_replication(vm))
    (point,) = RecoveryPoint.sealed(vm)
    # Later cycles write layers of their own: one cut off after copying leaves the point as it was.
    cut_off_while_copying(start_replication(vm))
    assert VMContext.of(vm).state == VMState.READY_FOR_FAILOVER
    assert list(RecoveryPoint.sealed(vm)) == [point]
    jobs.cancel_job(start_replication(vm).id)
    assert VMContext.of(vm).state == VMState.READY_FOR_FAILOVER


def test_a_late_clean_up_of_an_old_job_leaves_the_next_cycle_alone(vm):
    first = start_replication(vm)
    assert first.enter_stage("Initializing", JobStatus.PREPARING)
    assert first.enter_stage("Transfer", JobStatus.REPLICATING)
    assert first.disks.get().start_attempt("t")
    jobs.fail_job(first.id, "disk-2000: write failed")
    assert VMContext.of(vm).state == VMState.FAILED
    start_replication(vm)
    jobs.fail_job(first.id, "the reaper, late")  # the first job again: already failed
    assert VMContext.of(vm).state == VMState.REPLICATING

"""Every status field moves along its table in choices.py, through the one
transition() shape: a move the table does not allow is refused, a caller
may narrow the table (only_from) but never widen it, and a final state
stays final. Needs no worker, agent or destination."""

import pytest
from django.apps import apps
from django.utils import timezone

from replication.choices import (
    AdmissionStatus,
    DrillStatus,
    FailoverKind,
    FailoverStatus,
    FailoverStepStatus,
    VMState,
)
from replication.models import (
    Admission,
    DrillRun,
    FailoverJob,
    FailoverStep,
    ProtectionGroup,
    ReplicationJob,
    StateMachine,
    VMContext,
)
from replication.services.inventory import register_image_vm
from tests.helpers import MiB, make_image

pytestmark = pytest.mark.django_db


@pytest.fixture
def vm(tmp_path):
    return register_image_vm("vm-states", [str(make_image(tmp_path / "d.img", MiB, [(0, 4096)]))])


def test_every_status_field_has_a_table_of_its_own_choices():
    machines = [m for m in apps.get_app_config("replication").get_models() if issubclass(m, StateMachine)]
    assert {m.__name__ for m in machines} >= {"ReplicationJob", "VMDisk", "VMContext", "FailoverJob",
                                              "FailoverStep", "Admission", "DrillRun"}
    for model in machines:
        states = {value for value, _ in model._meta.get_field(model.state_field).choices}
        assert model.transitions, model
        for source, targets in model.transitions.items():
            assert source in states and set(targets) <= states, model
    for model in apps.get_app_config("replication").get_models():
        if model not in machines and model.__name__ != "JobEvent":  # JobEvent records a job's status
            assert "status" not in {f.name for f in model._meta.fields}, f"{model.__name__}.status has no table"


def test_a_failover_moves_only_along_its_table(vm):
    job = FailoverJob.objects.create(vm=vm, kind=FailoverKind.TEST, actor="alice")
    assert not job.transition(FailoverStatus.SUCCEEDED), "pending cannot succeed without running"
    assert not job.transition(FailoverStatus.ENDED)
    assert job.transition(FailoverStatus.RUNNING, started_at=timezone.now())
    assert job.status == FailoverStatus.RUNNING and job.started_at is not None
    assert not job.transition(FailoverStatus.RUNNING), "a failover runs once"
    assert job.transition(FailoverStatus.SUCCEEDED)
    assert job.transition(FailoverStatus.ENDED)
    for to in FailoverStatus:
        assert not job.transition(to), f"ended is final, yet it went to {to}"


def test_a_caller_narrows_the_table_never_widens_it(vm):
    job = FailoverJob.objects.create(vm=vm, kind=FailoverKind.ROLLBACK, actor="alice")
    assert not job.transition(FailoverStatus.FAILED, only_from={FailoverStatus.RUNNING}), \
        "the table lets pending fail; the caller accepts only running"
    assert job.status == FailoverStatus.PENDING
    assert not job.transition(FailoverStatus.SUCCEEDED, only_from={FailoverStatus.PENDING}), \
        "only_from cannot allow what the table refuses"
    assert job.transition(FailoverStatus.FAILED)


def test_a_step_ends_once_and_only_a_running_one_is_closed(vm):
    job = FailoverJob.objects.create(vm=vm, kind=FailoverKind.TEST, actor="alice")
    step = FailoverStep.begin(job, "define VM")
    waiting = FailoverStep.begin(job, "power on source")
    assert step.status == FailoverStepStatus.RUNNING
    assert step.end(FailoverStepStatus.DONE, "defined")
    assert not step.end(FailoverStepStatus.FAILED, "late"), "an ended step stays as it ended"
    assert (step.status, step.detail) == (FailoverStepStatus.DONE, "defined")
    assert FailoverStep.end_running(job, FailoverStepStatus.DONE, "on", name="power on source") == 1
    assert FailoverStep.end_running(job, FailoverStepStatus.DONE, "on", name="power on source") == 0, \
        "a second delivery of the same answer closes nothing"
    FailoverStep.begin(job, "verify boot")
    assert FailoverStep.end_running(job, FailoverStepStatus.FAILED, "interrupted") == 1
    waiting.refresh_from_db()
    assert waiting.status == FailoverStepStatus.DONE and waiting.ended_at is not None


def test_a_drill_runs_then_passes_or_fails_once(vm):
    queued = DrillRun.objects.create(vm=vm)
    assert not queued.end(DrillStatus.PASSED, "booted", timezone.now()), "a drill that never ran cannot pass"
    assert queued.end(DrillStatus.FAILED, "not ready for failover", timezone.now())
    run = DrillRun.objects.create(vm=vm)
    assert run.start(None, timezone.now())
    assert run.end(DrillStatus.PASSED, "booted", timezone.now(), 12.34567)
    assert run.rto_s == 12.346
    assert not run.end(DrillStatus.FAILED, "late", timezone.now())
    assert run.status == DrillStatus.PASSED


def test_an_admission_is_decided_once(vm):
    group = ProtectionGroup.objects.create(name="g")
    entry = Admission.objects.create(group=group, vm=vm)
    other = Admission.objects.create(group=group, vm=vm)
    assert entry.decide(AdmissionStatus.SKIPPED, note="busy")
    assert not entry.decide(AdmissionStatus.STARTED)
    assert Admission.drop_waiting(vm, "moved to group h") == 1, "only the one still waiting is dropped"
    entry.refresh_from_db()
    other.refresh_from_db()
    assert (entry.status, other.status, other.note) == (AdmissionStatus.SKIPPED, AdmissionStatus.DROPPED,
                                                        "moved to group h")


def test_a_vm_move_is_one_transition_with_its_history(vm):
    context = VMContext.of(vm)
    assert not context.transition(VMState.READY_FOR_FAILOVER, actor="bob"), "discovered cannot be ready"
    assert context.transition(VMState.REPLICATING, actor="bob", reason="cycle")
    assert not context.transition(VMState.READY_FOR_FAILOVER, actor="bob", only_from={VMState.FAILED})
    assert [(c.to_state, c.actor) for c in context.changes.all()] == [(VMState.REPLICATING, "bob")]


def test_a_removed_snapshot_is_forgotten_by_the_jobs_that_held_it(vm):
    first = ReplicationJob.objects.create(vm=vm, snapshot_moref="snapshot-1")
    second = ReplicationJob.objects.create(vm=vm, snapshot_moref="snapshot-2")
    assert ReplicationJob.snapshots_removed(["snapshot-2"], job_id=first.pk) == 0
    assert ReplicationJob.snapshots_removed(["snapshot-1", ""]) == 1
    first.refresh_from_db()
    second.refresh_from_db()
    assert (first.snapshot_moref, second.snapshot_moref) == ("", "snapshot-2")
    assert not hasattr(first, "celery_task_id"), "a job's task id was never used"

"""Queueing by name and the workflows' notices: the OMA publishes tasks by
their registered names (vma_agent.task_names) once a transaction commits,
and a workflow hears of another's events through replication.signals."""

import pytest

from replication import signals
from replication.choices import DrillStatus, FailoverKind, FailoverStatus, JobStatus
from replication.models import DrillRun, FailoverJob
from replication.services import jobs
from replication.services.inventory import register_image_vm
from tests.helpers import MiB, make_image
from vma_agent import task_names

pytestmark = pytest.mark.django_db


@pytest.fixture
def published(monkeypatch):
    sent = []
    monkeypatch.setattr("replication.dispatch.publish",
                        lambda task_name, args, **kwargs: sent.append((task_name, *args)))
    return sent


@pytest.fixture
def vm(tmp_path, monkeypatch):
    monkeypatch.setattr("replication.services.jobs.enqueue_prepare", lambda *args: None)
    return register_image_vm("vm-dispatch", [str(make_image(tmp_path / "d.img", MiB, [(0, 4096)]))])


def test_every_registered_name_is_a_task_of_the_app():
    from oma_site.celery import app

    app.loader.import_default_modules()
    names = {value for key, value in vars(task_names).items() if key.isupper() and not key.endswith("_QUEUE")}
    assert names - set(app.tasks) == set()


def test_a_cycles_end_queues_its_live_failovers_next_step_once_it_commits(vm, published,
                                                                          django_capture_on_commit_callbacks):
    job = jobs.start_replication(vm)
    live = FailoverJob.objects.create(vm=vm, kind=FailoverKind.LIVE, status=FailoverStatus.RUNNING, final_cycle=job,
                                      actor="t")
    with django_capture_on_commit_callbacks() as callbacks:
        jobs.fail_job(job.id, "broken")
    assert published == []  # nothing before the commit
    for callback in callbacks:
        callback()
    assert (task_names.CONTINUE_FAILOVER, live.pk) in published
    assert (task_names.JOB_ENDED, job.id) in published


def test_a_failover_that_cannot_be_queued_is_abandoned_with_the_reason(vm, monkeypatch,
                                                                       django_capture_on_commit_callbacks):
    def dead_broker(task_name, args, **kwargs):
        raise ConnectionError("Connection refused")

    monkeypatch.setattr("replication.dispatch.publish", dead_broker)
    job = jobs.start_replication(vm)
    live = FailoverJob.objects.create(vm=vm, kind=FailoverKind.LIVE, status=FailoverStatus.RUNNING, final_cycle=job,
                                      actor="t")
    with django_capture_on_commit_callbacks(execute=True):
        jobs.fail_job(job.id, "broken")
    live.refresh_from_db()
    assert live.status == FailoverStatus.FAILED
    assert "could not queue the failover's next step (is Redis running?): Connection refused" in live.error_message
    job.refresh_from_db()
    assert job.status == JobStatus.FAILED


def test_a_test_failovers_end_queues_the_drill_that_started_it(vm, published, django_capture_on_commit_callbacks):
    failover = FailoverJob.objects.create(vm=vm, kind=FailoverKind.TEST, status=FailoverStatus.SUCCEEDED, actor="t")
    other = FailoverJob.objects.create(vm=vm, kind=FailoverKind.TEST, status=FailoverStatus.SUCCEEDED, actor="t")
    DrillRun.objects.create(vm=vm, status=DrillStatus.RUNNING, failover=failover)
    with django_capture_on_commit_callbacks(execute=True):
        signals.test_failover_ended.send(sender=FailoverJob, failover_id=failover.pk)
        signals.test_failover_ended.send(sender=FailoverJob, failover_id=other.pk)  # no drill: nothing
    assert published == [(task_names.DRILL_CONTINUE, failover.pk)]

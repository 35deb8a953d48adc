"""The whole progress pipeline with real parts: the copy loop in a real Celery
worker posts to the VMA API (runserver process, real Redis), the poller
brings it into the database, Flower-style event receivers see the copy."""

import contextlib
import threading
from datetime import timedelta

import pytest
import requests
from django.conf import settings
from django.utils import timezone

from oma_site.celery import app
from replication import dispatch
from replication.choices import DiskStatus, JobStatus
from replication.models import ReplicationJob, VMDisk
from replication.services import progress, reaper
from replication.services.inventory import register_image_vm
from replication.services.jobs import start_replication
from tests.helpers import MiB, PollerThread, free_port, make_image, slow_nbd_source, wait_for_job, wait_until
from vma_agent import task_names

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def slow_vm(tmp_path, sockdir, name, disks=2, size=16 * MiB, delay="200ms"):
    """A VM whose disks are read through nbdkit's delay filter: copies that
    take a few seconds, long enough to watch."""
    servers = []
    for i in range(disks):
        image = make_image(tmp_path / f"{name}-{i}.img", size, [(0, size)], seed=i + 3)
        servers.append(slow_nbd_source(sockdir, image, delay))
    return register_image_vm(name, [s.uri for s in servers]), servers


@contextlib.contextmanager
def succeeded_tasks():
    """The ids of tasks the workers report as succeeded (Celery's events), as
    they arrive."""
    done: set[str] = set()
    with app.connection_for_read() as conn:
        # Listening from the first event a worker sends (its heartbeat, every
        # 2 s): Redis subscribes a moment after the receiver says it consumes,
        # and a task ending in that moment was missed once.
        listening = threading.Event()
        receiver = app.events.Receiver(conn, handlers={"task-succeeded": lambda event: done.add(event["uuid"]),
                                                       "worker-heartbeat": lambda event: listening.set()})
        thread = threading.Thread(target=receiver.capture, kwargs={"limit": None, "wakeup": False}, daemon=True)
        thread.start()
        assert listening.wait(15), "no worker event reached the receiver"
        try:
            yield done
        finally:
            receiver.should_stop = True
            thread.join(10)


def agent_record(record_id):
    response = requests.get(f"{settings.VMA_URL}/api/v1/progress/{record_id}", timeout=10,
                            headers={"Authorization": f"Bearer {settings.VMA_TOKEN}"})
    return response.json() if response.status_code == 200 else None


def test_live_progress_reaches_the_database_during_the_copy(celery_worker_process, progress_poller,
                                                           tmp_path, sockdir):
    vm, servers = slow_vm(tmp_path, sockdir, "vm-live")
    try:
        job = start_replication(vm)
        samples = []

        def sample():
            row = ReplicationJob.objects.values_list("status", "progress_percent", "bytes_transferred").get(pk=job.id)
            samples.append(row)
            return row[0] in (JobStatus.COMPLETED, JobStatus.FAILED)

        wait_until(sample, timeout=120, what="job end")
    finally:
        for server in servers:
            server.stop()
    job.refresh_from_db()
    assert job.status == JobStatus.COMPLETED, job.error_message
    mid_copy = [s for s in samples if s[0] == JobStatus.REPLICATING and 30 < s[1] < 100]
    assert mid_copy, "no progress between 30 and 100 % was ever in the database during the copy"
    percents = [s[1] for s in samples]
    assert percents == sorted(percents), "job progress went backwards"
    # The agent kept each disk's final state, found by job id and by export name alike.
    record = agent_record(job.id)
    assert record["aggregate"]["status"] == "completed" and record["aggregate"]["percent"] == 100.0
    for disk in job.disks.select_related("target_volume"):
        by_export = agent_record(disk.target_volume.export_name)
        assert by_export["id"] == job.id
        assert by_export["disks"][disk.disk_key]["bytes_transferred"] == disk.bytes_total
        assert by_export["disks"][disk.disk_key]["stage"] == "Completed"


def test_a_poller_restart_mid_job_loses_nothing(celery_worker_process, vma_server, tmp_path, sockdir):
    vm, servers = slow_vm(tmp_path, sockdir, "vm-restart", disks=1, size=24 * MiB)
    first = PollerThread().start()
    try:
        job = start_replication(vm)
        wait_until(lambda: VMDisk.objects.filter(job=job, bytes_done__gt=0).exists(), timeout=60, what="first progress")
        first.stop()  # the poller process dies; its successor knows nothing but the database
        before = VMDisk.objects.get(job=job).bytes_done
        second = PollerThread().start()
        try:
            wait_until(lambda: VMDisk.objects.get(job=job).bytes_done > before or
                       ReplicationJob.objects.get(pk=job.id).status != JobStatus.REPLICATING,
                       timeout=60, what="progress after the restart")
            done = wait_for_job(job.id)
        finally:
            second.stop()
    finally:
        first.stop()
        for server in servers:
            server.stop()
    assert second.passes > 0
    assert done.status == JobStatus.COMPLETED, done.error_message
    assert done.progress_percent == 100.0 and done.bytes_transferred == done.total_bytes > 0


def test_unreachable_agent_api_never_fails_a_job_that_keeps_copying(celery_worker_process, vma_server,
                                                                    tmp_path, sockdir):
    vm, servers = slow_vm(tmp_path, sockdir, "vm-blips", disks=1, size=40 * MiB, delay="250ms")
    try:
        job = start_replication(vm)
        wait_until(lambda: VMDisk.objects.filter(job=job, status=DiskStatus.COPYING).exists(), timeout=60,
                   what="copy start")
        settings.VMA_URL = f"http://127.0.0.1:{free_port()}"  # the poller's view of the agent: gone
        try:
            for _ in range(5):
                stats = progress.poll_once()
                assert stats.errors == 1 and stats.failed == []
        finally:
            settings.VMA_URL = vma_server
        assert ReplicationJob.objects.get(pk=job.id).status == JobStatus.REPLICATING
        assert ReplicationJob.objects.get(pk=job.id).poll_errors == 5
        done = wait_for_job(job.id)
    finally:
        for server in servers:
            server.stop()
    assert done.status == JobStatus.COMPLETED, done.error_message


def test_empty_disk_ends_at_one_hundred_percent(celery_worker_process, progress_poller, tmp_path):
    empty = make_image(tmp_path / "empty.img", 8 * MiB, [])
    job = wait_for_job(start_replication(register_image_vm("vm-empty", [str(empty)])).id)
    assert job.status == JobStatus.COMPLETED, job.error_message
    assert job.progress_percent == 100.0 and job.total_bytes == 0
    disk = job.disks.get()
    assert disk.progress_percent == 100.0
    assert agent_record(job.id)["aggregate"]["percent"] == 100.0


def test_copy_tasks_publish_progress_events_for_flower(celery_worker_process, tmp_path, sockdir):
    events = []
    with app.connection_for_read() as conn:
        received = []
        receiver = app.events.Receiver(conn, handlers={"task-progress": events.append,
                                                       "task-received": received.append})
        ready = threading.Event()
        receiver.on_consume_ready = lambda *args, **kwargs: ready.set()
        thread = threading.Thread(target=receiver.capture, kwargs={"limit": None, "wakeup": False},
                                  daemon=True)
        thread.start()
        assert ready.wait(10), "event receiver did not start"
        vm, servers = slow_vm(tmp_path, sockdir, "vm-flower", disks=1, size=8 * MiB, delay="100ms")
        try:
            job = wait_for_job(start_replication(vm).id)
            disk = job.disks.get()

            def mine():
                return [e for e in events if e.get("disk_id") == f"{job.id}/{disk.disk_key}"]

            wait_until(lambda: len(mine()) >= 2 and mine()[-1].get("percent") == 100.0, timeout=10,
                       what="the copy's task-progress events, to its last")
        finally:
            for server in servers:
                server.stop()
            receiver.should_stop = True
            thread.join(10)
    assert job.status == JobStatus.COMPLETED, job.error_message
    mine = mine()
    assert len(mine) >= 2
    # Flower and the worker logs show the order as job, VM and disk, not as the whole order.
    copy = next(e for e in received if e["uuid"] == disk.celery_task_id)
    assert copy["name"] == "vma.copy_disk" and copy["args"] == f"(job {job.id}, VM vm-flower, disk-2000, attempt 1)"
    assert mine[-1]["current"] == mine[-1]["total"] == disk.bytes_total
    assert mine[-1]["percent"] == 100.0 and mine[-1]["uuid"] == disk.celery_task_id


def test_reaper_fails_a_job_whose_worker_is_gone_and_requeues_a_lost_finalize(tmp_path, monkeypatch, settings):
    enqueued = []
    monkeypatch.setattr("replication.services.jobs.enqueue_prepare", lambda *args, **kwargs: None)
    monkeypatch.setattr("replication.services.orders.send_copy", lambda disk: enqueued.append(("copy", disk.pk)))
    publish = dispatch.publish

    def recording_finalize(task_name, args, **kwargs):
        if task_name != task_names.FINALIZE_JOB:
            return publish(task_name, args, **kwargs)
        enqueued.append(("finalize_job", *args))

    monkeypatch.setattr("replication.dispatch.publish", recording_finalize)
    images = [str(make_image(tmp_path / f"r{i}.img", MiB, [(0, 4096)])) for i in range(2)]
    lost = start_replication(register_image_vm("vm-reaped", images))
    assert lost.enter_stage("Initializing", JobStatus.PREPARING)
    assert lost.enter_stage("Transfer", JobStatus.REPLICATING)
    for disk in lost.disks.all():
        assert disk.start_attempt("dead-task")
    finalizing = start_replication(register_image_vm("vm-finalize-lost", images[:1]))
    assert finalizing.enter_stage("Initializing", JobStatus.PREPARING)
    assert finalizing.enter_stage("Transfer", JobStatus.REPLICATING)
    disk = finalizing.disks.get()
    assert disk.start_attempt("t") and disk.complete(bytes_total=4096, bytes_zeroed=0, throughput_bps=1)
    assert finalizing.transition(JobStatus.FINALIZING)

    assert reaper.reap().failed == []  # everything fresh
    result = reaper.reap(now=timezone.now() + timedelta(seconds=settings.REAPER_TIMEOUT_S + 1))

    assert result.failed == [lost.id] and result.requeued == [finalizing.id]
    lost.refresh_from_db()
    assert lost.status == JobStatus.FAILED and "no sign of life for" in lost.error_message
    assert set(lost.disks.values_list("status", flat=True)) == {DiskStatus.FAILED}
    assert enqueued == [("finalize_job", finalizing.id)]  # nothing handed to a new run: the job is over


def copying_disk(tmp_path, monkeypatch, vm_name: str, task_id: str, agent: str = "local"):
    """A replicating one-disk job whose disk was handed to run 1 (task_id);
    returns the job, the disk, and the list the disks handed to a new run go to."""
    requeued = []
    monkeypatch.setattr("replication.services.orders.send_copy", lambda disk: requeued.append(disk.pk))
    image = make_image(tmp_path / f"{vm_name}.img", MiB, [(0, 4096)])
    job = start_replication(register_image_vm(vm_name, [str(image)], agent))
    assert job.enter_stage("Initializing", JobStatus.PREPARING)
    assert job.enter_stage("Transfer", JobStatus.REPLICATING)
    disk = job.disks.get()
    assert disk.start_attempt(task_id)
    return job, disk, requeued


def test_reaper_judges_no_copy_lost_until_the_database_was_up_a_heartbeat_timeout(tmp_path, monkeypatch, settings):
    """After a database restart every heartbeat looks stale, though the copies
    rode the outage out: the reaper waits until the server has been up for
    HEARTBEAT_TIMEOUT_S before it hands a silent copy over."""
    job, disk, requeued = copying_disk(tmp_path, monkeypatch, "vm-db-restarted", "t")
    VMDisk.objects.filter(pk=disk.pk).update(worker="w")
    silent = timezone.now() - timedelta(seconds=settings.HEARTBEAT_TIMEOUT_S + 5)
    VMDisk.objects.filter(pk=disk.pk).update(heartbeat_at=silent)
    ReplicationJob.objects.filter(pk=job.pk).update(heartbeat_at=silent)
    up_for = settings.HEARTBEAT_TIMEOUT_S - 1
    monkeypatch.setattr(reaper, "database_up_since", lambda: timezone.now() - timedelta(seconds=up_for))

    assert reaper.reap().disks_requeued == [] and requeued == []
    assert VMDisk.objects.get(pk=disk.pk).worker == "w"  # still the live copy's
    up_for = settings.HEARTBEAT_TIMEOUT_S + 1
    assert reaper.reap().disks_requeued == [disk.pk] and requeued == [disk.pk]


def test_a_run_whose_order_just_left_a_busy_agents_queue_has_time_to_report(tmp_path, monkeypatch, settings):
    """A copy order that waited in its agent's queue (every copy slot taken)
    longer than HEARTBEAT_TIMEOUT_S is not lost while it waits, nor in the
    moment after the agent takes it and before its first report comes
    through (a pass judged one lost so, under load); it is once it has been
    gone from the queue for HEARTBEAT_TIMEOUT_S without a word."""
    import redis

    from vma_agent.task_names import agent_queue

    # An agent no worker of the test session serves: its queue holds the order until the test takes it.
    job, disk, requeued = copying_disk(tmp_path, monkeypatch, "vm-queued-late", "order-in-the-queue",
                                       agent="test-busy-agent")
    queue = agent_queue(job.vm.agent)
    broker = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    broker.delete(queue)
    app.send_task("vma.copy_disk", args=[{}], queue=queue, task_id="order-in-the-queue")
    try:
        waited = timezone.now() + timedelta(seconds=settings.HEARTBEAT_TIMEOUT_S + 5)
        assert reaper.reap(now=waited).disks_requeued == []  # waiting: queued, not lost
        assert VMDisk.objects.get(pk=disk.pk).waiting_seen_at == waited
    finally:
        broker.delete(queue)  # the agent took the order; its first report is not in yet

    assert reaper.reap(now=waited + timedelta(seconds=1)).disks_requeued == [] and requeued == []
    gone = waited + timedelta(seconds=settings.HEARTBEAT_TIMEOUT_S + 1)
    assert reaper.reap(now=gone).disks_requeued == [disk.pk] and requeued == [disk.pk]
    assert VMDisk.objects.get(pk=disk.pk).waiting_seen_at is None  # the new run starts afresh


def test_database_up_since_is_the_servers_start(settings):
    from django.db import connection

    up_since = reaper.database_up_since()
    if connection.vendor == "mysql":
        assert timezone.now() - timedelta(days=3650) < up_since < timezone.now()
    else:
        assert up_since is None


def test_periodic_tasks_run_on_the_worker_and_beat_never_queues_the_poller(celery_worker_process, tmp_path,
                                                                            monkeypatch):
    """The poller is a process of its own (manage.py poll_progress): beat
    queues only the reaper and the sweeper; the poll task still runs on a
    worker when asked."""
    from replication import tasks
    from tests.test_progress_api import post

    monkeypatch.setattr("replication.services.jobs.enqueue_prepare", lambda *args: None)
    image = make_image(tmp_path / "beat.img", MiB, [(0, 4096)])
    job = start_replication(register_image_vm("vm-beat", [str(image)]))
    assert job.enter_stage("Initializing", JobStatus.PREPARING)
    assert job.enter_stage("Transfer", JobStatus.REPLICATING)
    assert job.disks.get().start_attempt("t")
    post(settings.VMA_URL, job.id, {"stage": "Transfer", "status": "in_progress", "seq": 1, "disk_id": "disk-2000",
                                    "bytes_transferred": 123, "total_bytes": 4096})

    scheduled = {entry["task"] for entry in settings.CELERY_BEAT_SCHEDULE.values()}
    assert scheduled == {"replication.reap_stale", "replication.sweep_snapshots", "replication.cloud_drift"}
    assert {entry["options"]["queue"] for entry in settings.CELERY_BEAT_SCHEDULE.values()} == {"oma"}
    assert scheduled <= set(app.tasks)
    tasks.poll_progress.delay()
    wait_until(lambda: VMDisk.objects.get(job=job).bytes_done == 123, timeout=30, what="the worker's poller pass")
    # Nothing stale: the job stays. Waited on the task's own end (the worker's
    # task-succeeded event), not on a sleep.
    with succeeded_tasks() as done:
        reap = tasks.reap_stale.delay()
        wait_until(lambda: reap.id in done, timeout=30, what="the reaper pass on the worker")
    assert ReplicationJob.objects.get(pk=job.id).status == JobStatus.REPLICATING

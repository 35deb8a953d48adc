"""The OMA poller against the real VMA progress API (runserver process, real
Redis): id resolution, heartbeats and checkpoints, network errors,
monotonic and throttled writes; it judges nothing (the reaper does). Time is simulated through poll_once(now=...)
rather than slept."""

import random
from datetime import timedelta

import pytest

from replication.choices import DiskStatus, JobStatus, Stage
from replication.models import ReplicationJob, VMDisk
from replication.services import progress
from replication.services.inventory import register_image_vm
from replication.services.jobs import start_replication
from tests.helpers import MiB, free_port, make_image
from tests.test_progress_api import post

pytestmark = [pytest.mark.integration, pytest.mark.django_db]


@pytest.fixture
def replicating_job(tmp_path, monkeypatch, vma_server):
    """A job in Transfer with its disks claimed, as the workflow leaves it,
    without a worker (enqueueing is recorded, not sent)."""
    monkeypatch.setattr("replication.services.jobs.enqueue_prepare", lambda *args: None)

    def make(name="vm-poll", disks=2):
        images = [str(make_image(tmp_path / f"{name}-{i}.img", MiB, [(0, 4096)])) for i in range(disks)]
        job = start_replication(register_image_vm(name, images))
        assert job.enter_stage(Stage.INITIALIZING, JobStatus.PREPARING)
        assert job.enter_stage(Stage.TRANSFER, JobStatus.REPLICATING)
        for disk in job.disks.all():
            assert disk.start_attempt("task-x")
        return ReplicationJob.objects.get(pk=job.id)

    return make


def update(seq, done, total=1000, stage="Transfer", status="in_progress", **extra):
    return {"stage": stage, "status": status, "seq": seq, "bytes_transferred": done, "total_bytes": total,
            "percent": 100.0 * done / total if total else 100.0, "throughput_bps": 100, **extra}


def disk_state(job, key="disk-2000"):
    return VMDisk.objects.get(job=job, disk_key=key)


def later(job, seconds):
    return job.started_at + timedelta(seconds=seconds)


def test_poller_finds_progress_reported_only_by_export_name(vma_server, replicating_job):
    """MigrateKit OSSEA's bug: its VMA knows export names, its OMA knows job ids."""
    job = replicating_job()
    disks = list(job.disks.order_by("disk_key").select_related("target_volume"))
    for i, disk in enumerate(disks):
        export = disk.target_volume.export_name
        # No job id anywhere in these updates: only the database can link them.
        assert post(vma_server, export, update(10, 250 * (i + 1), disk_id=export)).status_code == 200

    stats = progress.poll_once(now=later(job, 3))

    assert stats.not_found == 0 and stats.failed == []
    assert [disk_state(job, d.disk_key).bytes_done for d in disks] == [250, 500]
    job.refresh_from_db()
    assert job.bytes_transferred == 750 and job.total_bytes == 2000
    assert job.progress_percent == pytest.approx(30 + 70 * 750 / 2000)
    assert job.last_progress_at is not None and job.status == JobStatus.REPLICATING


def test_poller_finds_progress_reported_only_by_job_id(vma_server, replicating_job):
    job = replicating_job()
    for key, done in [("disk-2000", 100), ("disk-2001", 900)]:
        assert post(vma_server, job.id, update(7, done, disk_id=key)).status_code == 200

    progress.poll_once(now=later(job, 3))

    assert disk_state(job, "disk-2000").bytes_done == 100
    assert disk_state(job, "disk-2001").bytes_done == 900
    assert disk_state(job, "disk-2001").current_operation == Stage.TRANSFER


def test_first_update_twenty_seconds_after_start_is_picked_up(vma_server, replicating_job):
    job = replicating_job()
    for t in (0, 5, 10, 15, 20):
        stats = progress.poll_once(now=later(job, t))
        assert stats.not_found == 1 and stats.failed == []
    assert ReplicationJob.objects.get(pk=job.id).status == JobStatus.REPLICATING

    post(vma_server, job.id, update(1, 400, disk_id="disk-2000", job_id=job.id))
    stats = progress.poll_once(now=later(job, 25))

    assert stats.not_found == 0 and stats.disks_written == 1
    assert disk_state(job).bytes_done == 400


def test_the_poller_judges_nothing_a_missing_record_is_left_to_the_reaper(vma_server, replicating_job):
    job = replicating_job()
    for t in (29, 95, 3600):
        stats = progress.poll_once(now=later(job, t))
        assert stats.failed == [] and stats.not_found == 1
    job.refresh_from_db()
    assert job.status == JobStatus.REPLICATING
    assert set(job.disks.values_list("status", flat=True)) == {DiskStatus.COPYING}


def test_an_update_is_the_copy_runs_heartbeat_and_carries_its_checkpoint(vma_server, replicating_job):
    job = replicating_job(disks=1)
    post(vma_server, job.id, update(1, 100, disk_id="disk-2000", attempt=1, checkpoint_bytes=64, worker="agent1:42"))
    now = later(job, 30)
    progress.poll_once(now=now)
    disk = disk_state(job)
    assert (disk.heartbeat_at, disk.checkpoint_bytes, disk.worker) == (now, 64, "agent1:42")

    # Nothing moved, but the run keeps reporting: stored as its heartbeat.
    post(vma_server, job.id, update(2, 100, disk_id="disk-2000", attempt=1, checkpoint_bytes=64, worker="agent1:42"))
    progress.poll_once(now=now + timedelta(seconds=60))
    assert disk_state(job).heartbeat_at == now + timedelta(seconds=60)


def test_a_taken_over_run_no_longer_moves_the_disk(vma_server, replicating_job):
    job = replicating_job(disks=1)
    disk = job.disks.get()
    assert disk.start_attempt("task-y", taking_over=True) and disk.attempts == 2
    post(vma_server, job.id, update(5, 900, disk_id="disk-2000", attempt=1, checkpoint_bytes=900))
    progress.poll_once(now=later(job, 3))
    assert (disk_state(job).bytes_done, disk_state(job).checkpoint_bytes) == (0, 0)

    post(vma_server, job.id, update(6, 300, disk_id="disk-2000", attempt=2, checkpoint_bytes=256))
    progress.poll_once(now=later(job, 6))
    assert (disk_state(job).bytes_done, disk_state(job).checkpoint_bytes) == (300, 256)


def test_network_errors_never_fail_a_job(vma_server, replicating_job, settings):
    job = replicating_job()
    post(vma_server, job.id, update(1, 100, disk_id="disk-2000"))
    progress.poll_once(now=later(job, 2))
    settings.VMA_URL = f"http://127.0.0.1:{free_port()}"  # nothing listens there

    for i in range(5):
        stats = progress.poll_once(now=later(job, 600 + i * 5))
        assert stats.errors == 1 and stats.failed == []
    job.refresh_from_db()
    assert job.status == JobStatus.REPLICATING and job.poll_errors == 5

    settings.VMA_URL = vma_server
    post(vma_server, job.id, update(2, 600, disk_id="disk-2000"))
    progress.poll_once(now=later(job, 700))
    job.refresh_from_db()
    assert job.poll_errors == 0 and disk_state(job).bytes_done == 600


def test_out_of_order_and_replayed_updates_never_move_progress_backwards(vma_server, replicating_job):
    job = replicating_job()
    rng = random.Random(5)
    updates = [(seq, seq * 10) for seq in range(1, 61)]
    deliveries = updates + rng.sample(updates, 30)  # every update, plus replays
    rng.shuffle(deliveries)
    seen = []
    for step, (seq, done) in enumerate(deliveries):
        post(vma_server, job.id, update(seq, done, disk_id="disk-2000"))
        progress.poll_once(now=later(job, 3 + step * 0.5))
        seen.append(disk_state(job).bytes_done)

    assert seen == sorted(seen), "progress went backwards"
    assert seen[-1] == 600


def test_poller_ignores_an_older_update_even_from_another_id(replicating_job):
    """Monotonic in the poller itself, not only in the agent's store."""
    job = replicating_job(disks=1)
    disk = job.disks.get()
    now = later(job, 5)
    newer = progress.Fetched(job.id, {disk.pk: update(9, 700)}, found=True)
    older = progress.Fetched(job.id, {disk.pk: update(8, 200)}, found=True)
    for fetched in (newer, older):
        progress.apply(progress.active_jobs()[0], fetched, now, progress.PassStats())
        now += timedelta(seconds=5)
    assert disk_state(job).bytes_done == 700


def test_writes_are_throttled_to_one_percent_or_two_seconds(vma_server, replicating_job):
    job = replicating_job(disks=1)
    post(vma_server, job.id, update(1, 100, total=100_000, disk_id="disk-2000"))
    assert progress.poll_once(now=later(job, 1)).disks_written == 1

    post(vma_server, job.id, update(2, 200, total=100_000, disk_id="disk-2000"))  # +0.1 %
    assert progress.poll_once(now=later(job, 1.5)).disks_written == 0
    assert progress.poll_once(now=later(job, 3.5)).disks_written == 1  # 2 s later
    assert progress.poll_once(now=later(job, 6)).disks_written == 0  # nothing new

    post(vma_server, job.id, update(3, 5000, total=100_000, disk_id="disk-2000"))  # +4.8 %
    assert progress.poll_once(now=later(job, 6.1)).disks_written == 1
    assert disk_state(job).bytes_done == 5000


def test_a_completed_disk_keeps_its_final_state(vma_server, replicating_job):
    job = replicating_job(disks=1)
    disk = job.disks.get()
    disk.complete(bytes_total=1000, bytes_zeroed=0, throughput_bps=5)
    post(vma_server, job.id, update(50, 10, disk_id="disk-2000"))

    progress.poll_once(now=later(job, 3))

    assert disk_state(job).bytes_done == 1000 and disk_state(job).progress_percent == 100.0


def test_export_record_of_an_earlier_job_is_not_taken_for_this_one(vma_server, replicating_job):
    job = replicating_job(disks=1)
    export = job.disks.get().target_volume.export_name
    post(vma_server, export, update(99, 1000, job_id="job-20200101-000000.000-aaaaaa", disk_id="disk-2000"))

    stats = progress.poll_once(now=later(job, 3))

    assert stats.not_found == 1 and disk_state(job).bytes_done == 0


def test_poll_progress_command_runs_one_pass(vma_server, replicating_job):
    from io import StringIO

    from django.core.management import call_command

    job = replicating_job(disks=1)
    post(vma_server, job.id, update(1, 300, disk_id="disk-2000"))
    out = StringIO()
    call_command("poll_progress", "--once", stdout=out)
    assert "polled 1 jobs" in out.getvalue()
    assert disk_state(job).bytes_done == 300


def test_jobs_watch_draws_live_bars_until_the_jobs_end(vma_server, replicating_job):
    from io import StringIO

    from django.core.management import call_command

    job = replicating_job()
    post(vma_server, job.id, update(1, 420, disk_id="disk-2000"))
    progress.poll_once(now=later(job, 3))
    out = StringIO()
    call_command("jobs", "--watch", "--iterations", "2", "--interval", "0.01", stdout=out)
    drawn = out.getvalue()
    assert "vm-poll replicating Transfer" in drawn
    assert "disk-2000 copying" in drawn and "42.0%" in drawn and "420 B of 1000 B" in drawn

    job.fail("stopped for the test")
    out = StringIO()
    call_command("jobs", "--watch", "--interval", "0.01", stdout=out)  # returns: nothing active
    assert "no active jobs" in out.getvalue()


def test_a_finalizing_job_is_left_to_the_reaper_not_failed_by_the_poller(vma_server, replicating_job):
    job = replicating_job(disks=1)
    post(vma_server, job.id, update(1, 1000, status="completed", stage="Completed", disk_id="disk-2000"))
    disk = job.disks.get()
    assert disk.complete(bytes_total=1000, bytes_zeroed=0, throughput_bps=1)
    assert job.transition(JobStatus.FINALIZING)

    stats = progress.poll_once(now=later(job, 3600))  # finalize long lost, nothing reports

    assert stats.failed == []
    assert ReplicationJob.objects.get(pk=job.id).status == JobStatus.FINALIZING


def test_a_pass_over_more_jobs_than_one_batch_writes_each_job_its_own_numbers(vma_server, replicating_job,
                                                                              monkeypatch):
    monkeypatch.setattr(progress, "APPLY_BATCH_JOBS", 4)  # batches of a few: the split is what is tested
    jobs = [replicating_job(name=f"vm-batch-{i}", disks=2) for i in range(progress.APPLY_BATCH_JOBS + 3)]
    for i, job in enumerate(jobs):
        post(vma_server, job.id, update(5, 10 * (i + 1), total=10_000, disk_id="disk-2000"))
        post(vma_server, job.id, update(5, 20 * (i + 1), total=10_000, disk_id="disk-2001"))

    stats = progress.poll_once(now=later(jobs[-1], 3))

    assert stats.disks_written == 2 * len(jobs) and stats.jobs_written == len(jobs)
    for i, job in enumerate(jobs):
        job.refresh_from_db()
        assert (job.bytes_transferred, job.total_bytes) == (30 * (i + 1), 20_000)
        assert job.progress_percent == pytest.approx(30 + 70 * 30 * (i + 1) / 20_000)
        assert disk_state(job, "disk-2001").progress_percent == pytest.approx(0.2 * (i + 1))


def test_job_totals_written_by_a_pass_are_those_its_disks_give_capped_by_the_limit(vma_server, replicating_job):
    """The poller computes a job's totals from the disks it has just read
    and written; reading them back from the table gives the same numbers,
    and a disk measured above the job's limit counts at the limit."""
    job = replicating_job(disks=3)
    ReplicationJob.objects.filter(pk=job.id).update(bandwidth_limit_bps=150)
    post(vma_server, job.id, update(4, 300, disk_id="disk-2000", throughput_bps=500, eta_seconds=1))
    post(vma_server, job.id, update(4, 200, disk_id="disk-2001", throughput_bps=100))
    post(vma_server, job.id, update(4, 0, disk_id="disk-2002", throughput_bps=50))

    stats = progress.poll_once(now=later(job, 3))

    assert (stats.disks_written, stats.jobs_written) == (3, 1)
    columns = ("bytes_transferred", "total_bytes", "throughput_bps", "progress_percent", "eta_seconds")
    written = ReplicationJob.objects.values_list(*columns).get(pk=job.id)
    assert written == (500, 3000, 150 + 100 + 50, pytest.approx(30 + 70 * 500 / 3000), 1000 // 50)
    job.refresh_totals()  # the other writer of totals: it reads the disks from the table
    assert ReplicationJob.objects.values_list(*columns).get(pk=job.id) == written


def test_a_job_is_sampled_every_few_seconds_also_by_a_restarted_poller(vma_server, replicating_job, monkeypatch):
    """The poller keeps when it last sampled each job (no read of the samples
    per pass); a restarted poller, knowing none, reads them once, so no job
    is sampled twice within PROGRESS_SAMPLE_S either way."""
    from replication.models import ProgressSample
    from replication.models.jobs import PROGRESS_SAMPLE_S

    job = replicating_job()
    monkeypatch.setattr(progress, "_sampled", {})

    def moved(seq, seconds):
        post(vma_server, job.id, update(seq, 100 * seq, disk_id="disk-2000"))
        assert progress.poll_once(now=later(job, seconds)).jobs_written == 1

    def sampled():
        return [(at - job.started_at).total_seconds() for at in ProgressSample.objects.filter(job=job)
                .order_by("at").values_list("at", flat=True)]

    assert PROGRESS_SAMPLE_S == timedelta(seconds=5)
    moved(1, 3)
    moved(2, 6)  # 3 s after the first sample
    assert sampled() == [3]
    # A restarted poller: nothing in memory, the same table.
    monkeypatch.setattr(progress, "_sampled", {})
    monkeypatch.setattr(progress, "_feeds", {})
    monkeypatch.setattr(progress, "_disk_refs", {})
    moved(3, 7.5)  # 4.5 s after it
    assert sampled() == [3]
    moved(4, 8.5)
    moved(5, 9)
    assert sampled() == [3, 8.5]
    assert progress._sampled == {job.id: later(job, 8.5)}


def test_a_pass_runs_with_the_collector_paused_and_collects_its_cycles_at_its_end(vma_server, replicating_job,
                                                                                    monkeypatch):
    """The cyclic garbage collector does not walk the poller's objects in the
    middle of a pass; a cycle a pass leaves is gone when it ends, and the
    collector is on again (unless it was off before the pass)."""
    import gc
    import weakref

    job = replicating_job()
    post(vma_server, job.id, update(1, 300, disk_id="disk-2000"))
    seen = {}
    reading = progress.active_jobs

    class Node:
        pass

    def active_jobs_leaving_a_cycle():
        seen["enabled"] = gc.isenabled()
        node = Node()
        node.me = node
        seen["cycle"] = weakref.ref(node)
        return reading()

    monkeypatch.setattr(progress, "active_jobs", active_jobs_leaving_a_cycle)
    monkeypatch.setattr(progress, "_full_collection_at", float("inf"))  # no full collection: the young one suffices
    assert gc.isenabled()
    assert progress.poll_once(now=later(job, 3)).disks_written == 1
    assert seen["enabled"] is False and gc.isenabled()
    assert seen["cycle"]() is None

    gc.disable()
    try:
        progress.poll_once(now=later(job, 4))
        assert not gc.isenabled() and seen["cycle"]() is not None  # left as it was, nothing collected
    finally:
        gc.enable()

"""The OMA poller's fetch half on the agent's change feed (real runserver,
real Redis): one request per pass whatever the number of jobs, a job whose
record did not change is found with nothing new, a restarted poller reads
everything once, an emptied agent store is noticed, seq-less updates reach
the database (token-less ones never do)."""

import pytest

from replication.choices import JobStatus
from replication.models import ReplicationJob
from replication.services import progress
from tests.test_progress_api import post
from tests.test_progress_poller import disk_state, later, replicating_job, update  # noqa: F401 (fixture)

pytestmark = [pytest.mark.integration, pytest.mark.django_db]


def test_one_pass_is_one_request_whatever_the_number_of_jobs(vma_server, replicating_job):  # noqa: F811
    jobs = [replicating_job(f"vm-feed-{i}") for i in range(4)]
    progress.poll_once(now=later(jobs[0], 1))  # catch up with what other tests left
    for job in jobs:
        for key in ("disk-2000", "disk-2001"):
            post(vma_server, job.id, update(1, 100, disk_id=key))

    stats = progress.poll_once(now=later(jobs[0], 3))
    assert stats.requests == 1 and stats.disks_written == 8 and stats.not_found == 0

    # Nothing changed: still one request, every job found, nothing new.
    stats = progress.poll_once(now=later(jobs[0], 4))
    assert (stats.requests, stats.not_found, stats.errors, stats.disks_written) == (1, 0, 0, 0)

    post(vma_server, jobs[2].id, update(2, 900, disk_id="disk-2001"))
    stats = progress.poll_once(now=later(jobs[0], 8))
    assert stats.requests == 1 and stats.disks_written == 1
    assert disk_state(jobs[2], "disk-2001").bytes_done == 900


def test_a_restarted_poller_reads_every_record_once(vma_server, replicating_job, monkeypatch):  # noqa: F811
    job = replicating_job()
    post(vma_server, job.id, update(1, 300, disk_id="disk-2000"))
    progress.poll_once(now=later(job, 3))
    monkeypatch.setattr(progress, "_feeds", {})  # a new poller process: cursor 0, nothing held

    stats = progress.poll_once(now=later(job, 60))

    assert stats.not_found == 0 and stats.failed == [] and stats.disks_written == 0
    assert progress._feed().cursor > 0 and job.id in progress._feed().known


def test_a_job_whose_record_was_let_go_is_fetched_once_when_it_becomes_active(vma_server,
                                                                             replicating_job):  # noqa: F811
    active, waiting = replicating_job("vm-active"), replicating_job("vm-waiting")
    ReplicationJob.objects.filter(pk=waiting.id).update(status=JobStatus.PENDING)
    post(vma_server, waiting.id, update(1, 250, disk_id="disk-2000"))
    progress.poll_once(now=later(active, 3))
    assert waiting.id in progress._feed().known and waiting.id not in progress._feed().records

    ReplicationJob.objects.filter(pk=waiting.id).update(status=JobStatus.REPLICATING)
    stats = progress.poll_once(now=later(active, 6))

    assert stats.requests == 2 and stats.not_found == 1  # the feed, then one GET; `active` has no record
    assert disk_state(waiting).bytes_done == 250


def test_an_emptied_agent_store_is_noticed(vma_server, replicating_job, vma_store):  # noqa: F811
    job = replicating_job()
    post(vma_server, job.id, update(1, 300, disk_id="disk-2000"))
    progress.poll_once(now=later(job, 3))
    # The agent's Redis lost everything (restart without persistence).
    for key in vma_store.client.scan_iter(f"{vma_store.prefix}:*"):
        vma_store.client.delete(key)

    stats = progress.poll_once(now=later(job, 6))

    assert stats.not_found == 1 and stats.errors == 0
    assert job.id not in progress._feed().known


def test_updates_without_seq_reach_the_database_but_token_less_ones_never_do(vma_server,
                                                                            replicating_job):  # noqa: F811
    """Seq-less updates (migratekit's body) apply in arrival order. One sent
    without a token (VMA_TRUST_LOOPBACK) is shown by the agent API only: the
    OMA's copies report with the token, so a token-less entry is never
    taken as their progress, heartbeat or cursor (issue 26)."""
    job = replicating_job(disks=1)
    raw = (b'{"stage":"Transfer","bytes_transferred":%d,"total_bytes":43253760,"throughput_bps":0,'
           b'"percent":1,"disk_id":"disk-2000","sync_type":"full"}')
    beat = disk_state(job).heartbeat_at
    assert post(vma_server, job.id, None, raw=raw % 4096, headers={}).json()["applied"]
    progress.poll_once(now=later(job, 2))
    assert (disk_state(job).bytes_done, disk_state(job).heartbeat_at) == (0, beat)
    for step, done in enumerate((432537, 21626880, 43253760)):
        post(vma_server, job.id, None, raw=raw % done)
        progress.poll_once(now=later(job, 3 + 3 * step))
        assert disk_state(job).bytes_done == done
    job.refresh_from_db()
    assert job.progress_percent == pytest.approx(100.0)

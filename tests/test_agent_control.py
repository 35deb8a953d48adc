"""The agent's own bookkeeping of its copies (real Redis): claims fenced by
attempt, leases, stop requests; and the broker look-up the reaper makes
before it judges a run that never reported."""

import socket
import subprocess

import pytest
import redis
from django.conf import settings

from replication.services.broker import WaitingTasks, waiting_task_ids
from vma_agent.control import AgentControl, Claim


@pytest.fixture
def control():
    client = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    prefix = "test:control"
    for key in client.scan_iter(f"{prefix}:*"):
        client.delete(key)
    return AgentControl(client, prefix=prefix, lease_s=60)


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_one_run_per_attempt_and_a_newer_attempt_takes_over(control):
    assert control.claim("job-1", "disk-2000", 1, "host-a:1") is None
    assert "already being copied by host-a:1" in control.claim("job-1", "disk-2000", 1, "host-b:2")
    assert control.check("job-1", "disk-2000", 1, "host-a:1") is None

    assert control.claim("job-1", "disk-2000", 2, "host-b:2") is None  # the reaper's new run
    assert control.check("job-1", "disk-2000", 1, "host-a:1") == "superseded by attempt 2 on host-b:2"
    assert control.claim("job-1", "disk-2000", 1, "host-a:3") == "attempt 2 already took it over"
    assert control.copies_running("job-1") == ["disk-2000"]


def test_an_ended_attempt_is_never_copied_again(control):
    assert control.claim("job-2", "disk-2000", 1, "host-a:1") is None
    control.release("job-2", "disk-2000", 1, "host-a:1")
    assert control.copies_running("job-2") == []
    assert control.claim("job-2", "disk-2000", 1, "host-a:9") == "attempt 1 already ended on host-a:1"


def test_a_redelivery_takes_the_disk_when_its_holder_is_gone(control):
    here = socket.gethostname()
    assert control.claim("job-3", "disk-2000", 1, f"{here}:{dead_pid()}") is None
    assert control.claim("job-3", "disk-2000", 1, f"{here}:{dead_pid()}") is None  # the holder died on this host

    key = control._claim_key("job-3", "disk-2001")
    control.client.set(key, Claim(1, "elsewhere:5", expires=1.0).dump())  # a lease that ran out long ago
    assert control.claim("job-3", "disk-2001", 1, "host-b:6") is None
    assert control.copies_running("job-3") == ["disk-2001"]  # disk-2000's holder is dead too


def test_a_stop_request_stops_every_run_of_the_job(control):
    assert control.claim("job-4", "disk-2000", 1, "host-a:1") is None
    control.request_stop("job-4", "cancelled by the operator")
    assert control.check("job-4", "disk-2000", 1, "host-a:1") == "job job-4 stopped: cancelled by the operator"
    assert control.check("job-5", "disk-2000", 1, "host-a:1") is None  # other jobs go on


def test_the_reaper_sees_which_orders_still_wait_in_an_agents_queue():
    from oma_site.celery import app

    queue = "vma.test-nobody-consumes"
    client = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    client.delete(queue)
    waiting = app.send_task("vma.copy_disk", args=[{}], queue=queue)
    try:
        assert waiting.id in waiting_task_ids(queue)
        assert WaitingTasks().holds(queue, waiting.id) and not WaitingTasks().holds(queue, "another-id")
    finally:
        client.delete(queue)
    assert waiting_task_ids(queue) == set()

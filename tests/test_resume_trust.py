"""Where a copy resumes (issue 26, finding 1): only from the cursor the copy
recorded itself in the agent's control store, never from the HTTP-writable
progress store or the OMA's order; and a resumed run compares what it skips
with the source, so it ends equal to the source whatever the cursor said.
Real nbdkit source and target, the real agent API and Redis; the killed run
is a real process killed with SIGKILL (as an OOM kill would)."""

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import asdict

import pytest
from django.conf import settings

from replication.choices import JobStatus, Stage
from replication.models import JobEvent
from replication.services.inventory import register_image_vm
from replication.services.jobs import disk_copied, resume_note, start_replication
from tests.helpers import PROJECT_ROOT, MiB, make_image, sha256, wait_until
from tests.test_progress_api import new_job_id, post
from vma_agent import steps
from vma_agent.contract import CopyOrder, DiskCopied
from vma_agent.control import AgentControl, Checkpoint

pytestmark = pytest.mark.integration

SIZE = 16 * MiB
DATA = [(0, 3 * MiB), (4 * MiB, 6 * MiB), (12 * MiB, 3 * MiB)]

# Runs one copy_disk in its own process, as an agent worker would.
RUNNER = """
import json, sys
from vma_agent import contract, steps
order = contract.CopyOrder.from_dict(json.loads(sys.argv[1]))
print(json.dumps(steps.copy_disk(order, steps.AgentConfig(**json.loads(sys.argv[2]))).as_dict()), flush=True)
"""


@pytest.fixture
def agent_config(vma_server):
    return steps.AgentConfig(
        vma_url=vma_server, vma_token=settings.VMA_TOKEN, redis_url=settings.VMA_REDIS_URL,
        progress_prefix=settings.VMA_PROGRESS_PREFIX, control_prefix=f"{settings.VMA_PROGRESS_PREFIX}:control",
        chunk_bytes=256 * 1024, connections=1, depth=4, progress_interval_s=0.05, checkpoint_interval_s=0.1,
        heartbeat_interval_s=0.5, heartbeat_timeout_s=60)


@pytest.fixture
def disk(tmp_path, serve):
    """A source with data and holes, a fresh (zero) target of its size, both served by nbdkit."""
    src = make_image(tmp_path / "src.img", SIZE, DATA)
    dst = tmp_path / "dst.img"
    with open(dst, "wb") as f:
        f.truncate(SIZE)
    source, target = serve("--readonly", "file", str(src)), serve("file", str(dst))

    def order(**changes) -> CopyOrder:
        fields = {"job_id": new_job_id(), "disk_key": "disk-2000", "attempt": 1,
                  "export_name": f"migration-vol-{uuid.uuid4()}", "source_locator": source.uri,
                  "target_uri": target.uri, "capacity_bytes": SIZE, "sync_type": "full"} | changes
        return CopyOrder(**fields)

    return src, dst, order


def control_of(config: steps.AgentConfig) -> AgentControl:
    return config.control()


def start_killable_copy(order: CopyOrder, config: steps.AgentConfig) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    return subprocess.Popen([sys.executable, "-c", RUNNER, json.dumps(order.as_dict()), json.dumps(asdict(config))],
                            cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_a_forged_checkpoint_and_a_killed_copy_end_equal_to_the_source(disk, agent_config, vma_server, vma_store):
    """The issue's attack: a cursor ahead of the copy is offered through the
    progress API (token-less, and even as if with the token) and the OMA's
    order; the copy is killed mid-way and delivered again. It resumes from
    its own record and the replica is the source, byte for byte."""
    src, dst, make_order = disk
    order = make_order(limit_bps=3 * MiB)  # slow enough to be killed mid-copy
    control = control_of(agent_config)
    run = start_killable_copy(order, agent_config)
    try:
        recorded = wait_until(lambda: (c := control.checkpoint(order.job_id, order.disk_key)) and
                              2 * MiB <= c.cursor < 10 * MiB and c, 60, "a checkpoint mid-copy")
    finally:
        run.send_signal(signal.SIGKILL)
        _, stderr = run.communicate(timeout=30)
    assert run.returncode == -signal.SIGKILL, stderr.decode()[-2000:]

    # The forged cursor: refused token-less; stored anyway as a token holder
    # could, and carried by the OMA's order.
    forged = {"stage": "Transfer", "bytes_transferred": SIZE - MiB, "total_bytes": SIZE, "disk_id": "disk-2000",
              "checkpoint_bytes": SIZE}
    assert post(vma_server, order.job_id, forged, headers={}).status_code == 403
    vma_store.apply(order.job_id, {**forged, "status": "in_progress", "attempt": 1,
                                   "seq": time.time_ns() // 1000})
    assert vma_store.get(order.job_id)["disks"]["disk-2000"]["checkpoint_bytes"] == SIZE
    redelivered = CopyOrder(**{**order.as_dict(), "limit_bps": None, "resume_from": SIZE})

    outcome = steps.copy_disk(redelivered, agent_config)

    assert outcome.status == "completed", outcome
    assert sha256(dst) == sha256(src)
    assert outcome.resume_checkpoint >= recorded.cursor and outcome.resume_checkpoint < SIZE
    assert outcome.resume_differed_at is None
    assert outcome.resume_compared > 0 and "recorded on the agent" in outcome.resume_reason
    assert outcome.bytes_read < sum(length for _, length in DATA)  # it did resume


def test_a_cursor_ahead_of_the_target_is_caught_by_the_comparison(disk, agent_config):
    """Even the agent's own record cannot make a resumed run skip data the
    target lacks (a target that lost flushed writes, a volume recreated
    under the same path): the skipped part is compared first."""
    src, dst, make_order = disk
    order = make_order()
    control_of(agent_config).record_checkpoint(order.job_id, order.disk_key, Checkpoint(
        cursor=10 * MiB, attempt=1, worker="elsewhere:1", plan=steps.copy_plan_id(order), at=time.time()))

    outcome = steps.copy_disk(order, agent_config)

    assert outcome.status == "completed", outcome
    assert sha256(dst) == sha256(src)
    assert (outcome.resume_checkpoint, outcome.resume_differed_at, outcome.resume_from) == (10 * MiB, 0, 0)
    assert "differed from the source at offset 0" in resume_note("disk-2000", 1, outcome)


def test_a_checkpoint_of_another_copy_plan_is_not_used(disk, agent_config, tmp_path, serve):
    src, dst, make_order = disk
    order = make_order()
    other = make_order(job_id=order.job_id, target_uri=serve("memory", "16M").uri)
    control_of(agent_config).record_checkpoint(order.job_id, order.disk_key, Checkpoint(
        cursor=SIZE, attempt=1, worker="elsewhere:1", plan=steps.copy_plan_id(other), at=time.time()))

    outcome = steps.copy_disk(order, agent_config)

    assert outcome.status == "completed" and outcome.resume_from == 0
    assert sha256(dst) == sha256(src)


def test_a_superseded_run_does_not_move_its_successors_cursor(agent_config):
    control = control_of(agent_config)
    job_id = new_job_id()

    def record(cursor, attempt):
        return control.record_checkpoint(job_id, "disk-2000", Checkpoint(cursor, attempt, "w:1", "p", time.time()))

    assert record(8 * MiB, 2)
    assert not record(12 * MiB, 1)  # attempt 1 writing late
    assert record(4 * MiB, 2)  # the same attempt may move it down (it found the target differing)
    assert control.checkpoint(job_id, "disk-2000").cursor == 4 * MiB


@pytest.mark.django_db
def test_a_resumed_run_is_recorded_on_the_jobs_timeline(tmp_path, monkeypatch):
    monkeypatch.setattr("replication.services.jobs.enqueue_prepare", lambda *args: None)
    monkeypatch.setattr("replication.services.jobs._maybe_finalize", lambda job: None)
    image = make_image(tmp_path / "vm.img", MiB, [(0, 4096)])
    job = start_replication(register_image_vm("vm-resume", [str(image)]))
    assert job.enter_stage(Stage.INITIALIZING, JobStatus.PREPARING)
    assert job.enter_stage(Stage.TRANSFER, JobStatus.REPLICATING)
    disk = job.disks.get()
    assert disk.start_attempt("task-1")
    outcome = {"status": "completed", "worker": "vma:1", "resume_from": 524288, "resume_checkpoint": 524288,
               "resume_reason": "the checkpoint attempt 1 on vma:1 recorded on the agent after flushing the target",
               "resume_compared": 4096, "resume_differed_at": None, "bytes_total": 4096, "bytes_zeroed": 0,
               "throughput_bps": 1, "bytes_read": 0, "checkpoint_bytes": MiB}

    disk_copied(job.id, disk.disk_key, 1, DiskCopied.from_dict(outcome))

    (event,) = JobEvent.objects.filter(job=job, message__contains="resumed from offset")
    assert event.message == (f"{disk.disk_key}: attempt 1 resumed from offset 524288 (512.0 KiB): the checkpoint "
                             f"attempt 1 on vma:1 recorded on the agent after flushing the target; the 4.0 KiB of "
                             f"data below it compared equal with the source")
    assert disk.copy_attempts.get(number=1).resumed_from == 524288
    # A run that started at 0 adds no line.
    assert resume_note(disk.disk_key, 2, DiskCopied(status="completed", resume_from=0, bytes_total=0, bytes_zeroed=0,
                                                  throughput_bps=0)) == ""

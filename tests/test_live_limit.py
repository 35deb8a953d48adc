"""A running job's bandwidth limit changes while its copies run: through the
set_limit command and the job page, to the agent's API, into the running
copy's rate limit. Real OMA and agent workers, real agent API, real nbdkit."""

import pytest
from django.core.management import CommandError, call_command

from replication.choices import DiskStatus, JobStatus
from replication.roles import os_actor
from replication.services.inventory import register_image_vm
from replication.services.jobs import start_replication
from replication.services.limits import LimitError, change_limit
from tests.helpers import (
    MiB,
    agent_bytes_copied,
    make_image,
    replica_sha256,
    sha256,
    user_with_role,
    wait_for_job,
    wait_until,
)
from vma_agent.units import parse_rate

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def agent_limits(job_id):
    from replication.models import ReplicationJob
    from replication.services.orders import agent_client

    return agent_client(ReplicationJob.objects.get(pk=job_id)).job_limit(job_id)


def test_set_limit_reaches_the_running_copy_through_the_agent(celery_worker_process, tmp_path, capsys):
    image = make_image(tmp_path / "d0.img", 48 * MiB, [(0, 48 * MiB)], seed=11)
    vm = register_image_vm("vm-live-limit", [str(image)])
    job = start_replication(vm, bandwidth_limit_bps=MiB)  # 48 s at this rate
    wait_until(lambda: agent_bytes_copied(job.id, "disk-2000") >= MiB, 60, "the copy under way at 1 MiB/s")
    # The running copy reports the limit it applies: the order's.
    wait_until(lambda: agent_limits(job.id)["applied"].get("disk-2000") == MiB, 10, "the copy's applied limit")

    call_command("set_limit", job.id, "512MiB/s")
    out = capsys.readouterr().out
    assert f"job {job.id}: limit 512.0 MiB/s per disk" in out
    assert "applied by disk-2000" in out, out  # the copy itself said so, through the agent API
    assert agent_limits(job.id) == {"job_id": job.id, "bytes_per_s": 512 * MiB, "changed": True,
                                    "applied": {"disk-2000": 512 * MiB}}
    job.refresh_from_db()
    assert job.bandwidth_limit_bps == 512 * MiB
    assert job.events.filter(message=f"bandwidth limit 512.0 MiB/s per disk, set by {os_actor()}").exists()

    job = wait_for_job(job.id)
    assert job.status == JobStatus.COMPLETED, job.error_message
    assert replica_sha256(job.disks.get()) == sha256(image)
    with pytest.raises(CommandError, match=f"job {job.id} is completed: it has no copies left to limit"):
        call_command("set_limit", job.id, "10M")


def test_lifting_and_lowering_a_limit_before_the_copy_starts_and_bad_rates(celery_worker_process, tmp_path):
    image = make_image(tmp_path / "d0.img", 8 * MiB, [(0, 8 * MiB)], seed=12)
    vm = register_image_vm("vm-limit-errors", [str(image)])
    with pytest.raises(CommandError, match="is not a rate such as 50M"):
        call_command("set_limit", "no-such-job", "fast")
    with pytest.raises(CommandError, match="no job no-such-job"):
        call_command("set_limit", "no-such-job", "10M")
    with pytest.raises(LimitError, match="must be a positive rate"):
        change_limit("no-such-job", -1)
    assert parse_rate("60M") == parse_rate("60MiB/s") == parse_rate("60 MiB/s") == 60 * MiB
    assert parse_rate("1.5G") == 1536 * MiB and parse_rate("4096") == 4096
    for bad in ("", "0", "-5M", "M", "inf", "nan", "5X"):
        with pytest.raises(ValueError):
            parse_rate(bad)

    job = start_replication(vm, bandwidth_limit_bps=MiB)
    change = change_limit(job.id, None, actor="test")  # lifted at once, whether or not its copy has started
    assert change.agent_error is None and change.bytes_per_s is None
    job = wait_for_job(job.id)
    assert job.status == JobStatus.COMPLETED and job.bandwidth_limit_bps is None
    assert job.disks.get().status == DiskStatus.COMPLETED
    assert replica_sha256(job.disks.get()) == sha256(image)


def test_the_job_page_changes_a_running_jobs_limit(celery_worker_process, tmp_path):
    from django.test import Client

    image = make_image(tmp_path / "d0.img", 32 * MiB, [(0, 32 * MiB)], seed=13)
    vm = register_image_vm("vm-limit-page", [str(image)])
    job = start_replication(vm, bandwidth_limit_bps=MiB)
    client = Client()
    client.force_login(user_with_role("limiter", "operator"))
    page = client.get(f"/jobs/{job.id}/").content.decode()
    assert 'id="limit-form"' in page and 'value="1.0 MiB/s"' in page
    wait_until(lambda: agent_bytes_copied(job.id, "disk-2000") >= MiB, 60, "the copy under way")

    bad = client.post(f"/jobs/{job.id}/limit/", {"rate": "quickly"}, follow=True).content.decode()
    assert "is not a rate such as 50M" in bad
    job.refresh_from_db()
    assert job.bandwidth_limit_bps == MiB  # a refused rate changes nothing

    done = client.post(f"/jobs/{job.id}/limit/", {"rate": "256M"}, follow=True).content.decode()
    assert "Limit 256.0 MiB/s per disk; the running copies follow within seconds." in done
    assert "256.0 MiB/s per disk" in client.get(f"/jobs/{job.id}/fragment/").content.decode()
    wait_until(lambda: agent_limits(job.id)["applied"].get("disk-2000") == 256 * MiB, 10,
               "the running copy to apply the page's limit")
    job = wait_for_job(job.id)
    assert job.status == JobStatus.COMPLETED and replica_sha256(job.disks.get()) == sha256(image)
    assert 'id="limit-form"' not in client.get(f"/jobs/{job.id}/").content.decode()  # nothing left to limit

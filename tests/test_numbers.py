"""One truth for the numbers an operator reads (issue 31): a real limited
copy (nbdkit sources, a per-disk limit, the real OMA and agent workers, the
progress poller), read from the job page and from `manage.py jobs --json`
at the same moment. A job's rate is the sum of its copying disks' rates, no
rate shown is above the limit in force, the ETA follows the limit, a
completed job shows its average rate, and a cancelled job's disks stop
showing a copy and an ETA at once."""

import io
import json
import re

import pytest
from django.core.management import call_command
from django.test import Client

from replication.choices import DiskStatus, JobStatus, SyncType
from replication.figures import average_rate
from replication.models import ReplicationJob
from replication.services.inventory import register_image_vm
from replication.services.jobs import cancel_job, start_replication
from replication.services.limits import change_limit
from tests.helpers import MiB, NbdkitProcess, make_image, user_with_role, wait_for_job, wait_until
from vma_agent.units import iec_rate

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

UNITS = {"B": 1, "KiB": 1024, "MiB": MiB, "GiB": 1024 * MiB, "TiB": 1024**4}
ROUNDING = 0.05 * MiB  # a shown MiB figure is rounded to 0.1 MiB


def parse_size(text: str) -> float:
    number, unit = text.strip().removesuffix("/s").split()
    return float(number) * UNITS[unit]


def parse_duration(text: str) -> int | None:
    text = text.strip()
    if text == "—":
        return None
    parts = dict((unit, int(n)) for n, unit in re.findall(r"(\d+)([hms])", text))
    return parts.get("h", 0) * 3600 + parts.get("m", 0) * 60 + parts.get("s", 0)


def page_numbers(client: Client, job_id: str) -> dict:
    """What the job page shows: the job's rate and ETA, each disk's state,
    rate, ETA and bytes (all from one render)."""
    html = client.get(f"/jobs/{job_id}/fragment/").content.decode()
    rate = re.search(r"<dd[^>]*data-throughput>([\d.]+ \w+/s)", html).group(1)
    eta = re.search(r"<span data-eta>([^<]*)</span>", html)
    disks = {}
    for key, body in re.findall(r'<tr class="status-\w+" data-disk="([^"]+)">(.*?)</tr>', html, re.S):
        done, total = re.search(r'<td class="text-end text-nowrap">([^<]+) / ([^<]+)</td>', body).groups()
        disks[key] = {
            "state": re.search(r"data-disk-state>([^<]+)<", body).group(1),
            "rate": re.search(r"data-disk-rate>([^<]+)<", body).group(1),
            "eta": parse_duration(re.search(r"data-disk-eta>([^<]+)<", body).group(1)),
            "done": parse_size(done), "total": parse_size(total)}
    return {"html": html, "rate": rate.strip(), "eta": parse_duration(eta.group(1)) if eta else None,
            "disks": disks}


def jobs_json(job_id: str) -> dict:
    out = io.StringIO()
    call_command("jobs", "--json", stdout=out)
    return next(row for row in json.loads(out.getvalue()) if row["id"] == job_id)


def nbd_vm(tmp_path, sockdir, name: str, sizes: list[int]):
    servers = [NbdkitProcess(sockdir, "--readonly", "file",
                             str(make_image(tmp_path / f"{name}-{i}.img", size, [(0, size)], seed=40 + i)))
               for i, size in enumerate(sizes)]
    return register_image_vm(name, [server.uri for server in servers]), servers


def copying_with_rates(job_id: str):
    job = ReplicationJob.objects.get(pk=job_id)
    disks = list(job.disks.all())
    return job if all(d.status == DiskStatus.COPYING and d.throughput_bps > 0 and d.bytes_done > 0
                      for d in disks) else None


def assert_consistent_json(row: dict, limit: int) -> None:
    copying = [d for d in row["disks"] if d["state"] == DiskStatus.COPYING]
    assert row["throughput_bps"] == sum(d["throughput_bps"] for d in copying), row
    for disk in copying:
        assert 0 < disk["throughput_bps"] <= limit, disk
        remaining = disk["bytes_total"] - disk["bytes_done"]
        assert disk["eta_seconds"] == int(remaining / disk["throughput_bps"]), disk
        assert disk["eta_seconds"] >= remaining / limit - 1, disk  # never faster than the limit allows
    assert row["eta_seconds"] == max(d["eta_seconds"] for d in copying), row


def assert_consistent_page(shown: dict, limit: int) -> None:
    copying = {k: d for k, d in shown["disks"].items() if d["state"] == "copying"}
    assert copying, shown["disks"]
    rates = [parse_size(d["rate"]) for d in copying.values()]
    assert all(rate <= limit for rate in rates), shown["disks"]
    assert abs(parse_size(shown["rate"]) - sum(rates)) <= ROUNDING * (len(rates) + 1), (shown["rate"], rates)
    for disk in copying.values():
        # ETA >= remaining / limit, within the pages' rounding of the sizes.
        least = (disk["total"] - disk["done"] - 2 * ROUNDING) / limit - 1
        assert disk["eta"] is not None and disk["eta"] >= least, disk
    assert shown["eta"] == max(d["eta"] for d in copying.values())


def test_a_limited_copy_shows_one_set_of_numbers_on_the_page_and_in_jobs_json(
        celery_worker_process, progress_poller, sockdir, tmp_path):
    vm, servers = nbd_vm(tmp_path, sockdir, "vm-numbers", [32 * MiB, 24 * MiB])
    client = Client()
    client.force_login(user_with_role("numbers", "operator"))
    job = start_replication(vm, SyncType.FULL, bandwidth_limit_bps=4 * MiB)
    wait_until(lambda: copying_with_rates(job.id), 60, "both disks copying, their rates measured")

    assert_consistent_page(page_numbers(client, job.id), 4 * MiB)
    assert_consistent_json(jobs_json(job.id), 4 * MiB)

    # A lower limit: the copies' last measured rates are above it, and
    # their agent's ETA was worked out at the old rate. Nothing shown may
    # say so, from this moment on.
    assert change_limit(job.id, MiB, actor="test").agent_error is None
    shown, row = page_numbers(client, job.id), jobs_json(job.id)
    assert_consistent_page(shown, MiB)
    assert_consistent_json(row, MiB)
    assert row["eta_seconds"] >= 4  # at least 8 MiB left on the larger disk, at 1 MiB/s

    assert change_limit(job.id, None, actor="test").agent_error is None  # and now let it finish
    job = wait_for_job(job.id, timeout=120)
    assert job.status == JobStatus.COMPLETED, job.error_message
    average = average_rate(job.bytes_transferred, job.started_at, job.completed_at)
    assert average > 0 and jobs_json(job.id)["throughput_bps"] == average
    shown = page_numbers(client, job.id)
    assert shown["rate"] == iec_rate(average) and shown["eta"] is None
    assert "on average over" in shown["html"] and "Not enough samples yet" not in shown["html"]
    assert all(d["state"] == "completed" and d["rate"].endswith(" average") for d in shown["disks"].values())
    for server in servers:
        server.stop()


def test_a_cancelled_jobs_disks_stop_showing_a_copy_at_once(celery_worker_process, progress_poller, sockdir,
                                                             tmp_path):
    vm, servers = nbd_vm(tmp_path, sockdir, "vm-numbers-cancel", [32 * MiB, 32 * MiB])
    client = Client()
    client.force_login(user_with_role("numbers2", "operator"))
    job = start_replication(vm, SyncType.FULL, bandwidth_limit_bps=MiB)
    wait_until(lambda: copying_with_rates(job.id), 60, "both disks copying, their rates measured")
    assert cancel_job(job.id, actor="test")
    # At once: whether or not the agent has confirmed the stop yet.
    shown, row = page_numbers(client, job.id), jobs_json(job.id)
    assert shown["rate"] == "0 B/s" and shown["eta"] is None
    assert {d["state"] for d in shown["disks"].values()} <= {"stopping", "cancelled"}, shown["disks"]
    assert all(d["eta"] is None and d["rate"] == "—" for d in shown["disks"].values()), shown["disks"]
    assert ">copying<" not in shown["html"]
    assert row["throughput_bps"] == 0 and row["eta_seconds"] is None
    assert all(d["throughput_bps"] == 0 and d["eta_seconds"] is None and d["state"] in ("stopping", "cancelled")
               for d in row["disks"]), row["disks"]
    wait_until(lambda: not ReplicationJob.objects.get(pk=job.id).disks.filter(status=DiskStatus.COPYING).exists(),
               60, "the agent to confirm the stop")
    for server in servers:
        server.stop()


def test_the_rules_on_every_disk_state():
    """replication.figures alone, on unsaved rows: what each state shows."""
    from datetime import timedelta

    from django.utils import timezone

    from replication.figures import job_figures
    from replication.models import VMDisk

    now = timezone.now()
    job = ReplicationJob(status=JobStatus.REPLICATING, bandwidth_limit_bps=2 * MiB, created_at=now)
    copying = VMDisk(disk_key="a", status=DiskStatus.COPYING, bytes_done=2 * MiB, bytes_total=10 * MiB,
                     capacity_bytes=20 * MiB, throughput_bps=9 * MiB)  # measured above the limit
    unmeasured = VMDisk(disk_key="b", status=DiskStatus.COPYING, bytes_done=0, bytes_total=0,
                        capacity_bytes=4 * MiB, throughput_bps=MiB)
    done = VMDisk(disk_key="c", status=DiskStatus.COMPLETED, bytes_done=6 * MiB, bytes_total=6 * MiB,
                  capacity_bytes=6 * MiB, throughput_bps=50 * MiB, started_at=now - timedelta(seconds=3),
                  completed_at=now)
    figures = job_figures(job, [copying, unmeasured, done])
    a, b, c = figures.disks
    assert (a.rate_bps, a.eta_seconds) == (2 * MiB, 4)  # capped; 8 MiB left at 2 MiB/s
    assert (b.rate_bps, b.eta_seconds) == (MiB, 4)  # its capacity while not measured
    assert (c.rate_bps, c.eta_seconds, c.average) == (2 * MiB, None, True)  # 6 MiB in 3 s
    assert (figures.rate_bps, figures.eta_seconds) == (3 * MiB, 4)  # the copying disks' sum; the slowest

    waiting = VMDisk(disk_key="d", status=DiskStatus.PENDING, capacity_bytes=MiB)
    assert job_figures(job, [copying, waiting]).eta_seconds is None  # a disk still to copy has no rate yet

    job.status = JobStatus.CANCELLED
    stopped = job_figures(job, [copying, done])
    assert [(d.state, d.rate_bps, d.eta_seconds) for d in stopped.disks][0] == ("stopping", 0, None)
    assert (stopped.rate_bps, stopped.eta_seconds) == (0, None)

    job.status, job.started_at, job.completed_at, job.bytes_transferred = (
        JobStatus.COMPLETED, now - timedelta(seconds=7), now, 14 * MiB)
    completed = job_figures(job, [done])
    assert (completed.rate_bps, completed.eta_seconds, completed.average, completed.duration_s) == (
        2 * MiB, None, True, 7.0)


def test_the_admin_job_list_and_metrics_show_the_pages_rates(tmp_path, monkeypatch):
    """The admin's job list and /metrics read the rates through the same rule
    as the pages: a rate measured above the limit is shown at the limit, a
    job's rate is its copying disks' sum, a cancelled job's disk that has not
    stopped yet counts nothing, whatever each row stored."""
    from prometheus_client.parser import text_string_to_metric_families

    from replication.figures import job_figures
    from replication.models import VMDisk
    from replication.services import jobs as job_service
    from tests.helpers import make_image

    monkeypatch.setattr(job_service, "enqueue_prepare", lambda job_id: None)
    monkeypatch.setattr(job_service, "enqueue_job_ended", lambda job_id: None)

    def job_of(name, sizes, limit):
        images = [str(make_image(tmp_path / f"{name}-{i}.img", size, [(0, 4096)])) for i, size in enumerate(sizes)]
        job = start_replication(register_image_vm(name, images), SyncType.FULL, bandwidth_limit_bps=limit)
        ReplicationJob.objects.filter(pk=job.pk).update(status=JobStatus.REPLICATING, throughput_bps=50 * MiB)
        return job

    limited = job_of("vm-rates", [MiB, MiB], 2 * MiB)
    fast, slow = limited.disks.order_by("disk_key")
    VMDisk.objects.filter(pk=fast.pk).update(status=DiskStatus.COPYING, throughput_bps=9 * MiB)  # above the limit
    VMDisk.objects.filter(pk=slow.pk).update(status=DiskStatus.COPYING, throughput_bps=MiB)
    stopping = job_of("vm-stopping", [MiB], None)
    stopping.disks.update(status=DiskStatus.COPYING, throughput_bps=5 * MiB)
    ReplicationJob.objects.filter(pk=stopping.pk).update(status=JobStatus.CANCELLED)
    assert job_figures(ReplicationJob.objects.get(pk=limited.pk)).rate_bps == 3 * MiB  # the pages' figure

    admin = Client()
    admin.force_login(user_with_role("numbers-admin", "administrator"))
    listing = admin.get("/admin/replication/replicationjob/").content.decode()
    rates = dict(re.findall(r'<a href="/admin/replication/replicationjob/([^/]+)/change/">.*?'
                            r'<td class="field-throughput">([^<]*)</td>', listing, re.S))
    assert rates == {limited.id: iec_rate(3 * MiB), stopping.id: iec_rate(0)}, rates

    values = {}
    for family in text_string_to_metric_families(admin.get("/metrics").content.decode()):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    assert values[("oma_copy_throughput_bytes_per_second", (("agent", "local"), ("vm", "vm-rates")))] == 3 * MiB
    assert ("oma_copy_throughput_bytes_per_second", (("agent", "local"), ("vm", "vm-stopping"))) not in values
    assert values[("oma_agent_throughput_bytes_per_second", (("agent", "local"),))] == 3 * MiB
    assert values[("oma_agent_copies_running", (("agent", "local"),))] == 3  # the stopping copy still runs

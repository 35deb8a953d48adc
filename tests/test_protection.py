"""Scheduled protection through real processes: django-celery-beat's
scheduler (beat reading the schedule from the database), the OMA worker
admitting cycles, the agent worker copying real nbdkit sources. Limits are
judged from the jobs' recorded times, never by timing the test."""

import io
import subprocess
import sys
from collections import defaultdict
from datetime import timedelta
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import call_command
from django.utils import timezone

from replication.choices import JOB_ACTIVE, AdmissionReason, AdmissionStatus, JobStatus
from replication.models import Admission, ProtectionGroup, ReplicationJob, VirtualMachine
from replication.services import scheduler
from replication.services.inventory import register_image_vm
from replication.services.jobs import cancel_job
from tests.helpers import (
    PROJECT_ROOT,
    MiB,
    make_image,
    replica_sha256,
    sha256,
    slow_nbd_source,
    stop_worker,
    user_with_role,
    wait_for_job,
    wait_until,
    worker_env,
)

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def beat(celery_worker_process):
    """Celery beat with django-celery-beat's DatabaseScheduler (the project's
    setting), on the test database, waking every second."""
    log_path = Path(settings.TEST_ROOT) / "beat.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", "oma_site", "beat", "-l", "info",
                                 "--max-interval", "1"], cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env={**worker_env(), "PROCESS_ROLE": "oma"}, start_new_session=True)
    wait_until(lambda: b"beat: Starting" in log_path.read_bytes() or proc.poll() is not None, 30, "beat to start")
    assert proc.poll() is None, log_path.read_text()[-2000:]
    yield proc
    stop_worker(proc)


def settle(groups):
    """Pause every group and end what runs, so nothing outlives the test."""
    for group in groups:
        scheduler.set_paused(group, True)
    Admission.objects.filter(status=AdmissionStatus.WAITING).update(status=AdmissionStatus.DROPPED)
    for job in ReplicationJob.objects.filter(status__in=JOB_ACTIVE):
        cancel_job(job.id, "test over")
    wait_until(lambda: not ReplicationJob.objects.filter(status__in=JOB_ACTIVE).exists(), 60, "every job to end")


def most_at_once(jobs) -> int:
    """The most of these jobs active at one time (active from creation to end)."""
    edges = sorted([(job.created_at, 1) for job in jobs] + [(job.completed_at, -1) for job in jobs],
                   key=lambda edge: (edge[0], edge[1]))  # an end before a start at the same instant
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    return peak


def test_twelve_vms_in_three_groups_keep_their_limits_skip_retry_and_flag(beat, tmp_path, sockdir):
    limits = {"g-two": 2, "g-three": 3, "g-one": 1}
    groups = {name: scheduler.create_group(name, max_concurrent=limit, rpo_target_s=600, max_retries=2,
                                           retry_backoff_s=1) for name, limit in limits.items()}
    images = {}
    vms = defaultdict(list)
    for index in range(12):
        name = f"pv{index:02d}"
        group = list(limits)[index % 3]
        images[name] = make_image(tmp_path / f"{name}.img", 6 * MiB + index * 4096, [(0, 4 * MiB)], seed=index)
        vms[group].append(register_image_vm(name, [str(images[name])]))
    # A VM whose cycle outlasts its schedule: a source answering one request every 0.4 s.
    slow_image = make_image(tmp_path / "slow.img", 12 * MiB, [(0, 12 * MiB)], seed=50)
    slow_source = slow_nbd_source(sockdir, slow_image, "400ms")
    slow = register_image_vm("pv-slow", [slow_source.uri])
    vms["g-three"].append(slow)
    # A VM whose source is gone once registered: every cycle fails.
    broken_image = make_image(tmp_path / "broken.img", MiB, [(0, MiB)], seed=51)
    broken = register_image_vm("pv-broken", [str(broken_image)])
    broken_image.unlink()
    vms["g-one"].append(broken)
    # A paused group starts nothing.
    paused = scheduler.create_group("g-paused", max_concurrent=4, paused=True)
    quiet = [register_image_vm(f"pq{i}", [str(make_image(tmp_path / f"pq{i}.img", MiB, [(0, MiB)], seed=60 + i))])
             for i in range(2)]
    scheduler.add_vms(paused, quiet)
    scheduler.set_schedule(paused, interval_s=1)
    for name, group in groups.items():
        scheduler.add_vms(group, vms[name])
    for group in groups.values():
        scheduler.set_schedule(group, interval_s=2)
    try:
        healthy = [vm for name in limits for vm in vms[name] if vm not in (broken,)]
        wait_until(lambda: all(ReplicationJob.objects.filter(vm=vm, status=JobStatus.COMPLETED).exists()
                               for vm in healthy), 240, "a completed cycle of every healthy VM")
        wait_until(lambda: VirtualMachine.objects.get(pk=broken.pk).protection_flag, 120, "the broken VM flagged")
        wait_until(lambda: Admission.objects.filter(vm=slow, status=AdmissionStatus.SKIPPED).exists(), 60,
                   "a due tick of the slow VM skipped while its cycle runs")
    finally:
        settle([*groups.values(), paused])
        slow_source.stop()

    jobs = list(ReplicationJob.objects.select_related("vm").all())
    for name, limit in limits.items():
        group_jobs = [job for job in jobs if job.vm.group_id == groups[name].pk]
        assert group_jobs and most_at_once(group_jobs) <= limit, (name, most_at_once(group_jobs))
    assert most_at_once(jobs) <= settings.AGENT_MAX_VMS
    assert most_at_once([job for job in jobs if job.vm.group_id == groups["g-three"].pk]) >= 2  # limits were tested
    for vm in VirtualMachine.objects.all():  # never doubled: one cycle of a VM at a time
        assert most_at_once([job for job in jobs if job.vm_id == vm.pk]) <= 1, vm.name
    for name, vm in [(vm.name, vm) for vm in healthy if vm != slow]:
        completed = [job for job in jobs if job.vm_id == vm.pk and job.status == JobStatus.COMPLETED]
        assert replica_sha256(completed[-1].disks.get()) == sha256(images[name])
    skipped = Admission.objects.filter(vm=slow, status=AdmissionStatus.SKIPPED).first()
    assert "is still running" in skipped.note

    # The broken VM: its first cycle, then two retries with backoff, then flagged.
    attempts = list(Admission.objects.filter(vm=broken, status=AdmissionStatus.STARTED).order_by("attempt")
                    .values_list("attempt", "reason", "job__status"))
    assert attempts[:3] == [(1, AdmissionReason.SCHEDULED, "failed"), (2, AdmissionReason.RETRY, "failed"),
                            (3, AdmissionReason.RETRY, "failed")], attempts
    retry = Admission.objects.get(vm=broken, attempt=3, status=AdmissionStatus.STARTED)
    assert retry.not_before - retry.due_at == timedelta(seconds=2)  # backoff 1 s, doubled
    flag = VirtualMachine.objects.get(pk=broken.pk).protection_flag
    assert flag.startswith("3 scheduled cycles failed") and "broken.img does not exist" in flag, flag

    assert not ReplicationJob.objects.filter(vm__in=quiet).exists()
    assert not Admission.objects.filter(vm__in=quiet).exists()


def test_metrics_move_during_a_cycle_and_rpo_shows_in_json(celery_worker_process, progress_poller, tmp_path):

    from replication.models import ApiToken
    from replication.services.jobs import start_replication

    user_with_role("scraper", "viewer")
    out = io.StringIO()
    call_command("api_token", "prometheus", "--user", "scraper", stdout=out)
    token = out.getvalue().strip().splitlines()[-1]
    group = scheduler.create_group("g-metrics", rpo_target_s=3600)
    image = make_image(tmp_path / "m.img", 16 * MiB, [(0, 16 * MiB)], seed=70)
    vm = register_image_vm("pv-metrics", [str(image)])
    scheduler.add_vms(group, [vm])
    client = _client(token)
    assert client.get("/metrics").status_code == 200
    assert _client("wrong-token").get("/metrics").status_code == 401
    before = parse(client.get("/metrics").content.decode())

    job = start_replication(vm, bandwidth_limit_bps=4 * MiB)  # 4 s at this rate
    wait_until(lambda: parse(client.get("/metrics").content.decode()).get(
        ("oma_copied_bytes_total", (("agent", "local"), ("vm", "pv-metrics"))), 0) > 0, 60,
        "bytes copied to show in the metrics while the cycle runs")
    during = parse(client.get("/metrics").content.decode())
    assert during[("oma_jobs", (("status", "replicating"),))] >= 1
    assert ("oma_copy_throughput_bytes_per_second", (("agent", "local"), ("vm", "pv-metrics"))) in during
    job = wait_for_job(job.id)
    assert job.status == JobStatus.COMPLETED
    after = parse(client.get("/metrics").content.decode())
    completed = ("oma_jobs", (("status", "completed"),))
    assert after[completed] == before.get(completed, 0) + 1
    assert after[("oma_copied_bytes_total", (("agent", "local"), ("vm", "pv-metrics")))] == 16 * MiB
    count = ("oma_cycle_duration_seconds_count", ())
    assert after[count] == before.get(count, 0) + 1
    assert ("oma_vm_rpo_age_seconds", (("group", "g-metrics"), ("vm", "pv-metrics"))) in after
    assert ("oma_admission_waiting", ()) in after
    lag = after[("oma_progress_poller_lag_seconds", ())]
    assert lag == lag  # not NaN: the poller's passes are recorded

    rpo = client.get("/api/rpo/").json()
    entry = next(v for v in rpo["vms"] if v["vm"] == "pv-metrics")
    job.refresh_from_db()
    assert entry["recovery_point_at"] == job.recovery_point_at.isoformat()
    assert entry["group"] == "g-metrics" and entry["target_s"] == 3600 and entry["over_target"] is False
    assert job.recovery_point_at <= timezone.now()
    assert ApiToken.objects.filter(name="prometheus").exists()


def _client(token):
    from django.test import Client

    return Client(HTTP_AUTHORIZATION=f"Bearer {token}")


def parse(text: str) -> dict:
    """Prometheus text format -> {(name, sorted labels): value}, with the
    parser prometheus-client itself ships."""
    from prometheus_client.parser import text_string_to_metric_families

    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def test_group_and_schedule_commands_refuse_bad_input_and_keep_what_is_stored(db):
    call_command("group", "create", "gold", "--limit", "2", "--rpo", "15m")
    gold = ProtectionGroup.objects.get(name="gold")
    assert (gold.max_concurrent, gold.rpo_target_s) == (2, 900)
    from django.core.management import CommandError

    for args, reason in [(["group", "create", "gold"], "exists already"),
                         (["group", "create", "lead", "--limit", "0"], "at least 1"),
                         (["group", "add", "gold", "no-such-vm"], "no VM named"),
                         (["group", "add", "nothing", "x"], "no protection group named"),
                         (["schedule", "set", "gold", "--cron", "61 * * * *"], "Invalid"),
                         (["schedule", "set", "gold", "--cron", "* * *"], "needs 5 fields"),
                         (["schedule", "set", "gold", "--cron", "0 * * * *", "--timezone", "Mars/Olympus"],
                          "Mars/Olympus")]:
        with pytest.raises(CommandError, match=reason):
            call_command(*args)
    with pytest.raises(CommandError, match="'soon' is not a duration such as 90s"):
        call_command("schedule", "set", "gold", "--every", "soon")
    call_command("schedule", "set", "gold", "--cron", "*/5 * * * *", "--timezone", "Europe/Paris")
    gold.refresh_from_db()
    task = gold.periodic_task
    assert task.crontab.minute == "*/5" and str(task.crontab.timezone) == "Europe/Paris" and task.enabled
    assert task.task == "replication.group_due" and task.queue == "oma"
    call_command("group", "pause", "gold")
    task.refresh_from_db()
    assert not task.enabled  # beat starts nothing for a paused group
    call_command("schedule", "set", "gold", "--every", "30s")
    task.refresh_from_db()
    assert task.interval.every == 30 and task.crontab is None and not task.enabled
    call_command("group", "delete", "gold")
    from django_celery_beat.models import PeriodicTask

    assert not PeriodicTask.objects.filter(pk=task.pk).exists()

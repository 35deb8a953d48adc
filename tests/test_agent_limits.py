"""Health and limits of the agents: admission per agent and per ESXi host,
paused and draining agents, the reaper's judgement of a silent agent, the
per-agent metrics.

Admission runs for real (the scheduler's pass on the test database, the
Redis admission lock, jobs created by start_replication); the cycles are
not copied: each ends when the test completes it, and the limits are judged
from the jobs' recorded start and end times, never by timing the test."""

import io
from collections import defaultdict
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.utils import timezone

from replication.choices import AdmissionStatus, AgentState, DiskStatus, JobStatus
from replication.models import Admission, Agent, CopyAttempt, ReplicationJob, VirtualMachine, VMDisk
from replication.services import jobs as job_service
from replication.services import progress, reaper, scheduler
from replication.services.inventory import register_image_vm
from replication.services.jobs import ReplicationError, start_replication
from tests.helpers import MiB, make_image, user_with_role

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def started(monkeypatch):
    """Cycles are created for real but not run: their prepare and their end's
    notice are recorded instead of queued."""
    queued = []
    monkeypatch.setattr(job_service, "enqueue_prepare", queued.append)
    monkeypatch.setattr(job_service, "enqueue_job_ended", lambda job_id: None)
    return queued


def vm_on(tmp_path, name, agent="local", host=""):
    image = make_image(tmp_path / f"{name}.img", MiB, [(0, 4096)])
    vm = register_image_vm(name, [str(image)], agent)
    VirtualMachine.objects.filter(pk=vm.pk).update(esxi_host=host)
    return VirtualMachine.objects.get(pk=vm.pk)


def complete(job_id):
    """The cycle ends (as finalize would end it), and the scheduler hears of it."""
    now = timezone.now()
    ReplicationJob.objects.filter(pk=job_id).update(status=JobStatus.COMPLETED, started_at=now, completed_at=now,
                                                    recovery_point_at=now)
    scheduler.job_ended(job_id)


def most_at_once(spans) -> int:
    edges = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])  # an end first on a tie
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    return peak


def test_six_vms_on_two_esxi_hosts_never_more_than_two_at_once_on_a_host(tmp_path, started):
    Agent.objects.create(name="site-a", max_per_host=2, max_vms=10, max_disks=20)
    group = scheduler.create_group("g-hosts", max_concurrent=10)
    vms = [vm_on(tmp_path, f"h{i}", "site-a", host=f"esx-{'ab'[i % 2]}.example") for i in range(6)]
    scheduler.add_vms(group, vms)

    scheduler.group_due(group.pk)
    first = list(ReplicationJob.objects.values_list("vm__esxi_host", flat=True))
    assert sorted(first) == ["esx-a.example"] * 2 + ["esx-b.example"] * 2
    waiting = Admission.objects.filter(status=AdmissionStatus.WAITING)
    assert waiting.count() == 2
    assert all("has 2 VMs in flight, its limit" in entry.note for entry in waiting), [e.note for e in waiting]

    # End the cycles one at a time, oldest first; each end admits the next.
    while (job := ReplicationJob.objects.filter(status=JobStatus.PENDING).order_by("created_at").first()):
        complete(job.id)
    jobs = list(ReplicationJob.objects.select_related("vm"))
    assert sorted(job.vm.name for job in jobs) == sorted(vm.name for vm in vms)  # every VM had its cycle
    spans = defaultdict(list)
    for job in jobs:
        spans[job.vm.esxi_host].append((job.created_at, job.completed_at))
    assert {host: most_at_once(s) for host, s in spans.items()} == {"esx-a.example": 2, "esx-b.example": 2}
    assert len(started) == 6


def test_a_paused_or_draining_agent_gets_no_new_cycle_and_says_why(tmp_path, started):
    agent = Agent.objects.create(name="site-p")
    other = vm_on(tmp_path, "on-active")
    vm = vm_on(tmp_path, "on-paused", "site-p")
    group = scheduler.create_group("g-paused", max_concurrent=5)
    scheduler.add_vms(group, [vm, other])
    assert agent.transition(AgentState.PAUSED)

    scheduler.group_due(group.pk)
    assert list(ReplicationJob.objects.values_list("vm__name", flat=True)) == ["on-active"]
    entry = Admission.objects.get(vm=vm)
    assert entry.status == AdmissionStatus.WAITING and "agent site-p is paused" in entry.note
    with pytest.raises(ReplicationError, match="agent site-p is paused"):
        start_replication(vm)

    assert agent.transition(AgentState.DRAINING)
    scheduler.admit()
    assert "agent site-p is draining" in Admission.objects.get(vm=vm).note
    with pytest.raises(ReplicationError, match="agent site-p is draining"):
        start_replication(vm)
    assert not ReplicationJob.objects.filter(vm=vm).exists()

    assert agent.transition(AgentState.ACTIVE)
    (job,) = scheduler.admit()
    assert job.vm_id == vm.pk and Admission.objects.get(vm=vm).status == AdmissionStatus.STARTED


def copying(tmp_path, name, agent, created):
    vm = vm_on(tmp_path, name, agent)
    job = start_replication(vm)
    assert job.enter_stage("Initializing", JobStatus.PREPARING)
    assert job.enter_stage("Transfer", JobStatus.REPLICATING)
    disk = job.disks.get()
    assert disk.start_attempt(f"task-{name}")
    now = timezone.now()
    ReplicationJob.objects.filter(pk=job.pk).update(created_at=created, heartbeat_at=now)
    VMDisk.objects.filter(pk=disk.pk).update(heartbeat_at=now, worker=f"worker-{agent}")
    return job, disk


def test_a_silent_agent_has_its_runs_judged_lost_and_only_its(tmp_path, started, monkeypatch, settings):
    now = timezone.now()
    long_ago = now - timedelta(seconds=settings.AGENT_SILENT_AFTER_S + 60)
    Agent.objects.create(name="site-quiet", last_seen_at=long_ago)
    Agent.objects.create(name="site-talks", last_seen_at=now)
    quiet_job, quiet_disk = copying(tmp_path, "vm-quiet", "site-quiet", long_ago)
    talks_job, talks_disk = copying(tmp_path, "vm-talks", "site-talks", long_ago)
    monkeypatch.setattr(reaper, "database_up_since", lambda: now - timedelta(days=1))

    # The poller itself has not run: nobody asked the agents, nobody is judged.
    progress.redis.Redis.from_url(settings.CELERY_BROKER_URL).delete(progress.LAST_PASS_KEY)
    assert reaper.reap(now).agents_silent == []
    assert ReplicationJob.objects.get(pk=quiet_job.pk).status == JobStatus.REPLICATING

    progress._record_pass()  # the poller runs, and site-quiet's API does not answer it
    result = reaper.reap(now)
    assert result.agents_silent == ["site-quiet"]
    assert result.failed == [quiet_job.id] and result.disks_failed == [quiet_disk.pk]
    quiet_job.refresh_from_db()
    assert quiet_job.status == JobStatus.FAILED and "agent site-quiet silent for" in quiet_job.error_message
    assert VMDisk.objects.get(pk=quiet_disk.pk).status == DiskStatus.FAILED
    assert CopyAttempt.objects.get(disk=quiet_disk).outcome == CopyAttempt.Outcome.LOST
    assert "agent site-quiet silent" in VirtualMachine.objects.get(name="vm-quiet").protection_flag
    # The other agent's run goes on, its VM unflagged.
    assert ReplicationJob.objects.get(pk=talks_job.pk).status == JobStatus.REPLICATING
    assert VMDisk.objects.get(pk=talks_disk.pk).status == DiskStatus.COPYING
    assert VirtualMachine.objects.get(name="vm-talks").protection_flag == ""


def test_a_poller_pass_records_the_agent_as_seen(tmp_path, started, vma_server):
    agent = Agent.objects.create(name="site-seen")
    copying(tmp_path, "vm-seen", "site-seen", timezone.now())
    before = timezone.now()
    progress.poll_once()
    agent.refresh_from_db()
    assert agent.last_seen_at is not None and agent.last_seen_at >= before and agent.last_error == ""


def test_metrics_show_each_agent_state_last_seen_copies_and_throughput(tmp_path, started):
    from django.test import Client
    from prometheus_client.parser import text_string_to_metric_families

    now = timezone.now()
    Agent.objects.create(name="site-m1", last_seen_at=now - timedelta(seconds=42))
    paused = Agent.objects.create(name="site-m2")
    assert paused.transition(AgentState.PAUSED)
    for name in ("m-a", "m-b"):
        _, disk = copying(tmp_path, name, "site-m1", now)
        VMDisk.objects.filter(pk=disk.pk).update(throughput_bps=1000)
    user_with_role("scraper", "viewer")
    out = io.StringIO()
    call_command("api_token", "prometheus", "--user", "scraper", stdout=out)
    response = Client(HTTP_AUTHORIZATION=f"Bearer {out.getvalue().strip().splitlines()[-1]}").get("/metrics")
    assert response.status_code == 200
    values = {}
    for family in text_string_to_metric_families(response.content.decode()):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    assert values[("oma_agent_state", (("agent", "site-m1"), ("state", "active")))] == 1
    assert values[("oma_agent_state", (("agent", "site-m2"), ("state", "paused")))] == 1
    assert ("oma_agent_state", (("agent", "site-m2"), ("state", "active"))) not in values
    assert 42 <= values[("oma_agent_last_seen_seconds", (("agent", "site-m1"),))] < 42 + 60
    assert values[("oma_agent_copies_running", (("agent", "site-m1"),))] == 2
    assert values[("oma_agent_copies_running", (("agent", "site-m2"),))] == 0
    assert values[("oma_agent_throughput_bytes_per_second", (("agent", "site-m1"),))] == 2000
    # Bounded: one series per agent and metric, never per VM or disk.
    assert len([key for key in values if key[0] == "oma_agent_copies_running"]) == Agent.objects.count()


def test_discovery_records_the_esxi_host_each_vm_runs_on(vcenter):
    from pyVmomi import vim

    from replication.services import vmware as vmware_service
    from simulators.vcenter import vm_spec

    sim, record = vcenter(vm_spec("esx01", [MiB]), vm_spec("esx02", [MiB]))
    found = vmware_service.discover(record, ["esx01", "esx02"])
    with vmware_service.session(record) as client:
        view = client.si.content.viewManager.CreateContainerView(client.si.content.rootFolder,
                                                                 [vim.HostSystem], True)
        hosts = {host.name for host in view.view}
    assert hosts and all(vm.esxi_host in hosts for vm in found), ([vm.esxi_host for vm in found], hosts)
    assert VirtualMachine.objects.get(name="esx01").esxi_host == found[0].esxi_host

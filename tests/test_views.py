"""Pages, actions, JSON endpoints and admin actions through Django's test client."""

import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.urls import reverse

from replication.choices import DiskStatus, JobStatus
from replication.models import ReplicationJob, SourceDisk
from replication.services.inventory import register_image_vm
from replication.services.jobs import fail_job, start_replication
from tests.helpers import MiB, make_image, user_with_role

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def no_broker(monkeypatch):
    # These tests look at pages and state; queueing is covered end to end elsewhere.
    monkeypatch.setattr("replication.services.jobs.enqueue_prepare", lambda *args: None)


@pytest.fixture
def vm(tmp_path):
    images = [make_image(tmp_path / f"d{i}.img", 2 * MiB, [(0, MiB)], seed=i) for i in range(2)]
    return register_image_vm("web01", [str(p) for p in images])


@pytest.fixture
def operator():
    user = user_with_role("operator", "operator")
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def job(vm):
    return start_replication(vm)


PAGES = ["dashboard", "dashboard-fragment", "vm-list", "volume-list"]


@pytest.mark.parametrize("name", PAGES)
def test_pages_require_login(client, name):
    response = client.get(reverse(name))
    assert response.status_code == 302 and response["Location"].startswith("/login/")


def test_job_pages_require_login(client, job):
    response = client.get(reverse("vm-detail", args=[job.vm_id]))
    assert response.status_code == 302 and "/login/" in response["Location"]
    for name in ["job-detail", "job-fragment"]:
        response = client.get(reverse(name, args=[job.id]))
        assert response.status_code == 302 and "/login/" in response["Location"]
    assert client.post(reverse("job-cancel", args=[job.id])).status_code == 302
    job.refresh_from_db()
    assert job.status == JobStatus.PENDING, "an anonymous cancel changes nothing"


def test_api_requires_login_with_401(client, job):
    assert client.get(reverse("api-jobs")).status_code == 401
    assert client.get(reverse("api-job", args=[job.id])).json() == {
        "error": "authentication required: log in, or send Authorization: Bearer <API token>"}


@pytest.mark.parametrize("name", PAGES)
def test_pages_render_for_an_operator(operator, job, name):
    response = operator.get(reverse(name))
    assert response.status_code == 200


def test_empty_states(operator):
    assert "No replication is running" in operator.get(reverse("dashboard")).content.decode()
    empty = operator.get(reverse("vm-list")).content.decode()
    assert "No VMs registered yet" in empty and f'href="{reverse("sources")}"' in empty and "add_vm" not in empty
    assert "No volumes yet" in operator.get(reverse("volume-list")).content.decode()


def test_dashboard_shows_active_job_with_accessible_bars(operator, job):
    job.disks.update(bytes_done=MiB // 2, bytes_total=MiB, progress_percent=50.0)
    # MigrateKit OSSEA's stage-weighted percent says 65 %; the page says how much data is copied, with the stage.
    ReplicationJob.objects.filter(pk=job.pk).update(status=JobStatus.REPLICATING, progress_percent=65.0,
                                                    current_operation="Transfer", bytes_transferred=MiB,
                                                    total_bytes=4 * MiB)
    html = operator.get(reverse("dashboard-fragment")).content.decode()
    assert f'aria-label="{job.id} progress"' in html
    assert 'role="progressbar"' in html and 'aria-valuenow="25.0"' in html and "25.0 % · Transfer" in html
    page = operator.get(reverse("job-fragment", args=[job.id])).content.decode()
    assert "25.0</span> % of the data (1.0 MiB of 4.0 MiB) · stage Transfer" in page


def test_the_job_eta_is_its_slowest_disks(job):
    """Two disks at their own rates (a per-disk limit): the job ends with the slower."""
    fast, slow = job.disks.order_by("disk_key")
    ReplicationJob.objects.filter(pk=job.pk).update(status=JobStatus.REPLICATING)
    type(fast).objects.filter(pk=fast.pk).update(status="copying", bytes_done=0, bytes_total=36 * MiB,
                                                 throughput_bps=MiB)
    type(slow).objects.filter(pk=slow.pk).update(status="copying", bytes_done=0, bytes_total=51 * MiB,
                                                 throughput_bps=MiB)
    job.refresh_from_db()
    job.refresh_totals()
    job.refresh_from_db()
    assert job.eta_seconds == 51  # not (36 + 51) MiB / 2 MiB/s = 43 s
    type(slow).objects.filter(pk=slow.pk).update(throughput_bps=0)
    job.refresh_totals()
    job.refresh_from_db()
    assert job.eta_seconds is None  # a disk with no rate yet: unknown


def test_job_detail_shows_disks_and_failure_reason(operator, job):
    fail_job(job.id, "disk-2001: read failed at offset 0 length 1048576: Input/output error")
    # vCenter's own label, as discovery stores it, beside the disk key
    SourceDisk.objects.filter(job_disks__job=job, disk_key="disk-2001").update(label="Hard disk 2")
    html = operator.get(reverse("job-detail", args=[job.id])).content.decode()
    assert "disk-2000" in html and "disk-2001" in html
    assert "data-disk-label>Hard disk 2<" in html and html.count("data-disk-label>") == 1
    assert "read failed at offset 0" in html
    assert "Retry" in html and "Cancel job" not in html


def test_unknown_ids_are_404(operator):
    assert operator.get(reverse("job-detail", args=["job-nope"])).status_code == 404
    assert operator.get(reverse("job-fragment", args=["job-nope"])).status_code == 404
    assert operator.post(reverse("job-cancel", args=["job-nope"])).status_code == 404
    assert operator.post(reverse("vm-replicate", args=[999999])).status_code == 404
    assert operator.get(reverse("vm-detail", args=[999999])).status_code == 404
    assert operator.get("/vms/not-a-number/").status_code == 404
    assert operator.get(reverse("api-job", args=["job-nope"])).status_code == 404


def test_actions_need_post_and_csrf(job):
    user = user_with_role("csrf", "operator")
    strict = Client(enforce_csrf_checks=True)
    strict.force_login(user)
    assert strict.get(reverse("job-cancel", args=[job.id])).status_code == 405
    assert strict.post(reverse("job-cancel", args=[job.id])).status_code == 403
    job.refresh_from_db()
    assert job.status == JobStatus.PENDING


def test_cancel_action_cancels_job_and_pending_disks(operator, job):
    response = operator.post(reverse("job-cancel", args=[job.id]), follow=True)
    assert "cancelled" in response.content.decode()
    job.refresh_from_db()
    assert job.status == JobStatus.CANCELLED
    assert set(job.disks.values_list("status", flat=True)) == {DiskStatus.CANCELLED}


def test_retry_starts_a_new_job_only_for_ended_ones(operator, job):
    response = operator.post(reverse("job-retry", args=[job.id]), follow=True)
    assert "only failed or cancelled jobs can be retried" in response.content.decode()
    fail_job(job.id, "boom")
    response = operator.post(reverse("job-retry", args=[job.id]))
    new_job = ReplicationJob.objects.exclude(pk=job.pk).get()
    assert response["Location"] == reverse("job-detail", args=[new_job.id])


def test_replicate_now_from_the_vm_page(operator, vm):
    response = operator.post(reverse("vm-replicate", args=[vm.id]), {"sync_type": "full", "allow": "nonsense"},
                             follow=True)
    assert "unknown preflight override nonsense" in response.content.decode()
    response = operator.post(reverse("vm-replicate", args=[vm.id]), {"sync_type": "full", "verify": "on"})
    job = ReplicationJob.objects.get()
    assert response["Location"] == reverse("job-detail", args=[job.id])
    assert job.verify
    response = operator.post(reverse("vm-replicate", args=[vm.id]), {"sync_type": "full"}, follow=True)
    assert "already has an active job" in response.content.decode()
    response = operator.post(reverse("vm-replicate", args=[vm.id]), {"sync_type": "sideways"}, follow=True)
    assert "Unknown replication type" in response.content.decode()
    assert ReplicationJob.objects.count() == 1


def test_api_shapes(operator, job):
    listing = operator.get(reverse("api-jobs")).json()
    assert [j["id"] for j in listing["jobs"]] == [job.id]
    detail = operator.get(reverse("api-job", args=[job.id])).json()
    assert set(detail) >= {"id", "vm", "status", "stage", "percent", "bytes_transferred", "total_bytes",
                           "throughput_bps", "eta_seconds", "error_message", "disks"}
    assert [d["disk"] for d in detail["disks"]] == ["disk-2000", "disk-2001"]
    assert detail["disks"][0]["export_name"].startswith("migration-vol-")
    assert operator.get(reverse("api-jobs"), {"status": "active"}).json()["jobs"][0]["id"] == job.id
    assert operator.get(reverse("api-jobs"), {"status": "completed"}).json() == {"jobs": []}
    assert operator.get(reverse("api-jobs"), {"status": "bogus"}).status_code == 400
    spec = operator.get(reverse("api-openapi")).json()
    assert set(spec["paths"]) == {"/api/jobs/", "/api/jobs/{id}/", "/api/failovers/", "/api/failovers/{id}/",
                                  "/api/failovers/{id}/commit/", "/api/vms/{name}/points/", "/api/rpo/"}


def test_admin_cancel_and_retry_actions(job):
    admin_user = User.objects.create_superuser("admin", password="s3cret-pass")
    client = Client()
    client.force_login(admin_user)
    changelist = reverse("admin:replication_replicationjob_changelist")
    page = client.get(changelist).content.decode()
    assert 'role="progressbar"' in page
    client.post(changelist, {"action": "cancel_jobs", "_selected_action": [job.id]})
    job.refresh_from_db()
    assert job.status == JobStatus.CANCELLED
    client.post(changelist, {"action": "retry_jobs", "_selected_action": [job.id]})
    assert ReplicationJob.objects.filter(status=JobStatus.PENDING).exclude(pk=job.pk).count() == 1


def test_queueing_failure_fails_the_job_instead_of_leaving_it_pending(vm, monkeypatch,
                                                                      django_capture_on_commit_callbacks):
    """A broker that cannot be reached (a real publish to a closed port) must
    end the job with the reason, not leave it pending forever."""
    from celery import Celery

    from replication.services import jobs

    monkeypatch.undo()  # the real enqueue_prepare
    dead_broker = Celery(broker="redis://127.0.0.1:1/0", set_as_current=False)
    dead_broker.conf.broker_connection_retry_on_startup = False
    monkeypatch.setattr("replication.dispatch.publish",
                        lambda task_name, args, **kwargs: dead_broker.send_task(task_name, args=args))
    with django_capture_on_commit_callbacks(execute=True):
        job = jobs.start_replication(vm)
    job.refresh_from_db()
    assert job.status == JobStatus.FAILED
    assert "could not queue the job's prepare_job (is Redis running?)" in job.error_message
    assert set(job.disks.values_list("status", flat=True)) == {DiskStatus.CANCELLED}


def test_job_page_draws_throughput_chart_and_timeline(operator, job):
    from datetime import timedelta

    from replication.models import ProgressSample

    start = job.created_at
    for i, rate in enumerate([0, 100_000_000, 250_000_000, 180_000_000]):
        ProgressSample.objects.create(job=job, at=start + timedelta(seconds=5 * i), bytes_transferred=i,
                                      throughput_bps=rate)
    html = operator.get(reverse("job-fragment", args=[job.id])).content.decode()
    assert '<svg class="chart"' in html and "<polyline" in html
    # Both axes carry a scale: the rate in IEC units, the time in seconds.
    assert [t for t in ("0 B/s", "119.2 MiB/s", "238.4 MiB/s") if f"data-y-tick>{t}<" in html] == [
        "0 B/s", "119.2 MiB/s", "238.4 MiB/s"]
    assert "data-x-tick>0 s<" in html and "data-x-tick>15 s<" in html
    assert "Peak 238.4 MiB/s" in html  # IEC units, labelled as such
    assert "pending · Initializing" in html, "the timeline starts with the job's creation"


def test_vm_page_shows_each_vms_newest_job(operator, vm):
    first = start_replication(vm)
    fail_job(first.id, "boom")
    newest = start_replication(vm)
    html = operator.get(reverse("vm-list")).content.decode()
    assert reverse("job-detail", args=[newest.id]) in html
    assert reverse("job-detail", args=[first.id]) not in html


def test_sizes_are_in_iec_units_labelled_as_such_on_every_surface(operator, vm):
    from vma_agent.units import iec, iec_rate

    assert [iec(0), iec(1536), iec(12 * 2**20), iec(2**30), iec(None)] == ["0 B", "1.5 KiB", "12.0 MiB",
                                                                          "1.0 GiB", "—"]
    assert iec_rate(250_000_000) == "238.4 MiB/s"
    page = operator.get(reverse("vm-list")).content.decode()
    capacity = vm.disks.first().capacity_bytes
    assert iec(capacity) in page and " MB" not in page and " KB" not in page


# The VM page and the VMs table ---------------------------------------------------------------------------

def _completed(vm, age_s: float, **fields):
    """A completed cycle of the VM, with its recovery point frozen age_s ago."""
    from django.utils import timezone

    from replication.models import RecoveryPoint

    job = start_replication(vm)
    at = timezone.now() - timezone.timedelta(seconds=age_s)
    ReplicationJob.objects.filter(pk=job.pk).update(
        status=JobStatus.COMPLETED, recovery_point_at=at, started_at=at,
        completed_at=at + timezone.timedelta(seconds=4), bytes_transferred=8 * MiB, total_bytes=8 * MiB, **fields)
    return RecoveryPoint.objects.create(vm=vm, job=job, frozen_at=at, changed_bytes=MiB)


def test_vm_page_shows_identity_hardware_disks_cycles_points_failovers_drills_and_history(operator, vm):
    from replication.choices import FailoverKind, VMState
    from replication.models import DrillRun, FailoverJob, VMContext
    from replication.services import scheduler

    group = scheduler.create_group("gold", rpo_target_s=3600, max_concurrent=2)
    scheduler.add_vms(group, [vm])
    old = _completed(vm, 7200)
    new = _completed(vm, 60)
    failed = start_replication(vm)
    fail_job(failed.id, "source went away")
    failover = FailoverJob.objects.create(vm=vm, kind=FailoverKind.TEST, actor="operator", recovery_point=new,
                                          destination_vm="web01-test", status="succeeded", boot_verified=True)
    DrillRun.objects.create(vm=vm, group=group, failover=failover, status="passed", rto_s=42.5, note="booted")
    VMContext.of(vm).transition(VMState.REPLICATING, actor="alice", reason="cycle by alice")

    response = operator.get(reverse("vm-detail", args=[vm.pk]))
    assert response.status_code == 200
    html = response.content.decode()
    assert "<h1" in html and "web01" in html and 'data-agent>local<' in html
    # The hardware decision: each value with its origin and why.
    assert "Disk bus" in html and 'data-origin="default"' in html and "the bus KVM images" in html
    # Protection: the group and the recovery point against its target.
    assert 'data-group>gold<' in html and "within target" in html
    # Disks: operator labels, the source, the size.
    disks = list(vm.disks.order_by("disk_key"))
    assert "data-disk-label>Disk 1<" in html and "data-disk-label>Disk 2<" in html
    assert f"data-locator>{disks[0].locator}<" in html.replace("<wbr>", "") and "2.0 MiB" in html
    # Cycles newest first, linked, with status, bytes and rate (8 MiB over 4 s).
    cycles = [failed.id, new.job_id, old.job_id]
    assert [html.index(f'data-cycle="{c}"') for c in cycles] == sorted(html.index(f'data-cycle="{c}"') for c in cycles)
    assert reverse("job-detail", args=[failed.id]) in html and "source went away" in html
    assert "8.0 MiB of 8.0 MiB" in html and "2.0 MiB/s" in html
    # Points with retention, the one a failover boots from named; failovers and drills linked; the history.
    assert f'data-point="{new.pk}"' in html and "kept by the policy" in html and "booted by" in html
    assert reverse("failover-detail", args=[failover.pk]) in html and "42.5 s" in html
    history = html[html.index("data-history"):]
    assert history.index("cycle by alice") < history.index("failed: source went away"), "newest move first"


def test_vm_page_names_vcenter_disks_as_vcenter_does():
    from replication.choices import SourceKind
    from replication.models import VCenter, VirtualMachine

    vcenter = VCenter.objects.create(name="vc1", host="vc.example", username="u", thumbprint="AA")
    vm = VirtualMachine.objects.create(name="db01", source_kind=SourceKind.VMWARE, vcenter=vcenter, moref="vm-7",
                                       esxi_host="esx-03.example", agent="site-b")
    for key in (2016, 2000, 2001):  # the second controller's disk, then the first's
        SourceDisk.objects.create(vm=vm, disk_key=f"disk-{key}", device_key=key, unit_number=key % 16,
                                  locator=f"[ds1] db01/db01_{key}.vmdk", backing_file=f"[ds1] db01/db01_{key}.vmdk",
                                  capacity_bytes=40 * 2**30, label="Hard disk 9" if key == 2016 else "")
    client = Client()
    client.force_login(user_with_role("viewer", "viewer"))
    html = client.get(reverse("vm-detail", args=[vm.pk])).content.decode()
    # vCenter's own label where discovery stored it; the vSphere Client's numbering for older rows
    rows = [html.index(f'data-disk="disk-{key}"') for key in (2000, 2001, 2016)]
    assert rows == sorted(rows)
    for key, label in ((2000, "Hard disk 1"), (2001, "Hard disk 2"), (2016, "Hard disk 9")):
        row = html[html.index(f'data-disk="disk-{key}"'):]
        assert row.index(f"data-disk-label>{label}<") < row.index("</tr>")
    assert "[ds1] db01/<wbr>db01_2000.vmdk" in html and "40.0 GiB" in html, "a path wraps only after a /"
    assert "data-vcenter>vc1<" in html and "data-esxi>esx-03.example<" in html
    listed = client.get(reverse("vm-list")).content.decode()
    assert 'Hard disk 1</span> · <span class="text-nowrap">40.0 GiB' in listed
    assert f'href="{reverse("vm-detail", args=[vm.pk])}"' in listed


def test_vm_page_queries_are_bounded_and_show_all_lists_every_cycle(operator, vm):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    for age in range(30):
        _completed(vm, 600 + age * 60)
    url = reverse("vm-detail", args=[vm.pk])
    with CaptureQueriesContext(connection) as queries:
        html = operator.get(url).content.decode()
    assert html.count("data-cycle=") == 10 and html.count("data-point=") == 10
    assert 'data-show-all="cycles"' in html and 'data-show-all="points"' in html
    few = len(queries)
    for age in range(30, 60):
        _completed(vm, 600 + age * 60)
    with CaptureQueriesContext(connection) as queries:
        operator.get(url)
    assert len(queries) == few, "the page's queries do not grow with the VM's history"
    assert few <= 25, [q["sql"] for q in queries.captured_queries]
    everything = operator.get(url + "?show=cycles").content.decode()
    assert everything.count("data-cycle=") == 60 and 'data-show-all="cycles"' not in everything


def test_the_vm_page_links_to_its_settings(operator, vm):
    html = operator.get(reverse("vm-detail", args=[vm.pk])).content.decode()
    assert f'href="{reverse("vm-settings", args=[vm.pk])}" data-settings' in html


@pytest.fixture
def many_vms():
    """5,000 VMs, each with a disk; every third one replicating."""
    from replication.choices import VMState
    from replication.models import SourceDisk, VirtualMachine, VMContext

    vms = VirtualMachine.objects.bulk_create(
        VirtualMachine(name=f"vm-{i:04d}", agent="site-a" if i % 2 else "site-b") for i in range(5000))
    vms = list(VirtualMachine.objects.order_by("name"))
    SourceDisk.objects.bulk_create(SourceDisk(vm=vm, disk_key="disk-2000", locator=f"/images/{vm.name}.img",
                                              capacity_bytes=2**30) for vm in vms)
    VMContext.objects.bulk_create(VMContext(vm=vm, state=VMState.REPLICATING) for vm in vms[::3])
    return vms


def _names(html: str) -> list[str]:
    import re

    return re.findall(r'<tr data-vm="([^"]+)">', html)


def test_the_vms_table_pages_5000_vms_in_bounded_queries(operator, many_vms, django_assert_max_num_queries):
    with django_assert_max_num_queries(15):
        response = operator.get(reverse("vm-list"))
    html = response.content.decode()
    assert _names(html) == [f"vm-{i:04d}" for i in range(50)]
    assert "VMs 1–50 of 5000" in html and "Page 1 of 100" in html
    with django_assert_max_num_queries(15):
        html = operator.get(reverse("vm-list") + "?page=3").content.decode()
    assert _names(html) == [f"vm-{i:04d}" for i in range(100, 150)]
    # Descending by name, last page: the oldest names.
    html = operator.get(reverse("vm-list") + "?sort=-name&page=100").content.decode()
    assert _names(html) == [f"vm-{i:04d}" for i in range(49, -1, -1)]
    assert 'aria-sort="descending"' in html


def test_the_vms_table_searches_by_name_agent_and_state_and_keeps_the_query_across_pages(operator, many_vms):
    html = operator.get(reverse("vm-list") + "?q=vm-004").content.decode()
    assert _names(html) == [f"vm-{i:04d}" for i in range(40, 50)]
    assert "no VM matches" not in html.lower() and "Page 1 of" not in html
    # Agent and state together: replicating (every third VM) on site-a (odd ones): i % 6 == 3.
    html = operator.get(reverse("vm-list") + "?q=SITE-A&state=replicating&sort=name").content.decode()
    assert _names(html) == [f"vm-{i:04d}" for i in range(3, 300, 6)]
    assert "VMs 1–50 of 833" in html
    next_link = html[html.index('rel="next"') - 200:html.index('rel="next"')]
    assert all(part in next_link for part in ("q=SITE-A", "state=replicating", "sort=name", "page=2"))
    sort_link = html[html.index('data-sort="agent"') - 120:html.index('data-sort="agent"')]
    assert "q=SITE-A" in sort_link and "state=replicating" in sort_link and "page=" not in sort_link
    discovered = operator.get(reverse("vm-list") + "?state=discovered&sort=-name").content.decode()
    assert _names(discovered)[:3] == ["vm-4999", "vm-4997", "vm-4996"]
    none = operator.get(reverse("vm-list") + "?q=nothing-like-this").content.decode()
    assert "No VM matches this search" in none and "No VMs registered yet" not in none


def test_the_vms_table_sorts_by_state_agent_and_last_replication(operator, tmp_path):
    images = [make_image(tmp_path / f"s{i}.img", MiB, [(0, MiB)], seed=i) for i in range(3)]
    a = register_image_vm("alpha", [str(images[0])], agent="zeta")
    b = register_image_vm("bravo", [str(images[1])], agent="eta")
    register_image_vm("charlie", [str(images[2])], agent="theta")
    _completed(b, 3600)
    _completed(a, 60)
    url = reverse("vm-list")
    assert _names(operator.get(url + "?sort=agent").content.decode()) == ["bravo", "charlie", "alpha"]
    # Never replicated first ascending, last descending.
    assert _names(operator.get(url + "?sort=last").content.decode()) == ["charlie", "bravo", "alpha"]
    assert _names(operator.get(url + "?sort=-point").content.decode()) == ["alpha", "bravo", "charlie"]
    assert _names(operator.get(url + "?sort=-state").content.decode())[-1] == "charlie"  # discovered
    assert _names(operator.get(url + "?sort=bogus").content.decode()) == ["alpha", "bravo", "charlie"]
def test_times_are_written_one_way_in_the_operators_zone_on_pages_and_in_the_admin(job, settings):
    """TIME_ZONE_DISPLAY sets the zone of every time shown; the pages' `when`
    filter and the admin write them alike: 2026-01-15 13:30:00 CET."""
    from datetime import UTC, datetime

    settings.TIME_ZONE_DISPLAY = "Europe/Berlin"
    ReplicationJob.objects.filter(pk=job.pk).update(created_at=datetime(2026, 1, 15, 12, 30, tzinfo=UTC))
    operator = Client()
    operator.force_login(user_with_role("operator", "operator"))
    page = operator.get(reverse("job-detail", args=[job.id])).content.decode()
    assert "2026-01-15 13:30:00 CET" in page and "12:30" not in page
    admin = Client()
    admin.force_login(User.objects.create_superuser("admin", password="s3cret-pass"))
    change = admin.get(reverse("admin:replication_replicationjob_change", args=[job.id])).content.decode()
    assert "2026-01-15 13:30:00 CET" in change
    settings.TIME_ZONE_DISPLAY = "Mars/Olympus"
    from django.core.exceptions import ImproperlyConfigured

    with pytest.raises(ImproperlyConfigured, match="'Mars/Olympus' is not a time zone name"):
        Client().get("/login/")


def test_times_are_in_the_zone_the_browser_named_and_a_bad_name_means_the_setting(job, settings):
    """The tz cookie (zone.js) names the operator's zone for pages and the
    admin; a name the zone database lacks, or a path, is the setting's zone."""
    from datetime import UTC, datetime

    settings.TIME_ZONE_DISPLAY = "Europe/Berlin"
    ReplicationJob.objects.filter(pk=job.pk).update(created_at=datetime(2026, 1, 15, 12, 30, tzinfo=UTC))
    operator = Client()
    operator.force_login(user_with_role("operator", "operator"))
    admin = Client()
    admin.force_login(User.objects.create_superuser("admin", password="s3cret-pass"))
    page, change = reverse("job-detail", args=[job.id]), reverse("admin:replication_replicationjob_change",
                                                                 args=[job.id])
    for client in (operator, admin):
        client.cookies["tz"] = "America/New_York"
    assert "2026-01-15 07:30:00 EST" in operator.get(page).content.decode()
    assert "2026-01-15 07:30:00 EST" in admin.get(change).content.decode()
    for bad in ("Mars/Olympus", "../../../etc/passwd", "", "america/new_york"):
        operator.cookies["tz"] = bad
        response = operator.get(page)
        assert response.status_code == 200
        assert "2026-01-15 13:30:00 CET" in response.content.decode(), bad


def test_an_htmx_refresh_for_an_ended_session_reloads_the_page(job):
    """A logged-out fragment poll gets no login form to swap in: htmx is told
    to reload the page, whose request then goes to the login page."""
    for url in (reverse("dashboard-fragment"), reverse("job-fragment", args=[job.id])):
        response = Client().get(url, headers={"HX-Request": "true"})
        assert (response.status_code, response["HX-Refresh"], response.content) == (204, "true", b"")
        assert Client().get(url).status_code == 302


def test_messages_are_alerts_coloured_by_level_and_the_navbar_marks_the_page(operator, job):
    html = operator.post(reverse("job-cancel", args=[job.id]), follow=True).content.decode()
    assert f'class="alert alert-info py-2" role="status" data-message="info">Job {job.id} cancelled' in html
    assert "alert-danger" not in html
    html = operator.post(reverse("job-cancel", args=[job.id]), follow=True).content.decode()
    assert f'class="alert alert-danger py-2" role="alert" data-message="error">Job {job.id} is already' in html
    vms = operator.get(reverse("vm-list")).content.decode()
    assert '<a class="nav-link active" href="/vms/" aria-current="page">VMs</a>' in vms
    assert vms.count('class="nav-link active"') == 1  # one nav entry is current (the breadcrumb has its own)


def test_the_admin_is_branded_and_names_models_as_operators_do(job):
    admin = Client()
    admin.force_login(User.objects.create_superuser("admin", password="s3cret-pass"))
    index = admin.get(reverse("admin:index")).content.decode()
    assert "OMA administration" in index
    for name in ("API tokens", "CloudStack clouds", "VM lifecycles", "VMs", "Failover drills", "Scheduling decisions"):
        assert f">{name}<" in index, name
    for old in ("Api tokens", "Cloud stack configs", "Vm contexts", "Virtual machines"):
        assert old not in index, old

"""Every surface of recovery points: the recovery_points, failover
(--point, --source-lost) and failover_commit commands, the JSON API, the
admin and the pages. Points are rows made the way a completed cycle makes
them (a completed job, its point, a layer per disk): listing and choosing
need no copy; the failover and retention services have their own tests."""

import io
import json
import re
import subprocess
import sys
from datetime import timedelta

import pytest
from django.contrib.auth.models import User
from django.core.management import CommandError, call_command
from django.test import Client
from django.utils import timezone

from replication.choices import FailoverKind, FailoverStatus, JobStatus, SyncType, VMState
from replication.models import (
    FailoverJob,
    PointLayer,
    ProtectionGroup,
    RecoveryPoint,
    ReplicationJob,
    TargetVolume,
    VMContext,
)
from replication.roles import ADMINISTRATOR, OPERATOR, VIEWER
from replication.services.inventory import register_image_vm
from tests.helpers import PROJECT_ROOT, MiB, make_image, user_with_role, worker_env

pytestmark = pytest.mark.django_db

# Oldest first: (age in seconds, bytes its layer of each of the two disks takes).
POINTS = [(7200, (2 * MiB, MiB)), (1800, (MiB // 2, MiB)), (90, (3 * MiB, 0))]


@pytest.fixture(autouse=True)
def nothing_queued(monkeypatch):
    # A failover started here is recorded, not run: its steps are the failover tests' business.
    monkeypatch.setattr("replication.services.failover._enqueue", lambda job, task_name: None)
    monkeypatch.setattr("replication.services.jobs.enqueue_prepare", lambda *args: None)


def vm_with_points(tmp_path, name="web01", points=POINTS):
    """An image VM with two disks, ready for failover, whose completed cycles
    sealed `points` (their rows and layers). Returns (vm, points newest first)."""
    images = [make_image(tmp_path / f"{name}-{i}.img", 4 * MiB, [(0, MiB)], seed=i) for i in range(2)]
    vm = register_image_vm(name, [str(p) for p in images])
    volumes = [TargetVolume.objects.create(source_disk=disk, size_bytes=disk.capacity_bytes,
                                           path=str(tmp_path / f"{name}-{disk.disk_key}.raw"))
               for disk in vm.disks.order_by("disk_key")]
    now = timezone.now()
    made = []
    for index, (age, sizes) in enumerate(points):
        frozen = now - timedelta(seconds=age)
        job = ReplicationJob.objects.create(vm=vm, sync_type=SyncType.INCREMENTAL if index else SyncType.FULL,
                                            status=JobStatus.COMPLETED, recovery_point_at=frozen,
                                            completed_at=frozen + timedelta(seconds=5))
        point = RecoveryPoint.objects.create(vm=vm, job=job, frozen_at=frozen, changed_bytes=sum(sizes))
        for volume, size in zip(volumes, sizes, strict=True):
            PointLayer.objects.create(point=point, volume=volume, disk_key=volume.source_disk.disk_key,
                                      handle=f"{volume.path}.{index}.qcow2", changed_bytes=size)
        made.append(point)
    VMContext.objects.filter(pk=VMContext.of(vm).pk).update(state=VMState.READY_FOR_FAILOVER)
    return vm, made[::-1]


def run(*args, stdin: str | None = None, monkeypatch=None) -> str:
    """A management command in-process; what it printed (stdout)."""
    out = io.StringIO()
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    call_command(*args, stdout=out, stderr=io.StringIO())
    return out.getvalue()


def manage(*args, stdin: str = ""):
    """manage.py in a subprocess, as an operator runs it (exit status, argparse)."""
    return subprocess.run([sys.executable, "manage.py", *args], cwd=PROJECT_ROOT, env=worker_env(), input=stdin,
                          capture_output=True, text=True, timeout=120)


# recovery_points ---------------------------------------------------------------------------------------

def test_recovery_points_lists_the_points_newest_first_with_their_changes_and_use(tmp_path):
    vm, (newest, middle, oldest) = vm_with_points(tmp_path)
    test = FailoverJob.objects.create(vm=vm, kind=FailoverKind.TEST, actor="t", destination_vm="oma-test-web01",
                                      recovery_point=middle, status=FailoverStatus.SUCCEEDED)
    lines = run("recovery_points", "web01").splitlines()
    columns = [re.split(r"\s{2,}", line.strip()) for line in lines[:4]]  # columns: two spaces or more apart
    assert columns[0] == ["ID", "FROZEN AT (UTC)", "AGE", "JOB", "SYNC", "CHANGED", "IN USE BY"]
    assert columns[1:] == [
        [str(p.pk), f"{p.frozen_at:%Y-%m-%d %H:%M:%S}", age, p.job_id, sync, changed, use]
        for p, age, sync, changed, use in [(newest, "1m 30s", "incremental", "3.0 MiB", "-"),
                                           (middle, "30m 00s", "incremental", "1.5 MiB", f"test failover {test.pk}"),
                                           (oldest, "2h 00m", "full", "3.0 MiB", "-")]]
    assert lines[4] == "3 point(s); newest 1m 30s old, oldest 2h 00m old"


def test_recovery_points_json_gives_every_field_and_each_disks_layer(tmp_path):
    vm, (newest, middle, oldest) = vm_with_points(tmp_path)
    RecoveryPoint.objects.filter(pk=oldest.pk).update(status=RecoveryPoint.Status.EXPIRED)  # merged: not bootable
    rows = json.loads(run("recovery_points", "web01", "--json"))
    assert [row["id"] for row in rows] == [newest.pk, middle.pk]
    first = rows[0]
    assert set(first) == {"id", "frozen_at", "age_s", "job", "sync_type", "changed_bytes", "status", "in_use_by",
                          "disks"}
    assert first["frozen_at"] == newest.frozen_at.isoformat() and 89 <= first["age_s"] < 200
    assert (first["job"], first["changed_bytes"], first["status"], first["in_use_by"]) == (
        newest.job_id, 3 * MiB, "sealed", [])
    assert first["disks"] == {"disk-2000": 3 * MiB, "disk-2001": 0}


def test_recovery_points_of_a_vm_without_points_says_so(tmp_path):
    register_image_vm("bare", [str(make_image(tmp_path / "b.img", MiB, [(0, 4096)]))])
    assert run("recovery_points", "bare") == "bare: no recovery point yet (a point is made when a cycle completes)\n"
    assert json.loads(run("recovery_points", "bare", "--json")) == []


def test_recovery_points_of_an_unknown_vm_exits_non_zero_with_the_reason():
    result = manage("recovery_points", "no-such-vm")
    assert result.returncode == 1 and result.stderr.strip() == "CommandError: no VM named 'no-such-vm'"


# failover --point / --source-lost ----------------------------------------------------------------------

def test_source_lost_goes_with_live_only_refused_by_argparse():
    for kind in ("--test", "--forecast"):
        result = manage("failover", "web01", kind, "--source-lost")
        assert result.returncode == 2, result
        assert "error: --source-lost goes with --live only" in result.stderr and "usage:" in result.stderr
    with pytest.raises(CommandError, match="--point goes with --test or --live"):
        run("failover", "web01", "--forecast", "--point", "3")
    assert manage("failover", "web01", "--live", "--point", "three").returncode == 2  # not an id: argparse says so


def test_failover_of_an_unknown_or_expired_point_is_refused_with_the_reason(tmp_path):
    vm, (newest, _, oldest) = vm_with_points(tmp_path)
    with pytest.raises(CommandError, match=r"VM web01 has no recovery point 999999 \(manage.py recovery_points "
                                           r"web01\)"):
        run("failover", "web01", "--test", "--point", "999999")
    RecoveryPoint.objects.filter(pk=oldest.pk).update(status=RecoveryPoint.Status.EXPIRED)
    with pytest.raises(CommandError, match=f"recovery point {oldest.pk} of web01 is expired: it can no longer boot"):
        run("failover", "web01", "--live", "--source-lost", "--yes", "--point", str(oldest.pk))
    assert not FailoverJob.objects.exists()


def test_a_test_failover_boots_the_point_chosen_else_the_newest(tmp_path):
    vm, (newest, middle, _) = vm_with_points(tmp_path)
    out = run("failover", "web01", "--test", "--point", str(middle.pk))
    job = FailoverJob.objects.get()
    assert (job.kind, job.recovery_point_id, job.replication_job_id) == ("test", middle.pk, middle.job_id)
    assert f"test failover {job.pk} of web01 boots recovery point {middle.pk}" in out
    FailoverJob.objects.filter(pk=job.pk).update(status=FailoverStatus.ENDED)
    run("failover", "web01", "--test")
    assert FailoverJob.objects.exclude(pk=job.pk).get().recovery_point_id == newest.pk


def test_source_lost_explains_itself_and_asks_first(tmp_path, monkeypatch):
    vm, (newest, middle, _) = vm_with_points(tmp_path)
    for answer in ("", "no\n", "y\n"):
        out = io.StringIO()
        monkeypatch.setattr("sys.stdin", io.StringIO(answer))
        with pytest.raises(CommandError, match="not confirmed .*: nothing was done"):
            call_command("failover", "web01", "--live", "--source-lost", stdout=out)
        text = out.getvalue()
        assert "no shutdown request is sent to the source and no final cycle runs" in text
        assert "fenced first: ended as lost, its layer discarded" in text
        assert "Fail web01 over live with its source site lost? Type yes to go on (or pass --yes)" in text
    assert not FailoverJob.objects.exists()
    out = run("failover", "web01", "--live", "--source-lost", "--point", str(middle.pk), stdin="yes\n",
              monkeypatch=monkeypatch)
    job = FailoverJob.objects.get()
    assert (job.kind, job.source_lost, job.recovery_point_id) == ("live", True, middle.pk)
    assert f"live failover {job.pk} of web01 boots recovery point {middle.pk}" in out
    assert "forecast downtime" not in out  # nothing of the lost site's shutdown or final cycle to forecast


def test_source_lost_with_yes_does_not_ask_and_json_stays_parseable(tmp_path, monkeypatch):
    _, (newest, _, _) = vm_with_points(tmp_path)
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # nothing to read: asking would refuse
    out, err = io.StringIO(), io.StringIO()
    call_command("failover", "web01", "--live", "--source-lost", "--yes", "--json", stdout=out, stderr=err)
    report = json.loads(out.getvalue())
    assert (report["kind"], report["source_lost"], report["recovery_point"]) == ("live", True, newest.pk)
    assert "no final cycle" in err.getvalue() and "Type yes" not in err.getvalue()


# failover_commit ---------------------------------------------------------------------------------------

def test_failover_commit_warns_before_acting_and_asks(tmp_path, monkeypatch):
    vm_with_points(tmp_path)
    out = io.StringIO()
    monkeypatch.setattr("sys.stdin", io.StringIO("no\n"))
    with pytest.raises(CommandError, match="not confirmed \\('no'\\): nothing was done"):
        call_command("failover_commit", "web01", stdout=out)
    assert out.getvalue().startswith("Committing web01's live failover: the VM keeps running on the destination")
    assert "A committed VM can no longer be rolled back. Its protection ends" in out.getvalue()
    assert "(their history, the jobs and the failovers, is kept)" in out.getvalue()


def test_failover_commit_without_a_booted_live_failover_exits_non_zero_with_the_reason(tmp_path):
    vm, _ = vm_with_points(tmp_path)
    with pytest.raises(CommandError, match="VM web01 has no live failover that has booted to commit"):
        run("failover_commit", "web01", "--yes")
    with pytest.raises(CommandError, match="no VM named 'ghost'"):
        run("failover_commit", "ghost", "--yes")
    assert VMContext.of(vm).state == VMState.READY_FOR_FAILOVER


def test_a_commit_that_fails_on_the_destination_says_the_failover_can_still_be_rolled_back(tmp_path):
    vm, (newest, _, _) = vm_with_points(tmp_path)
    live = FailoverJob.objects.create(vm=vm, kind=FailoverKind.LIVE, actor="t", destination_vm="oma-nowhere-web01",
                                      recovery_point=newest, status=FailoverStatus.SUCCEEDED, boot_verified=True)
    VMContext.objects.filter(vm=vm).update(state=VMState.FAILED_OVER_LIVE)
    with pytest.raises(CommandError, match="committing failed: .*oma-nowhere-web01 still runs over its recovery "
                                           "point and can be rolled back"):
        run("failover_commit", "web01", "--yes")
    live.refresh_from_db()
    assert live.status == FailoverStatus.SUCCEEDED and live.committed_at is None
    assert VMContext.of(vm).state == VMState.FAILED_OVER_LIVE


# group: retention options ------------------------------------------------------------------------------

def test_group_takes_its_retention_and_refuses_nonsense():
    out = run("group", "create", "gold", "--points-keep", "3", "--points-hourly", "24", "--points-daily", "7")
    gold = ProtectionGroup.objects.get(name="gold")
    assert (gold.points_keep, gold.points_hourly_h, gold.points_daily_d) == (3, 24, 7)
    assert "keeps 3 recovery point(s) per VM + the newest of each hour for 24 h + the newest of each day for 7 d" \
        in out
    out = run("group", "update", "gold", "--points-hourly", "0")
    assert "keeps 3 recovery point(s) per VM;" not in out and out.rstrip().endswith("keeps 3 recovery point(s) "
                                                                                    "per VM + the newest of each "
                                                                                    "day for 7 d")
    for args, reason in [(["--points-keep", "0"], "a group keeps at least 1 recovery point per VM"),
                         (["--points-keep", "-2"], "the recovery points kept must be between 0 and 10000, not -2"),
                         (["--points-daily", "99999"], "the days of daily recovery points must be between 0 and "
                                                       "3660")]:
        with pytest.raises(CommandError, match=reason):
            run("group", "update", "gold", *args)
    gold.refresh_from_db()
    assert (gold.points_keep, gold.points_hourly_h, gold.points_daily_d) == (3, 0, 7)
    listed = json.loads(run("group", "list", "--json"))
    assert (listed[0]["points_keep"], listed[0]["points_hourly_h"], listed[0]["points_daily_d"]) == (3, 0, 7)


def test_a_group_without_its_own_number_keeps_recovery_points_keep(settings):
    settings.RECOVERY_POINTS_KEEP = 7
    run("group", "create", "plain")
    assert json.loads(run("group", "list", "--json"))[0]["points_keep"] == 7


# The JSON API ------------------------------------------------------------------------------------------

def api(role, name=None) -> Client:
    from replication.models import ApiToken

    user = user_with_role(name or f"script-{role}", role)
    return Client(headers={"Authorization": f"Bearer {ApiToken.issue(user, 'test')[1]}"})


def post(client, url, body):
    return client.post(url, json.dumps(body), content_type="application/json")


def test_the_api_lists_a_vms_points_to_a_viewer(tmp_path):
    vm, (newest, middle, oldest) = vm_with_points(tmp_path)
    viewer = api(VIEWER)
    body = viewer.get("/api/vms/web01/points/").json()
    assert body["vm"] == "web01" and body["count"] == 3
    assert 89 <= body["newest_age_s"] < 200 and 7199 <= body["oldest_age_s"] < 7400
    assert [p["id"] for p in body["points"]] == [newest.pk, middle.pk, oldest.pk]
    assert body["points"][1]["disks"] == {"disk-2000": MiB // 2, "disk-2001": MiB}
    missing = viewer.get("/api/vms/ghost/points/")
    assert missing.status_code == 404 and missing.json() == {"error": "no VM named 'ghost'"}
    assert Client().get("/api/vms/web01/points/").status_code == 401


def test_the_api_starts_a_failover_from_a_chosen_point_and_with_the_source_lost(tmp_path):
    vm, (newest, middle, _) = vm_with_points(tmp_path)
    operator, admin = api(OPERATOR), api(ADMINISTRATOR, "dave")
    test = post(operator, "/api/failovers/", {"vm": "web01", "kind": "test", "point": middle.pk})
    assert test.status_code == 201, test.json()
    assert (test.json()["recovery_point"], test.json()["source_lost"]) == (middle.pk, False)
    FailoverJob.objects.filter(pk=test.json()["id"]).update(status=FailoverStatus.ENDED)
    live = post(admin, "/api/failovers/", {"vm": "web01", "kind": "live", "source_lost": True, "point": None})
    assert live.status_code == 201, live.json()
    assert (live.json()["recovery_point"], live.json()["source_lost"], live.json()["kind"]) == (newest.pk, True,
                                                                                               "live")


@pytest.mark.parametrize("body, status, reason", [
    ({"kind": "test", "source_lost": True}, 400, "source_lost goes with kind live only, not test"),
    ({"kind": "rollback", "point": 1}, 400, "point goes with a test or live failover"),
    ({"kind": "test", "point": "newest"}, 400, "point must be the id of one of the VM's recovery points"),
    ({"kind": "test", "point": True}, 400, "point must be the id"),
    ({"kind": "test", "point": 0}, 400, "point must be the id"),
    ({"kind": "live", "source_lost": "yes"}, 400, "source_lost must be true or false, not 'yes'"),
    ({"kind": "test", "point": 999999}, 409, "VM web01 has no recovery point 999999"),
])
def test_the_api_refuses_a_wrong_point_or_source_lost_with_the_reason(tmp_path, body, status, reason):
    vm_with_points(tmp_path)
    response = post(api(ADMINISTRATOR), "/api/failovers/", {"vm": "web01", **body})
    assert response.status_code == status and reason in response.json()["error"], response.json()
    assert not FailoverJob.objects.exists()


def test_only_an_administrator_commits_and_only_a_booted_live_failover(tmp_path, monkeypatch):
    vm, (newest, _, _) = vm_with_points(tmp_path)
    test = FailoverJob.objects.create(vm=vm, kind=FailoverKind.TEST, actor="t", recovery_point=newest,
                                      status=FailoverStatus.SUCCEEDED)
    url = f"/api/failovers/{test.pk}/commit/"
    for role in (VIEWER, OPERATOR):
        refused = api(role).post(url)
        assert refused.status_code == 403 and refused["Content-Type"] == "application/json"
        assert refused.json()["error"] == (f"This needs the administrator role; script-{role} is {role}. Ask an "
                                           "administrator.")
    admin = api(ADMINISTRATOR, "dave")
    wrong = admin.post(url)
    assert wrong.status_code == 409 and wrong.json()["error"] == (
        f"failover {test.pk} is a test failover, succeeded: only a live failover whose VM booted can be committed")
    assert admin.post("/api/failovers/999999/commit/").json() == {"error": "no failover 999999"}
    assert admin.get(url).status_code == 405
    FailoverJob.objects.filter(pk=test.pk).update(status=FailoverStatus.ENDED)
    live = FailoverJob.objects.create(vm=vm, kind=FailoverKind.LIVE, actor="t", recovery_point=newest,
                                      status=FailoverStatus.SUCCEEDED, destination_vm="oma-web01")
    committed = []

    def commit(vm, actor):
        committed.append((vm.name, actor))
        live.transition(FailoverStatus.COMMITTED, committed_at=timezone.now())
        return live

    monkeypatch.setattr("replication.services.failover.commit_failover", commit)
    response = admin.post(f"/api/failovers/{live.pk}/commit/")
    assert response.status_code == 200 and response.json()["status"] == "committed"
    assert response.json()["committed_at"] and committed == [("web01", "dave")]


def test_the_api_passes_a_failed_commit_on_as_409_with_the_reason(tmp_path):
    vm, (newest, _, _) = vm_with_points(tmp_path)
    live = FailoverJob.objects.create(vm=vm, kind=FailoverKind.LIVE, actor="t", recovery_point=newest,
                                      status=FailoverStatus.SUCCEEDED, destination_vm="oma-nowhere-web01")
    VMContext.objects.filter(vm=vm).update(state=VMState.FAILED_OVER_LIVE)
    response = api(ADMINISTRATOR).post(f"/api/failovers/{live.pk}/commit/")
    assert response.status_code == 409 and "can be rolled back" in response.json()["error"]


# The admin ---------------------------------------------------------------------------------------------

def test_the_admin_shows_recovery_points_read_only(tmp_path, client):
    vm, (newest, middle, _) = vm_with_points(tmp_path)
    client.force_login(User.objects.create_superuser("root", password="s3cret-pass"))
    listing = client.get("/admin/replication/recoverypoint/").content.decode()
    assert listing.count("web01") >= 3 and "1.5 MiB" in listing and newest.job_id in listing
    assert "Add recovery point" not in listing
    page = client.get(f"/admin/replication/recoverypoint/{middle.pk}/change/")
    text = page.content.decode()
    assert page.status_code == 200 and "disk-2001" in text and "512.0 KiB" in text
    assert 'name="_save"' not in text and "Delete" not in text
    assert client.get("/admin/replication/recoverypoint/add/").status_code == 403
    assert client.post(f"/admin/replication/recoverypoint/{middle.pk}/delete/", {"post": "yes"}).status_code == 403
    assert client.post(f"/admin/replication/recoverypoint/{middle.pk}/change/",
                       {"changed_bytes": "1", "status": "expired"}).status_code == 403
    middle.refresh_from_db()
    assert (middle.status, middle.changed_bytes) == ("sealed", MiB // 2 + MiB)


# The pages ---------------------------------------------------------------------------------------------

def page_as(role, name=None) -> Client:
    client = Client()
    client.force_login(user_with_role(name or f"user-{role}", role))
    return client


def row_of(html: str, vm: str) -> str:
    start = html.index(f'<tr data-vm="{vm}">')
    return html[start:html.index("</tr>", start)]


def test_the_vms_page_shows_each_vms_points_and_offers_them_for_a_test_failover(tmp_path):
    vm, (newest, middle, oldest) = vm_with_points(tmp_path)
    row = row_of(page_as(OPERATOR).get("/vms/").content.decode(), "web01")
    assert 'data-points="3"' in row and "newest <span" in row and ">1m 30s</span>" in row
    assert ">2h 00m</span> old" in row
    options = row[row.index('id="test-point-'):]
    assert options.index(f'value="{newest.pk}" selected') < options.index(f'value="{middle.pk}"') \
        < options.index(f'value="{oldest.pk}"')
    assert "Live failover web01" not in row  # an operator: no live failover
    assert "Live failover web01" in row_of(page_as(ADMINISTRATOR).get("/vms/").content.decode(), "web01")
    viewer_row = row_of(page_as(VIEWER).get("/vms/").content.decode(), "web01")
    assert 'data-points="3"' in viewer_row and "Test failover web01" not in viewer_row


def test_where_failovers_boot_the_volumes_in_place_only_the_newest_point_is_offered(tmp_path):
    vm, (newest, middle, _) = vm_with_points(tmp_path)
    TargetVolume.objects.filter(source_disk__vm=vm).update(provider="cloudstack", cloud_volume_id="v-1")
    row = row_of(page_as(ADMINISTRATOR).get("/vms/").content.decode(), "web01")
    assert 'data-points="3"' in row  # all three are the VM's points
    assert f'value="{newest.pk}" selected' in row and f'value="{middle.pk}"' not in row
    live = page_as(ADMINISTRATOR, "admin2").get(f"/vms/{vm.pk}/failover/live/").content.decode()
    assert f'value="{newest.pk}" selected' in live and f'value="{middle.pk}"' not in live


def test_a_test_failover_from_the_page_boots_the_chosen_point_and_pauses_nothing(tmp_path):
    vm, (_, middle, _) = vm_with_points(tmp_path)
    operator = page_as(OPERATOR)
    response = operator.post(f"/vms/{vm.pk}/failover/test/", {"point": str(middle.pk)}, follow=True)
    job = FailoverJob.objects.get()
    assert job.recovery_point_id == middle.pk
    assert (f"Test failover {job.pk} of web01 started: it boots {job.destination_vm} from recovery point "
            f"{middle.pk} (cycle {middle.job_id}) on overlays of its own; the VM&#x27;s cycles go on adding points "
            "meanwhile.") in response.content.decode()
    FailoverJob.objects.filter(pk=job.pk).update(status=FailoverStatus.SUCCEEDED)
    row = row_of(operator.get("/vms/").content.decode(), "web01")
    assert "paused" not in row
    assert "Replicate web01" in row and "End test web01" in row and "Test failover web01" not in row


def test_a_wrong_point_on_the_page_starts_nothing_and_says_why(tmp_path):
    vm, _ = vm_with_points(tmp_path)
    operator = page_as(OPERATOR)
    for point, reason in [("x", "recovery point &#x27;x&#x27; is not a point id"),
                          ("999999", "VM web01 has no recovery point 999999")]:
        page = operator.post(f"/vms/{vm.pk}/failover/test/", {"point": point}, follow=True).content.decode()
        assert reason in page
    assert not FailoverJob.objects.exists()


def test_the_live_failover_page_explains_the_source_lost_option_and_needs_its_confirmation(tmp_path):
    vm, (_, middle, _) = vm_with_points(tmp_path)
    admin = page_as(ADMINISTRATOR)
    page = admin.get(f"/vms/{vm.pk}/failover/live/?point={middle.pk}").content.decode()
    lost = page[page.index("With the source site lost"):]
    for words in ("<strong>no shutdown request</strong>", "<strong>no final cycle</strong>",
                  "<strong>is fenced</strong>: ended as lost, its layer\n    discarded",
                  "I confirm the source site is lost"):
        assert words in lost
    assert f'value="{middle.pk}" selected' in lost
    refused = admin.post(f"/vms/{vm.pk}/failover/live/", {"source_lost": "on", "point": str(middle.pk)},
                         follow=True).content.decode()
    assert "A failover with the source site lost needs its confirmation ticked: nothing was started." in refused
    assert not FailoverJob.objects.exists()
    admin.post(f"/vms/{vm.pk}/failover/live/", {"source_lost": "on", "confirm_source_lost": "on",
                                                "point": str(middle.pk)})
    job = FailoverJob.objects.get()
    assert (job.kind, job.source_lost, job.recovery_point_id) == ("live", True, middle.pk)
    refused = page_as(OPERATOR).post(f"/vms/{vm.pk}/failover/live/", {"source_lost": "on",
                                                                       "confirm_source_lost": "on"})
    assert refused.status_code == 403 and FailoverJob.objects.count() == 1


def test_a_booted_live_failover_offers_its_commit_with_the_warning_to_administrators_only(tmp_path, monkeypatch):
    vm, (newest, _, _) = vm_with_points(tmp_path)
    live = FailoverJob.objects.create(vm=vm, kind=FailoverKind.LIVE, actor="t", recovery_point=newest,
                                      status=FailoverStatus.SUCCEEDED, destination_vm="oma-web01")
    VMContext.objects.filter(vm=vm).update(state=VMState.FAILED_OVER_LIVE)
    row = row_of(page_as(ADMINISTRATOR).get("/vms/").content.decode(), "web01")
    form = row[row.index("data-commit"):]
    assert "Commit web01" in form and "A committed VM can no longer be rolled back" in form
    assert "its protection ends (its history is kept)" in form
    operator = page_as(OPERATOR)
    assert "Commit web01" not in row_of(operator.get("/vms/").content.decode(), "web01")
    assert operator.post(f"/vms/{vm.pk}/failover/commit/").status_code == 403
    refused = page_as(ADMINISTRATOR, "admin2").post(f"/vms/{vm.pk}/failover/commit/", follow=True)
    assert "committing failed" in refused.content.decode()  # no such VM on the destination: the real reason
    live.refresh_from_db()
    assert live.status == FailoverStatus.SUCCEEDED


def test_a_failovers_page_names_its_point_and_a_lost_source(tmp_path):
    vm, (_, middle, _) = vm_with_points(tmp_path)
    live = FailoverJob.objects.create(vm=vm, kind=FailoverKind.LIVE, actor="t", recovery_point=middle,
                                      source_lost=True, destination_vm="oma-web01")
    page = page_as(VIEWER).get(f"/failovers/{live.pk}/fragment/").content.decode()
    assert f'data-point="{middle.pk}">{middle.pk} (frozen {middle.frozen_at:%Y-%m-%d %H:%M:%S} UTC)' in page
    assert "lost: no shutdown request, no final cycle, its running cycle fenced" in page


# End to end: the commands over a real failover ------------------------------------------------------------

@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_a_source_lost_failover_then_its_commit_through_the_commands(tmp_path):
    """A real boot (libvirt, the project's boot disk): the commands start a
    live failover with the source site lost from the VM's point, then commit
    it; after the commit nothing rolls it back and its points are released."""
    from replication.platforms import get_destination, get_provider
    from replication.services import failover, jobs
    from simulators.boot_disk import boot_disk_builder

    destination = get_destination()
    for name in destination.list_vms("oma-live-vm-commit"):
        destination.destroy(name)
    # One completed cycle without a worker: its replica is the boot disk, written in place (a first cycle).
    disk = tmp_path / "vm-commit.img"
    boot_disk_builder().build_boot_disk(disk, "D")
    vm = register_image_vm("vm-commit", [str(disk)])
    job = jobs.start_replication(vm)
    assert job.enter_stage("Initializing", JobStatus.PREPARING) and job.enter_stage("Transfer", JobStatus.REPLICATING)
    vm_disk = job.disks.get()
    replica = get_provider().volume_path(vm_disk.target_volume.export_name)
    replica.write_bytes(disk.read_bytes())
    TargetVolume.objects.filter(pk=vm_disk.target_volume_id).update(path=str(replica))
    assert vm_disk.start_attempt("t") and vm_disk.complete(bytes_total=1, bytes_zeroed=0, throughput_bps=1)
    assert job.transition(JobStatus.FINALIZING)
    jobs.commit_and_complete(job)
    context = VMContext.of(vm)
    context.boot_check_regex, context.boot_check_timeout_s = r"BOOT-MARKER: D", 180
    context.save()
    (point,) = RecoveryPoint.sealed(vm)
    run("failover", "vm-commit", "--live", "--source-lost", "--yes", "--point", str(point.pk))
    live = FailoverJob.objects.get(vm=vm)
    try:
        failover.run_failover(live.pk)
        live.refresh_from_db()
        assert live.status == FailoverStatus.SUCCEEDED and live.boot_verified, live.error_message
        assert (live.source_lost, live.recovery_point_id) == (True, point.pk)
        assert not live.steps.filter(name__in=["shut down source", "final incremental"]).exists()
        out = run("failover_commit", "vm-commit", "--yes")
        assert out.splitlines()[0].startswith("Committing vm-commit's live failover")
        assert f"live failover {live.pk} of vm-commit committed: {live.destination_vm} is the VM now" in out
        live.refresh_from_db()
        assert live.status == FailoverStatus.COMMITTED and live.committed_at is not None
        assert VMContext.of(vm).state == VMState.COMPLETED
        point.refresh_from_db()
        assert point.status == RecoveryPoint.Status.RELEASED
        assert json.loads(run("recovery_points", "vm-commit", "--json")) == []
        with pytest.raises(CommandError, match="VM vm-commit has no live failover to roll back"):
            run("rollback", "vm-commit")
        with pytest.raises(CommandError, match="no live failover that has booted to commit"):
            run("failover_commit", "vm-commit", "--yes")
    finally:
        for name in destination.list_vms("oma-live-vm-commit"):
            destination.destroy(name)

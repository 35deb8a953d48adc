"""Roles on every page, action and API call: each role's allowed actions
reach their service, the others answer 403 and change nothing; the actor
recorded is the real user (or the API token's owner, or the OS user of a
command). Services are replaced by recorders where their real runs are
covered elsewhere: a 403 needs no failover."""

import getpass
import io
import json
from types import SimpleNamespace

import pytest
from django.contrib.admin.models import LogEntry
from django.contrib.auth.models import User
from django.core.management import CommandError, call_command
from django.test import Client

from replication.choices import FailoverKind, JobStatus, VMState
from replication.models import ApiToken, FailoverJob, ReplicationJob, VCenter, VirtualMachine, VMContext, VMStateChange
from replication.roles import ADMINISTRATOR, OPERATOR, VIEWER, ensure_roles, role_of
from replication.services.inventory import register_image_vm
from replication.services.jobs import fail_job, start_replication
from tests.helpers import MiB, make_image, user_with_role

pytestmark = pytest.mark.django_db

RANK = {None: 0, VIEWER: 1, OPERATOR: 2, ADMINISTRATOR: 3}
ROLES = [None, VIEWER, OPERATOR, ADMINISTRATOR]


@pytest.fixture(autouse=True)
def no_broker(monkeypatch):
    monkeypatch.setattr("replication.services.jobs.enqueue_prepare", lambda *args: None)


@pytest.fixture
def vm(tmp_path):
    image = make_image(tmp_path / "d0.img", 2 * MiB, [(0, MiB)], seed=1)
    return register_image_vm("web01", [str(image)])


@pytest.fixture
def job(vm):
    return start_replication(vm, actor="setup")


def client_as(role, name=None) -> Client:
    client = Client()
    client.force_login(user_with_role(name or f"user-{role or 'none'}", role))
    return client


def token_for(role, name=None) -> str:
    user = user_with_role(name or f"script-{role or 'none'}", role)
    return ApiToken.issue(user, "test")[1]


# Pages and the API: reading ------------------------------------------------------------------------------

@pytest.fixture
def read_pages(job, vm, monkeypatch):
    monkeypatch.setattr("replication.services.failover_checks.report", lambda vm, name: [])
    monkeypatch.setattr("replication.services.forecast.downtime", lambda vm: {"total_s": None, "basis": {}})
    monkeypatch.setattr("replication.services.sources.inventory", lambda vcenter: [])
    failover = FailoverJob.objects.create(vm=vm, kind=FailoverKind.TEST, actor="setup", destination_vm="t")
    vcenter = VCenter.objects.create(name="vc1", host="vc.example", username="u", thumbprint="AA")
    return ["/", "/fragments/dashboard/", "/vms/", "/volumes/", "/protection/", "/cloud/", "/sources/",
            f"/jobs/{job.id}/", f"/jobs/{job.id}/fragment/", f"/failovers/{failover.pk}/",
            f"/failovers/{failover.pk}/fragment/", f"/vms/{vm.pk}/failover/live/", f"/sources/vcenters/{vcenter.pk}/",
            f"/vms/{vm.pk}/"]


@pytest.mark.parametrize("role", ROLES)
def test_every_page_needs_a_role_and_any_role_reads_it(read_pages, role):
    client = client_as(role)
    for url in read_pages:
        response = client.get(url)
        if role is None:
            assert response.status_code == 403, url
            assert "ask an administrator for a role" in response.content.decode(), url
        else:
            assert response.status_code == 200, url


API_READS = ["/api/jobs/", "/api/failovers/", "/api/rpo/", "/metrics"]


@pytest.mark.parametrize("role", ROLES)
def test_the_api_needs_a_role_with_a_session_or_a_token(job, role):
    session = client_as(role)
    bearer = Client(headers={"Authorization": f"Bearer {token_for(role)}"})
    for client in (session, bearer):
        for url in [*API_READS, f"/api/jobs/{job.id}/"]:
            response = client.get(url)
            assert response.status_code == (403 if role is None else 200), url
            if role is None:
                assert "ask an administrator for a role" in response.json()["error"]


def test_anonymous_users_still_log_in_first(job):
    assert Client().get("/vms/")["Location"].startswith("/login/")
    assert Client().get("/api/jobs/").status_code == 401


# Actions: each role against each action ------------------------------------------------------------------

class Recorder:
    """A service entry point replaced: records its calls, returns `value`."""

    def __init__(self, value):
        self.value, self.calls = value, []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.value


def failover_like(kind="test"):
    return SimpleNamespace(pk=1, kind=kind, destination_vm="oma-x", replication_job_id="job-x", recovery_point_id=1,
                           source_lost=False)


@pytest.fixture
def actions(vm, job, monkeypatch):
    """(name, required role, POST url, data, recorder or None: reached = not 403)."""
    limit = SimpleNamespace(label="1.0 MiB/s", agent_error="")
    vcenter = VCenter.objects.create(name="vc1", host="vc.example", username="u", thumbprint="AA")
    table = [
        ("replicate", OPERATOR, f"/vms/{vm.pk}/replicate/", {"sync_type": "full"},
         "replication.services.jobs.start_replication", job),
        ("cancel", OPERATOR, f"/jobs/{job.id}/cancel/", {}, "replication.services.jobs.cancel_job", True),
        ("retry", OPERATOR, f"/jobs/{job.id}/retry/", {}, "replication.services.jobs.retry_job", job),
        ("limit", OPERATOR, f"/jobs/{job.id}/limit/", {"rate": "1M"}, "replication.services.limits.change_limit",
         limit),
        ("test failover", OPERATOR, f"/vms/{vm.pk}/failover/test/", {},
         "replication.services.failover.start_failover", failover_like()),
        ("end test", OPERATOR, f"/vms/{vm.pk}/failover/end/", {},
         "replication.services.failover.end_test_failover", failover_like()),
        ("live failover", ADMINISTRATOR, f"/vms/{vm.pk}/failover/live/", {},
         "replication.services.failover.start_failover", failover_like("live")),
        ("rollback", ADMINISTRATOR, f"/vms/{vm.pk}/rollback/", {},
         "replication.services.failover.start_rollback", failover_like("rollback")),
        ("commit", ADMINISTRATOR, f"/vms/{vm.pk}/failover/commit/", {},
         "replication.services.failover.commit_failover", failover_like("live")),
        ("add image VM", ADMINISTRATOR, "/sources/", {"step": "image", "name": "new", "disks": "/x.img"},
         "replication.views.sources.register_image_vm", vm),
        ("add vCenter", ADMINISTRATOR, "/sources/", {"step": "fetch", "host": "vc.example", "port": "443"},
         "replication.services.sources.certificate_thumbprint", "AA:BB"),
        ("protect vCenter VMs", ADMINISTRATOR, f"/sources/vcenters/{vcenter.pk}/", {"vm": ["a"]},
         "replication.services.vmware.discover", []),
        ("cloud check", ADMINISTRATOR, "/cloud/check/", {}, None, None),
    ]
    recorders = {}  # by target: the live and the test failover share start_failover
    for _, _, _, _, target, value in table:
        if target is not None and target not in recorders:
            recorders[target] = Recorder(value)
            monkeypatch.setattr(target, recorders[target])
    return [(name, role, url, data, recorders.get(target)) for name, role, url, data, target, _ in table]


@pytest.mark.parametrize("role", ROLES)
def test_each_role_may_press_only_its_own_buttons(actions, role, job):
    client = client_as(role)
    for name, required, url, data, recorder in actions:
        calls = len(recorder.calls) if recorder else 0
        response = client.post(url, data)
        reached = (len(recorder.calls) if recorder else 0) - calls
        if RANK[role] >= RANK[required]:
            assert response.status_code != 403, f"{role} may {name}"
            assert recorder is None or reached == 1, f"{role}'s {name} reached its service"
        else:
            assert response.status_code == 403, f"{role} may not {name}"
            assert reached == 0, f"{role}'s {name} reached nothing"
    job.refresh_from_db()
    assert job.status == JobStatus.PENDING  # the services were recorders: nothing real ran


def test_a_viewer_cannot_start_a_test_failover_nor_an_operator_a_live_one_on_the_pages(vm):
    VMContext.objects.filter(pk=VMContext.of(vm).pk).update(state=VMState.READY_FOR_FAILOVER)
    before = list(VMStateChange.objects.values_list("id", flat=True))
    for role, url in [(VIEWER, f"/vms/{vm.pk}/failover/test/"), (OPERATOR, f"/vms/{vm.pk}/failover/live/"),
                      (OPERATOR, f"/vms/{vm.pk}/rollback/"), (VIEWER, f"/vms/{vm.pk}/replicate/")]:
        response = client_as(role, f"{role}-{url.rsplit('/', 2)[-2]}").post(url, {"sync_type": "full"})
        assert response.status_code == 403
        assert "Ask an administrator" in response.content.decode()
    assert not FailoverJob.objects.exists() and not ReplicationJob.objects.exists()
    assert list(VMStateChange.objects.values_list("id", flat=True)) == before
    assert VMContext.of(vm).state == VMState.READY_FOR_FAILOVER


def api_start(client, **body):
    return client.post("/api/failovers/", json.dumps(body), content_type="application/json")


def test_a_viewer_cannot_start_a_test_failover_nor_an_operator_a_live_one_through_the_api(vm):
    viewer = Client(headers={"Authorization": f"Bearer {token_for(VIEWER)}"})
    operator = Client(headers={"Authorization": f"Bearer {token_for(OPERATOR)}"})
    for client, kind in [(viewer, "test"), (operator, "live"), (operator, "rollback"), (viewer, "bogus")]:
        response = api_start(client, vm=vm.name, kind=kind)
        assert response.status_code == 403 and "role" in response.json()["error"], kind
    assert not FailoverJob.objects.exists()


def test_the_api_starts_a_failover_for_its_role_and_records_the_tokens_owner(vm, monkeypatch):
    started = Recorder(failover_like())
    monkeypatch.setattr("replication.services.failover.start_failover", started)
    monkeypatch.setattr("replication.views.api.failover_json", lambda job: {"id": job.pk})
    operator = Client(headers={"Authorization": f"Bearer {token_for(OPERATOR, 'carol')}"})
    response = api_start(operator, vm=vm.name, kind="test")
    assert response.status_code == 201 and response.json() == {"id": 1}
    assert started.calls == [((vm, "test"), {"actor": "carol", "point_id": None, "source_lost": False})]
    assert api_start(operator, vm="nobody", kind="test").status_code == 404
    assert api_start(operator, vm=vm.name, kind="sideways").status_code == 400
    assert operator.post("/api/failovers/", "kind=test", content_type="text/plain").status_code == 415
    admin = Client(headers={"Authorization": f"Bearer {token_for(ADMINISTRATOR, 'dave')}"})
    assert api_start(admin, vm=vm.name, kind="live").status_code == 201
    assert started.calls[-1] == ((vm, "live"), {"actor": "dave", "point_id": None, "source_lost": False})


def test_an_api_write_through_the_session_needs_the_csrf_token(vm, monkeypatch):
    started = Recorder(failover_like())
    monkeypatch.setattr("replication.services.failover.start_failover", started)
    strict = Client(enforce_csrf_checks=True)
    strict.force_login(user_with_role("erin", ADMINISTRATOR))
    response = strict.post("/api/failovers/", json.dumps({"vm": vm.name, "kind": "test"}),
                           content_type="application/json")
    assert response.status_code == 403 and "CSRF" in response.json()["error"]
    assert not started.calls


# The real actor ------------------------------------------------------------------------------------------

def test_the_vm_history_and_the_admin_log_name_the_user_who_replicated_and_cancelled(vm):
    alice = client_as(OPERATOR, "alice")
    alice.post(f"/vms/{vm.pk}/replicate/", {"sync_type": "full"})
    job = ReplicationJob.objects.get()
    assert VMStateChange.objects.filter(context__vm=vm, to_state=VMState.REPLICATING).get().actor == "alice"
    assert "started by alice" in job.events.first().message
    alice.post(f"/jobs/{job.id}/cancel/")
    job.refresh_from_db()
    assert job.status == JobStatus.CANCELLED and job.error_message == "cancelled by alice"
    assert VMContext.of(vm).changes.last().actor == "alice"
    logged = LogEntry.objects.filter(user__username="alice").order_by("id")
    assert [entry.change_message for entry in logged] == [f"full replication {job.id} started",
                                                          "cancelled from the job page"]
    fail_job(job.id, "boom")
    alice.post(f"/jobs/{job.id}/retry/")
    retried = ReplicationJob.objects.exclude(pk=job.pk).get()
    assert "started by alice" in retried.events.first().message


def test_failovers_from_the_pages_record_the_user(vm, monkeypatch):
    started = Recorder(failover_like())
    monkeypatch.setattr("replication.services.failover.start_failover", started)
    client_as(OPERATOR, "bob").post(f"/vms/{vm.pk}/failover/test/")
    client_as(ADMINISTRATOR, "root-admin").post(f"/vms/{vm.pk}/failover/live/")
    assert [call[1]["actor"] for call in started.calls] == ["bob", "root-admin"]


def test_who_registered_a_vm_is_in_its_history(vm, monkeypatch):
    def register(name, locators, **options):
        return VirtualMachine.objects.create(name=name)

    monkeypatch.setattr("replication.views.sources.register_image_vm", register)
    client_as(ADMINISTRATOR, "frank").post("/sources/", {"step": "image", "name": "vm-new", "disks": "/x.img"})
    (change,) = VMStateChange.objects.filter(context__vm__name="vm-new")
    assert change.actor == "frank" and "registered from the Sources page" in change.reason
    assert LogEntry.objects.get(user__username="frank").object_repr == "vm-new"


def test_a_command_records_the_os_user_as_the_actor(vm):
    call_command("replicate", vm.name, stdout=io.StringIO())
    change = VMStateChange.objects.get(context__vm=vm, to_state=VMState.REPLICATING)
    assert change.actor == f"os:{getpass.getuser()}"


# The admin and the roles command -------------------------------------------------------------------------

def test_only_administrators_enter_the_admin(job):
    for role in (VIEWER, OPERATOR):
        user = user_with_role(f"staff-{role}", role)
        User.objects.filter(pk=user.pk).update(is_staff=True)  # staff alone is not enough
        client = Client()
        client.force_login(user)
        assert client.get("/admin/").status_code == 302
        assert client.get("/admin/replication/replicationjob/").status_code == 302
    admin = client_as(ADMINISTRATOR, "grace")
    assert admin.get("/admin/").status_code == 200
    assert admin.get("/admin/replication/replicationjob/").status_code == 200
    assert admin.get("/admin/auth/user/").status_code == 200
    # The admin's audit log is read, never rewritten, by an administrator.
    assert not User.objects.get(username="grace").has_perm("admin.delete_logentry")


def test_the_roles_command_grants_lists_and_revokes():
    ensure_roles()
    ensure_roles()  # idempotent
    User.objects.create_user("henry")
    out = io.StringIO()
    call_command("roles", "grant", "henry", "operator", stdout=out)
    henry = User.objects.get(username="henry")
    assert role_of(henry) == OPERATOR and not henry.is_staff
    call_command("roles", "grant", "henry", "administrator", stdout=out)
    henry = User.objects.get(username="henry")
    assert role_of(henry) == ADMINISTRATOR and henry.is_staff
    assert list(henry.groups.values_list("name", flat=True)) == ["administrator"]
    listing = io.StringIO()
    call_command("roles", stdout=listing)
    assert "henry" in listing.getvalue() and "administrator" in listing.getvalue()
    call_command("roles", "revoke", "henry", stdout=out)
    henry = User.objects.get(username="henry")
    assert role_of(henry) is None and not henry.is_staff
    with pytest.raises(CommandError, match="no user named"):
        call_command("roles", "grant", "nobody", "viewer")
    with pytest.raises(CommandError):
        call_command("roles", "grant", "henry", "king")


def test_buttons_a_role_may_not_press_are_hidden(vm, job):
    viewer = client_as(VIEWER).get("/vms/").content.decode()
    assert "Replicate web01" not in viewer and "Admin</a>" not in viewer
    assert "Cancel job" not in client_as(VIEWER, "v2").get(f"/jobs/{job.id}/").content.decode()
    operator = client_as(OPERATOR)
    assert "Replicate web01" in operator.get("/vms/").content.decode()
    assert "Cancel job" in operator.get(f"/jobs/{job.id}/").content.decode()
    assert "Add the VM" not in operator.get("/sources/").content.decode()
    assert "Add the VM" in client_as(ADMINISTRATOR).get("/sources/").content.decode()

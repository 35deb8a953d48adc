"""Every action of the pages and the API is in the Django admin's log
(roles.log_admin): a table with one row per action (a URL, and the form's
action or step where one URL does several), each pressed once by a user of
the lowest role that may press it; the log then holds one entry for that
user, on the object acted on, saying what was done.

Every URL of replication/urls.py is either in that table or named below as
a page that changes nothing (a read, or an agent's own call): a new URL
fails here until it is one or the other, and a "read" whose view handles a
POST fails too. One POST is no action: the Sources page's first step of
adding a vCenter (fetch) only shows its certificate; it records nothing,
so it logs nothing (checked below). Services whose real runs are tested elsewhere (failovers,
vCenter logins, the cloud, the broker) are replaced by recorders: a log
entry needs no boot; the rest run for real."""

import inspect
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
from django.contrib.admin.models import ADDITION, CHANGE, DELETION, LogEntry
from django.contrib.contenttypes.models import ContentType
from django.test import Client
from django.urls import URLPattern, resolve, reverse

from replication.models import (
    Agent,
    ApiToken,
    CloudStackConfig,
    FailoverJob,
    NetworkMapping,
    PairingCode,
    ProtectionGroup,
    ReplicationJob,
    VCenter,
    VirtualMachine,
)
from replication.roles import ADMINISTRATOR, OPERATOR
from replication.services import scheduler
from replication.services.inventory import register_image_vm
from replication.services.jobs import start_replication
from replication.urls import urlpatterns
from replication.views import agents, vm_settings
from tests.helpers import MiB, make_image, user_with_role

pytestmark = pytest.mark.django_db

# URLs that change nothing, by name, and why they are no action.
READS = {name: "a page or a JSON read" for name in (
    "dashboard", "dashboard-fragment", "job-detail", "job-fragment", "vm-list", "vm-detail", "failover-detail",
    "failover-fragment", "protection", "api-rpo", "metrics", "cloud", "volume-list", "agent-list", "api-jobs",
    "api-job", "api-failover", "api-vm-points", "api-openapi")}
NOT_USERS = {
    "api-agent-enrol": "an agent host enrolling with its pairing code: no user; in the agent's audit trail",
    "api-agent-credentials": "an agent host fetching its credentials once: no user; in the agent's audit trail",
    "login": "Django's sign-in",
    "logout": "Django's sign-out",
}


@dataclass
class Case:
    """One action (`what`: the form's action or the step, where a URL has
    several): POST `request(ctx)` -> (path, data) as `role`; then one log
    entry for that user on `logged_on(ctx)` -> (model, pk), its message
    matching `message` (a regular expression), with `flag`."""

    url_name: str
    what: str
    role: str
    request: Callable
    logged_on: Callable
    message: str
    flag: int = CHANGE
    setup: Callable = field(default=lambda ctx: None)
    as_json: bool = False

    @property
    def id(self) -> str:
        return f"{self.url_name}:{self.what}"


def on(model, attr):
    return lambda ctx: (model, getattr(ctx, attr).pk)


def newest(model, **filters):
    return lambda ctx: (model, model.objects.filter(**filters).latest("pk").pk)


def failover_like(vm, kind="test", source_lost=False, **ignored):
    """What a failover service returns: the failover's row (as the API writes it out)."""
    return FailoverJob.objects.create(vm=vm, kind=kind, actor="recorder", destination_vm=f"oma-{kind}-{vm.name}",
                                      source_lost=source_lost)


def vm_url(name, **query):
    def url(ctx):
        path = reverse(name, args=[ctx.vm.pk])
        return path + ("?" + "&".join(f"{k}={v}" for k, v in query.items()) if query else "")
    return url


def settings_post(data):
    return lambda ctx: (reverse("vm-settings", args=[ctx.vm.pk]), data)


def map_vm_network(ctx):
    NetworkMapping.objects.create(source_network="VM-Network", destination_network="default")


def standalone_vm(ctx):
    """A VM with no job (its decommissioning runs for real)."""
    ctx.spare = register_image_vm("spare01", [str(make_image(ctx.tmp_path / "spare.img", MiB, [(0, 4096)]))])


def a_group(ctx):
    ctx.group = scheduler.create_group("gold", interval_s=1800)
    scheduler.add_vms(ctx.group, [ctx.vm])


def live_succeeded(ctx):
    ctx.failover = FailoverJob.objects.create(vm=ctx.vm, kind="live", status="succeeded", actor="setup",
                                              destination_vm="oma-live-web01")


def a_token(ctx):
    ctx.token = ApiToken.issue(user_with_role("script-owner", None), "monitoring")[0]


def a_cloud(ctx):
    ctx.config = CloudStackConfig.objects.create(name="cloud1", api_url="https://cloud.example/client/api",
                                                 api_key="k", secret_env="CLOUD_SECRET", zone_id="z",
                                                 disk_offering_id="d", oma_vm_id="oma")


VCENTER_FORM = {"vc-host": "vc.example", "vc-port": "443", "vc-username": "u", "vc-thumbprint": "AA",
                "vc-agent": "local"}
HARDWARE = {"action": "hardware", "hw-firmware": "efi", "hw-secure_boot": "auto", "hw-tpm": "auto",
            "hw-disk_bus": "auto", "hw-scsi_model": "auto", "hw-nic_model": "auto"}
GROUP_FORM = {"name": "silver", "interval_s": "30m", "timezone": "UTC", "max_concurrent": "2", "rpo_target_s": "1h",
              "max_retries": "2", "retry_backoff_s": "60s", "points_hourly_h": "0", "points_daily_d": "0"}

CASES = [
    # Jobs
    Case("job-cancel", "cancel", OPERATOR, lambda ctx: (reverse("job-cancel", args=[ctx.job.id]), {}),
         on(ReplicationJob, "job"), r"^cancelled from the job page$"),
    Case("job-retry", "retry", OPERATOR, lambda ctx: (reverse("job-retry", args=[ctx.job.id]), {}),
         on(ReplicationJob, "job"), r"^retried as job-"),
    Case("job-limit", "limit", OPERATOR, lambda ctx: (reverse("job-limit", args=[ctx.job.id]), {"rate": "8M"}),
         on(ReplicationJob, "job"), r"^bandwidth limit 8\.0 MiB/s per disk$"),
    # A VM's cycle and failovers
    Case("vm-replicate", "replicate", OPERATOR, lambda ctx: (vm_url("vm-replicate")(ctx), {"sync_type": "full"}),
         on(VirtualMachine, "vm"), r"^full replication job-\S+ started$",
         setup=lambda ctx: ReplicationJob.objects.filter(pk=ctx.job.pk).update(status="completed")),
    Case("vm-failover-test", "test failover", OPERATOR, lambda ctx: (vm_url("vm-failover-test")(ctx), {}),
         on(VirtualMachine, "vm"), r"^test failover \d+ started$"),
    Case("vm-failover-end", "end the test", OPERATOR, lambda ctx: (vm_url("vm-failover-end")(ctx), {}),
         on(VirtualMachine, "vm"), r"^test failover \d+ ended$"),
    Case("vm-failover-live", "live failover", ADMINISTRATOR, lambda ctx: (vm_url("vm-failover-live")(ctx), {}),
         on(VirtualMachine, "vm"), r"^live failover \d+ started$"),
    Case("vm-failover-live", "live failover, source lost", ADMINISTRATOR,
         lambda ctx: (vm_url("vm-failover-live")(ctx), {"source_lost": "on", "confirm_source_lost": "on"}),
         on(VirtualMachine, "vm"), r"^live failover \d+ with the source site lost started$"),
    Case("vm-rollback", "rollback", ADMINISTRATOR, lambda ctx: (vm_url("vm-rollback")(ctx), {}),
         on(VirtualMachine, "vm"), r"^rollback failover \d+ started$"),
    Case("vm-failover-commit", "commit", ADMINISTRATOR, lambda ctx: (vm_url("vm-failover-commit")(ctx), {}),
         on(VirtualMachine, "vm"), r"^live failover \d+ committed: no rollback, protection ended$"),
    # A VM's settings page: one URL, a form each
    Case("vm-settings", "boot", ADMINISTRATOR,
         settings_post({"action": "boot", "boot-regex": "login:", "boot-timeout": "90"}),
         on(VirtualMachine, "vm"), r"^boot settings changed: .*regex=login:.*timeout=90"),
    Case("vm-settings", "hardware", ADMINISTRATOR, settings_post(HARDWARE),
         on(VirtualMachine, "vm"), r"^hardware settings changed: firmware=efi"),
    Case("vm-settings", "conversion", ADMINISTRATOR,
         settings_post({"action": "conversion", "conv-convert_guest": "on"}),
         on(VirtualMachine, "vm"), r"^conversion settings changed: convert_guest=True$"),
    Case("vm-settings", "network", ADMINISTRATOR,
         settings_post({"action": "network", "net-source": "VM-Network", "net-destination": "default"}),
         on(VirtualMachine, "vm"), r"^network settings changed: source=VM-Network, destination=default$"),
    Case("vm-settings", "replicate", OPERATOR,
         settings_post({"action": "replicate", "rep-sync_type": "full", "rep-limit": "16M"}),
         on(VirtualMachine, "vm"), r"^full replication job-\S+ started from its settings$",
         setup=lambda ctx: ReplicationJob.objects.filter(pk=ctx.job.pk).update(status="completed")),
    Case("vm-settings", "checksums", OPERATOR, settings_post({"action": "checksums"}),
         on(VirtualMachine, "vm"), r"^checksum comparison 7 started$"),
    Case("vm-unmap-network", "unmap", ADMINISTRATOR, lambda ctx: (vm_url("vm-unmap-network", source="VM-Network")(ctx),
                                                                  {}),
         on(VirtualMachine, "vm"), r"^'VM-Network' no longer mapped$", setup=map_vm_network),
    Case("vm-remove-replicas", "remove replicas", ADMINISTRATOR,
         lambda ctx: (vm_url("vm-remove-replicas")(ctx), {}),
         on(VirtualMachine, "vm"), r"^web01: 1 replica volume\(s\) removed; the next cycle is a full copy$"),
    Case("vm-decommission", "decommission", ADMINISTRATOR,
         lambda ctx: (reverse("vm-decommission", args=[ctx.spare.pk]), {}),
         on(VirtualMachine, "spare"), r"^spare01 decommissioned: 0 replica volume\(s\) removed", setup=standalone_vm),
    # Protection groups
    Case("group-new", "create", ADMINISTRATOR, lambda ctx: (reverse("group-new"), GROUP_FORM),
         newest(ProtectionGroup, name="silver"), r"^created from the pages$", flag=ADDITION),
    Case("group-edit", "schedule", ADMINISTRATOR,
         lambda ctx: (reverse("group-edit", args=[ctx.group.pk]), {**GROUP_FORM, "name": "gold", "interval_s": "",
                                                                   "cron": "0 */4 * * *", "vms": [ctx.vm.pk]}),
         on(ProtectionGroup, "group"), r"^changed from the pages$", setup=a_group),
    Case("group-delete", "delete", ADMINISTRATOR, lambda ctx: (reverse("group-delete", args=[ctx.group.pk]), {}),
         on(ProtectionGroup, "group"), r"^deleted from the pages$", flag=DELETION, setup=a_group),
    Case("group-drill", "drill", OPERATOR, lambda ctx: (reverse("group-drill", args=[ctx.group.pk]), {}),
         on(ProtectionGroup, "group"), r"^drill started from the pages: 1 VM\(s\)$", setup=a_group),
    # Sources and the cloud
    Case("sources", "add", ADMINISTRATOR,
         lambda ctx: (reverse("sources"), {"step": "add", "host": "vc2.example", "port": "443", "thumbprint": "BB",
                                           "name": "vc2", "user": "u", "password": "p"}),
         newest(VCenter, name="vc2"), r"^vCenter added from the Sources page$", flag=ADDITION),
    Case("sources", "image", ADMINISTRATOR,
         lambda ctx: (reverse("sources"), {"step": "image", "name": "img01", "disks": str(ctx.spare_image)}),
         newest(VirtualMachine, name="img01"), r"^VM added from the Sources page$", flag=ADDITION),
    Case("vcenter-inventory", "protect VMs", ADMINISTRATOR,
         lambda ctx: (reverse("vcenter-inventory", args=[ctx.vcenter.pk]), {"vm": ["web01"]}),
         on(VCenter, "vcenter"), r"^VMs protected: web01$"),
    Case("vcenter-edit", "connection", ADMINISTRATOR,
         lambda ctx: (reverse("vcenter-edit", args=[ctx.vcenter.pk]), VCENTER_FORM),
         on(VCenter, "vcenter"), r"^connection changed from the pages$"),
    Case("vcenter-edit", "password", ADMINISTRATOR,
         lambda ctx: (reverse("vcenter-edit", args=[ctx.vcenter.pk]), {"action": "password", "pw-password": "n3w"}),
         on(VCenter, "vcenter"), r"^password rotated from the pages$"),
    Case("vcenter-delete", "delete", ADMINISTRATOR, lambda ctx: (reverse("vcenter-delete", args=[ctx.vcenter.pk]), {}),
         on(VCenter, "vcenter"), r"^deleted from the pages$", flag=DELETION),
    Case("cloud-edit", "record", ADMINISTRATOR,
         lambda ctx: (reverse("cloud-edit"), {"name": "cloud1", "api_url": "https://cloud.example/client/api",
                                              "api_key": "k", "secret_env": "CLOUD_SECRET", "zone_id": "z",
                                              "disk_offering_id": "d", "oma_vm_id": "oma",
                                              "device_dir": "/dev/disk/by-id"}),
         on(CloudStackConfig, "config"), r"^cloud recorded from the pages$", setup=a_cloud),
    Case("cloud-check", "check", ADMINISTRATOR, lambda ctx: (reverse("cloud-check"), {}),
         on(CloudStackConfig, "config"), r"^checked with the cloud from the pages: answered; 1 volume\(s\) differ",
         setup=a_cloud),
    # API tokens
    Case("token-list", "make", ADMINISTRATOR,
         lambda ctx: (reverse("token-list"), {"user": "user-administrator", "name": "backup"}),
         newest(ApiToken, name="backup"), r"^API token backup of user-administrator made from the pages$",
         flag=ADDITION),
    Case("token-revoke", "revoke", ADMINISTRATOR, lambda ctx: (reverse("token-revoke", args=[ctx.token.pk]), {}),
         on(ApiToken, "token"), r"^API token monitoring of script-owner revoked from the pages$", flag=DELETION,
         setup=a_token),
    # Agents
    Case("agent-pairing-code", "make a code", ADMINISTRATOR, lambda ctx: (reverse("agent-pairing-code"), {}),
         newest(PairingCode), r"^pairing code made from the Agents page, valid until \d{4}-", flag=ADDITION),
    *[Case("agent-enrolment", step, ADMINISTRATOR,
           lambda ctx, step=step: (reverse("agent-enrolment", args=["site-a", step]), {}),
           on(Agent, "agent"), rf"^{done} agent site-a: now ")
      for step, done in (("approve", "approved"), ("reject", "rejected"), ("revoke", "revoked"))],
    *[Case("agent-action", action, OPERATOR, lambda ctx, action=action: (reverse("agent-action",
                                                                                 args=["site-a", action]), {}),
           on(Agent, "agent"), rf"^{action} agent site-a: now ")
      for action in ("pause", "resume", "drain")],
    # The JSON API
    Case("api-failovers", "start a test failover", OPERATOR,
         lambda ctx: (reverse("api-failovers"), {"vm": "web01", "kind": "test"}),
         on(VirtualMachine, "vm"), r"^test failover \d+ started through the API$", as_json=True),
    Case("api-failover-commit", "commit", ADMINISTRATOR,
         lambda ctx: (reverse("api-failover-commit", args=[ctx.failover.pk]), {}),
         on(VirtualMachine, "vm"), r"^live failover \d+ committed through the API", setup=live_succeeded,
         as_json=True),
]


class Recorder:
    """A service entry point replaced: counts its calls, returns `value(args, kwargs)`."""

    def __init__(self, value):
        self.value, self.calls = value, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.value(*args, **kwargs)


@pytest.fixture
def ctx(tmp_path, monkeypatch):
    monkeypatch.setattr("replication.services.jobs.enqueue_prepare", lambda *args: None)
    vm = register_image_vm("web01", [str(make_image(tmp_path / "d0.img", 2 * MiB, [(0, MiB)], seed=1))])
    job = start_replication(vm, actor="setup")
    agent = Agent.objects.create(name="site-a")
    vcenter = VCenter.objects.create(name="vc1", host="vc.example", username="u", thumbprint="AA")
    context = SimpleNamespace(vm=vm, job=job, agent=agent, vcenter=vcenter, tmp_path=tmp_path,
                              spare_image=make_image(tmp_path / "img01.img", MiB, [(0, 4096)]))
    agent_state = lambda name, *args, **kwargs: Agent.objects.get(name=name)  # noqa: E731
    replaced = {
        "replication.services.jobs.cancel_job": lambda *a, **k: True,
        "replication.services.jobs.retry_job": lambda *a, **k: job,
        "replication.services.limits.change_limit": lambda *a, **k: SimpleNamespace(label="8.0 MiB/s",
                                                                                    agent_error=""),
        "replication.services.failover.start_failover": failover_like,
        "replication.services.failover.end_test_failover": lambda vm, **k: failover_like(vm),
        "replication.services.failover.start_rollback": lambda vm, **k: failover_like(vm, "rollback"),
        "replication.services.failover.commit_failover": lambda vm, **k: failover_like(vm, "live"),
        "replication.services.checksums.start": lambda *a, **k: SimpleNamespace(pk=7),
        "replication.services.network_maps.get_destination": lambda: SimpleNamespace(has_network=lambda n: True),
        "replication.views.vm_settings.remove_vm_replicas": lambda vm, **k: ["disk-2000"],
        "replication.services.sources.add_vcenter": lambda name, host, *a: VCenter.objects.create(
            name=name, host=host, username="u", thumbprint="BB"),
        "replication.services.sources.certificate_thumbprint": lambda host, port: "CC:DD",
        "replication.services.sources.update_vcenter": lambda vcenter, **k: vcenter,
        "replication.services.sources.rotate_password": lambda vcenter, password: vcenter,
        "replication.services.vmware.discover": lambda vcenter, names, **k: [vm],
        "replication.platforms.cloudstack.config.register_cloud": lambda name, **k: (
            CloudStackConfig.objects.get(name=name), ["zone z"]),
        "replication.views.sources.CloudClient": lambda config, **k: SimpleNamespace(check=lambda: ["zone z"]),
        "replication.views.sources.drift": lambda config: {"unknown": [{"id": "v9"}], "gone": [], "elsewhere": [],
                                                           "in_step": 0},
        "replication.services.enrolment.approve": agent_state,
        "replication.services.enrolment.reject": agent_state,
        "replication.services.enrolment.revoke": agent_state,
        "replication.services.agents.change_state": agent_state,
    }
    context.recorders = {}
    for target, value in replaced.items():
        context.recorders[target] = Recorder(value)
        monkeypatch.setattr(target, context.recorders[target])
    return context


def url_names() -> set[str]:
    return {pattern.name for pattern in urlpatterns if isinstance(pattern, URLPattern)}


def test_every_url_is_an_action_logged_in_the_table_or_a_page_that_changes_nothing():
    actions = {case.url_name for case in CASES}
    assert len({case.id for case in CASES}) == len(CASES), "a case is in the table twice"
    assert not actions & set(READS), "an action named a read"
    missing = url_names() - actions - set(READS) - set(NOT_USERS)
    assert not missing, (f"URL(s) {sorted(missing)} are neither in CASES (an action, and its log entry) nor in "
                         "READS / NOT_USERS (changing nothing): add each where it belongs")
    assert not (actions | set(READS) | set(NOT_USERS)) - url_names(), "the table names a URL that is gone"
    # A URL doing several actions (a form's action, a step in its path): each has its case.
    for url_name, declared in (("vm-settings", vm_settings.ACTIONS), ("agent-action", agents.ACTIONS),
                               ("agent-enrolment", agents.ENROLMENT_STEPS)):
        covered = {case.what for case in CASES if case.url_name == url_name}
        assert covered == set(declared), f"{url_name}: cases for {sorted(covered)}, actions {sorted(declared)}"
    # A "read" handles no POST: its view (decorators included) never says POST.
    views = {pattern.name: pattern.callback for pattern in urlpatterns}
    posting = [name for name in READS if "POST" in inspect.getsource(inspect.unwrap(views[name]))]
    assert not posting, f"{posting} handle a POST: they are actions, each needs its row in CASES"


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_each_action_logs_to_the_admin_log_under_its_user(ctx, case):
    case.setup(ctx)
    user = user_with_role(f"user-{case.role}", case.role)
    client = Client()
    client.force_login(user)
    path, data = case.request(ctx)
    assert resolve(path.split("?")[0]).url_name == case.url_name, f"{case.id} posts to {path}"
    before = LogEntry.objects.count()
    if case.as_json:
        response = client.post(path, json.dumps(data), content_type="application/json")
    else:
        response = client.post(path, data)
    assert response.status_code in (200, 201, 302), (response.status_code, response.content.decode()[:2000])
    assert LogEntry.objects.count() == before + 1, f"{case.id} logged {LogEntry.objects.count() - before} entries"
    entry = LogEntry.objects.latest("pk")
    model, pk = case.logged_on(ctx)
    assert entry.user == user
    assert (entry.content_type, entry.object_id) == (ContentType.objects.get_for_model(model), str(pk))
    assert entry.action_flag == case.flag
    assert re.search(case.message, entry.change_message), entry.change_message
    assert entry.object_repr, "the entry names the object"


def test_fetching_a_vcenters_certificate_records_nothing_and_logs_nothing(ctx):
    client = Client()
    client.force_login(user_with_role("user-administrator", ADMINISTRATOR))
    response = client.post(reverse("sources"), {"step": "fetch", "host": "vc3.example", "port": "443"})
    assert response.status_code == 200 and "CC:DD" in response.content.decode()
    assert not VCenter.objects.filter(host="vc3.example").exists()
    assert not LogEntry.objects.exists()

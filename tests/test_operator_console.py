"""The operator console's forms through Django's test client: each form
valid, invalid (the service's reason beside the field, nothing stored) and
refused to a role below the one it needs."""

import html as html_module
import re

import pytest
from django.test import Client
from django.urls import reverse

from replication.choices import VMState
from replication.models import ReplicationJob, VMContext
from replication.services.inventory import register_image_vm
from tests.helpers import MiB, make_image, user_with_role

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def no_broker(monkeypatch):
    monkeypatch.setattr("replication.services.jobs.enqueue_prepare", lambda *args: None)


@pytest.fixture
def vm(tmp_path):
    image = make_image(tmp_path / "d.img", 2 * MiB, [(0, MiB)])
    return register_image_vm("web01", [str(image)])


def client_as(role: str) -> Client:
    from django.contrib.auth.models import User

    client = Client()
    client.force_login(User.objects.filter(username=role).first() or user_with_role(role, role))
    return client


@pytest.fixture
def admin():
    return client_as("administrator")


def feedback(response, field: str) -> str:
    """The text of the .invalid-feedback beside a field (data-error=its html name)."""
    html = response.content.decode()
    found = re.findall(rf'<div class="invalid-feedback[^"]*" data-error="{re.escape(field)}">([^<]*)</div>', html)
    assert found, f"no error beside {field} in the page"
    return html_module.unescape(" ".join(found))


def settings_url(vm):
    return reverse("vm-settings", args=[vm.pk])


def test_the_settings_page_shows_each_form(admin, vm):
    response = admin.get(settings_url(vm))
    assert response.status_code == 200
    for form in ("boot", "hardware", "conversion", "network", "replicate"):
        assert f'data-form="{form}"' in response.content.decode()
    assert "<h1>Settings of web01</h1>" in response.content.decode()


def test_boot_check_valid_invalid_and_refused(admin, vm):
    url = settings_url(vm)
    response = admin.post(url, {"action": "boot", "boot-probes": ["screen", "network"], "boot-regex": r"login:\s",
                                "boot-timeout": "300"})
    assert response.status_code == 302
    context = VMContext.of(vm)
    assert (context.boot_probes, context.boot_check_regex, context.boot_check_timeout_s) == (
        "screen,network", r"login:\s", 300)

    response = admin.post(url, {"action": "boot", "boot-probes": ["console"], "boot-regex": "(",
                                "boot-timeout": "5000"})
    assert response.status_code == 400
    assert "is not a regular expression" in feedback(response, "boot-regex")
    assert "must be 1..3600 seconds, not 5000" in feedback(response, "boot-timeout")
    assert 'is-invalid" id="id_boot-regex"' in response.content.decode() or "is-invalid" in response.content.decode()
    context.refresh_from_db()
    assert (context.boot_probes, context.boot_check_timeout_s) == ("screen,network", 300), "nothing half-set"

    response = client_as("operator").post(url, {"action": "boot", "boot-regex": "", "boot-timeout": "60"})
    assert response.status_code == 403 and "This needs the administrator role" in response.content.decode()
    context.refresh_from_db()
    assert context.boot_check_timeout_s == 300


def test_boot_check_empty_probes_set_the_default_back(admin, vm):
    VMContext.objects.filter(vm=vm).update(boot_probes="agent")
    admin.post(settings_url(vm), {"action": "boot", "boot-regex": "", "boot-timeout": "120"})
    assert VMContext.of(vm).boot_probes == ""


def test_hardware_valid_invalid_and_refused(admin, vm):
    url = settings_url(vm)
    base = {"action": "hardware", "hw-firmware": "efi", "hw-secure_boot": "on", "hw-tpm": "auto",
            "hw-disk_bus": "sata", "hw-scsi_model": "auto", "hw-nic_model": "e1000e"}
    assert admin.post(url, base).status_code == 302
    assert VMContext.of(vm).hardware == {"firmware": "efi", "secure_boot": True, "disk_bus": "sata",
                                         "nic_model": "e1000e"}

    response = admin.post(url, {**base, "hw-firmware": "bios"})
    assert response.status_code == 400
    assert "Secure Boot needs UEFI firmware" in feedback(response, "hw-secure_boot")
    response = admin.post(url, {**base, "hw-nic_model": "ne2000"})
    assert "nic model must be one of virtio" in feedback(response, "hw-nic_model")
    assert VMContext.of(vm).hardware["firmware"] == "efi", "nothing stored from a refused form"

    response = client_as("viewer").post(url, {**base, "hw-firmware": "auto", "hw-secure_boot": "auto"})
    assert response.status_code == 403
    assert VMContext.of(vm).hardware["firmware"] == "efi"


def test_guest_conversion_on_off_and_refused(admin, vm):
    url = settings_url(vm)
    assert admin.post(url, {"action": "conversion", "conv-convert_guest": "on"}).status_code == 302
    assert VMContext.of(vm).convert_guest is True
    assert client_as("operator").post(url, {"action": "conversion"}).status_code == 403
    assert VMContext.of(vm).convert_guest is True
    assert admin.post(url, {"action": "conversion"}).status_code == 302
    assert VMContext.of(vm).convert_guest is False


def test_network_map_valid_invalid_and_refused(admin, vm, monkeypatch):
    from replication.models import NetworkMapping

    class Destination:
        def has_network(self, name):
            return name == "prod-net"

    monkeypatch.setattr("replication.services.network_maps.get_destination", lambda: Destination())
    url = settings_url(vm)
    response = admin.post(url, {"action": "network", "net-source": "VM Network", "net-destination": "nowhere"})
    assert response.status_code == 400
    assert "the destination has no network named 'nowhere'" in feedback(response, "net-destination")
    assert not NetworkMapping.objects.exists()
    response = admin.post(url, {"action": "network", "net-source": "", "net-destination": "prod-net"})
    assert "This field is required." in feedback(response, "net-source")
    assert admin.post(url, {"action": "network", "net-source": "VM Network",
                            "net-destination": "prod-net"}).status_code == 302
    assert NetworkMapping.as_dict() == {"VM Network": "prod-net"}
    assert client_as("operator").post(url, {"action": "network", "net-source": "x",
                                            "net-destination": "prod-net"}).status_code == 403
    assert NetworkMapping.as_dict() == {"VM Network": "prod-net"}


def test_network_map_removal_asks_first_is_refused_below_administrator_and_names_an_unknown_one(admin, vm):
    from replication.models import NetworkMapping, VirtualMachine

    VirtualMachine.objects.filter(pk=vm.pk).update(nics=[{"mac": "00:50:56:00:00:01", "network": "VM Network"}])
    NetworkMapping.objects.create(source_network="VM Network", destination_network="prod-net")
    NetworkMapping.objects.create(source_network="Backup", destination_network="backup-net")
    settings_page = admin.get(settings_url(vm)).content.decode()
    url = reverse("vm-unmap-network", args=[vm.pk])
    assert f'href="{url}?source=VM%20Network"' in settings_page and f'href="{url}?source=Backup"' in settings_page

    page = html_module.unescape(admin.get(url, {"source": "VM Network"}).content.decode())
    assert "Remove the mapping of network VM Network?" in page
    assert "remove the mapping VM Network -> prod-net for every VM" in page
    assert "refuse a live failover of the 1 VM(s) with a NIC on VM Network (web01) until it is mapped again" in page
    assert "no VM recorded has a NIC on Backup" in html_module.unescape(
        admin.get(url, {"source": "Backup"}).content.decode())
    assert NetworkMapping.objects.count() == 2, "asking removes nothing"

    response = client_as("operator").post(f"{url}?source=VM%20Network")
    assert response.status_code == 403 and "This needs the administrator role" in response.content.decode()
    assert NetworkMapping.as_dict() == {"Backup": "backup-net", "VM Network": "prod-net"}

    response = admin.post(f"{url}?source=Nowhere")
    assert response.status_code == 409
    assert "source network 'Nowhere' is not mapped" in html_module.unescape(response.content.decode())
    assert "source network &#x27;Nowhere&#x27; is not mapped" in admin.get(url, {"source": "Nowhere"}).content.decode()
    response = admin.post(url)
    assert response.status_code == 409 and "give the source network whose mapping goes" in response.content.decode()
    assert NetworkMapping.objects.count() == 2, "a refused removal leaves every mapping"

    response = admin.post(f"{url}?source=VM%20Network")
    assert response.status_code == 302 and response["Location"] == settings_url(vm)
    assert NetworkMapping.as_dict() == {"Backup": "backup-net"}
    assert "&#x27;VM Network&#x27; no longer mapped" in admin.get(settings_url(vm)).content.decode()
    response = admin.post(f"{url}?source=VM%20Network")
    assert response.status_code == 409 and NetworkMapping.as_dict() == {"Backup": "backup-net"}


def test_start_a_cycle_with_a_limit_valid_invalid_and_refused(vm):
    url = settings_url(vm)
    response = client_as("viewer").post(url, {"action": "replicate", "rep-sync_type": "full", "rep-limit": "50M"})
    assert response.status_code == 403 and not ReplicationJob.objects.exists()
    operator = client_as("operator")
    response = operator.post(url, {"action": "replicate", "rep-sync_type": "full", "rep-limit": "fast"})
    assert response.status_code == 400
    assert "'fast' is not a rate such as 50M" in feedback(response, "rep-limit")
    response = operator.post(url, {"action": "replicate", "rep-sync_type": "incremental", "rep-limit": ""})
    assert response.status_code == 400 and "only a full copy is possible" in response.content.decode()
    assert not ReplicationJob.objects.exists()
    response = operator.post(url, {"action": "replicate", "rep-sync_type": "full", "rep-limit": "50MiB/s"})
    job = ReplicationJob.objects.get()
    assert response.status_code == 302 and response["Location"] == reverse("job-detail", args=[job.id])
    assert job.bandwidth_limit_bps == 50 * MiB


def test_checksums_start_a_run_and_are_refused_to_a_viewer(vm, monkeypatch, django_capture_on_commit_callbacks):
    published = []
    monkeypatch.setattr("replication.dispatch.publish", lambda name, args=(), **kw: published.append((name, args)))
    url = settings_url(vm)
    assert client_as("viewer").post(url, {"action": "checksums"}).status_code == 403
    assert not vm.checksum_runs.exists()
    with django_capture_on_commit_callbacks(execute=True):
        assert client_as("operator").post(url, {"action": "checksums"}).status_code == 302
    run = vm.checksum_runs.get()
    assert published == [("replication.compare_checksums", [run.pk])]
    assert run.status == "running" and run.actor == "operator"


def test_decommission_asks_first_and_is_refused_below_administrator(admin, vm):
    url = reverse("vm-decommission", args=[vm.pk])
    assert 'data-vm="web01"' in admin.get(reverse("vm-list")).content.decode()
    page = admin.get(url).content.decode()
    assert "Decommission web01?" in page
    assert "hide it from the VM list" in page and "keep its jobs, failovers" in page
    assert VMContext.of(vm).state == VMState.DISCOVERED, "asking changes nothing"
    response = client_as("operator").post(url)
    assert response.status_code == 403 and VMContext.of(vm).state == VMState.DISCOVERED
    assert admin.post(url).status_code == 302
    assert VMContext.of(vm).state == VMState.DECOMMISSIONED
    admin.get(reverse("vm-settings", args=[vm.pk]))  # the message shown once
    assert "web01" not in admin.get(reverse("vm-list")).content.decode()
    assert 'data-vm="web01"' in admin.get(reverse("vm-list") + "?state=decommissioned").content.decode()
    response = admin.post(url)
    assert response.status_code == 409 and "already decommissioned" in response.content.decode()


def test_decommission_is_refused_with_the_reason_while_a_cycle_runs(admin, vm):
    from replication.services.jobs import start_replication

    job = start_replication(vm)
    response = admin.get(reverse("vm-decommission", args=[vm.pk]))
    assert "cannot be decommissioned: a replication cycle is running" in response.content.decode()
    response = admin.post(reverse("vm-decommission", args=[vm.pk]))
    assert response.status_code == 409
    assert VMContext.of(vm).state == VMState.REPLICATING and job.disks.get().target_volume is not None


def group_data(**changes):
    data = {"name": "web", "description": "", "interval_s": "30m", "cron": "", "timezone": "UTC",
            "max_concurrent": "2", "rpo_target_s": "1h", "max_retries": "2", "retry_backoff_s": "60s",
            "drill_interval_s": "", "points_keep": "", "points_hourly_h": "0", "points_daily_d": "0"}
    data.update(changes)
    return data


def test_group_create_valid_invalid_and_refused(admin, vm):
    from replication.models import ProtectionGroup

    url = reverse("group-new")
    response = client_as("operator").post(url, group_data())
    assert response.status_code == 403 and not ProtectionGroup.objects.exists()

    response = admin.post(url, group_data(rpo_target_s="soon", cron="0 */4 * *", interval_s=""))
    assert response.status_code == 400
    assert "'soon' is not a duration such as 90s, 15m, 2h or 1d" in feedback(response, "rpo_target_s")
    response = admin.post(url, group_data(cron="0 */4 * *", interval_s="", vms=[vm.pk]))
    assert "needs 5 fields" in feedback(response, "cron")
    response = admin.post(url, group_data(max_concurrent="0"))
    assert "the concurrency limit must be at least 1" in feedback(response, "max_concurrent")
    response = admin.post(url, group_data(cron="0 * * * *"))
    assert "give either an interval or a cron expression" in feedback(response, "interval_s")
    assert not ProtectionGroup.objects.exists(), "a refused form stores no group"
    from django_celery_beat.models import PeriodicTask
    assert not PeriodicTask.objects.exists()

    response = admin.post(url, group_data(vms=[vm.pk], drill_interval_s="1d"))
    assert response.status_code == 302
    group = ProtectionGroup.objects.get()
    assert (group.interval_s, group.rpo_target_s, group.drill_interval_s) == (1800, 3600, 86400)
    assert list(group.vms.values_list("name", flat=True)) == ["web01"]
    assert group.periodic_task.enabled and group.drill_task is not None
    response = admin.post(url, group_data())
    assert "a group named web exists already" in feedback(response, "name")


def test_group_edit_members_schedule_and_delete(admin, vm, tmp_path):
    from replication.models import ProtectionGroup
    from replication.services import scheduler

    other = register_image_vm("db01", [str(make_image(tmp_path / "o.img", MiB, [(0, 4096)]))])
    group = scheduler.create_group("web")
    scheduler.add_vms(group, [vm])
    url = reverse("group-edit", args=[group.pk])
    assert client_as("operator").post(url, group_data(vms=[other.pk])).status_code == 403
    response = admin.post(url, group_data(vms=[other.pk], interval_s="", cron="0 */4 * * *", paused="on"))
    assert response.status_code == 302
    group.refresh_from_db()
    assert (group.cron, group.interval_s, group.paused) == ("0 */4 * * *", None, True)
    assert list(group.vms.values_list("name", flat=True)) == ["db01"]
    assert not group.periodic_task.enabled

    response = admin.post(url, group_data(vms=[vm.pk], max_retries="5000"))
    assert "the retry count must be between 0 and 1000, not 5000" in feedback(response, "max_retries")
    group.refresh_from_db()
    assert group.max_retries == 2 and list(group.vms.values_list("name", flat=True)) == ["db01"]

    delete = reverse("group-delete", args=[group.pk])
    page = admin.get(delete).content.decode()
    assert "Delete group web?" in page and "leave its VMs (db01) in no group" in page
    assert client_as("operator").post(delete).status_code == 403
    assert admin.post(delete).status_code == 302
    assert not ProtectionGroup.objects.exists()
    other.refresh_from_db()
    assert other.group is None


def test_a_drill_now_needs_the_operator_role_and_says_why_it_cannot_run(vm):
    from replication.services import scheduler

    group = scheduler.create_group("empty")
    url = reverse("group-drill", args=[group.pk])
    assert client_as("viewer").post(url).status_code == 403
    response = client_as("operator").post(url, follow=True)
    assert "group empty has no VMs" in response.content.decode()


def test_api_tokens_made_shown_once_used_and_revoked(admin):
    from replication.models import ApiToken

    url = reverse("token-list")
    assert client_as("operator").post(url, {"user": "operator", "name": "x"}).status_code == 403
    response = admin.post(url, {"user": "nobody", "name": "monitoring"})
    assert response.status_code == 400 and feedback(response, "user")
    response = admin.post(url, {"user": "administrator", "name": "bad\x07name"})
    assert response.status_code == 400 and feedback(response, "name")
    assert not ApiToken.objects.exists()

    response = admin.post(url, {"user": "administrator", "name": "monitoring"})
    assert response.status_code == 200 and response["Cache-Control"] == "no-store"
    key = re.search(r"<code[^>]*data-key>([^<]+)</code>", response.content.decode()).group(1)
    token = ApiToken.objects.get()
    assert token.key_sha256 == ApiToken.digest(key) and key not in admin.get(url).content.decode(), "shown once"
    assert Client().get(reverse("api-jobs"), HTTP_AUTHORIZATION=f"Bearer {key}").status_code == 200

    revoke = reverse("token-revoke", args=[token.pk])
    assert "Revoke token monitoring of administrator?" in admin.get(revoke).content.decode()
    assert client_as("operator").post(revoke).status_code == 403 and ApiToken.objects.exists()
    assert admin.post(revoke).status_code == 302 and not ApiToken.objects.exists()
    assert Client().get(reverse("api-jobs"), HTTP_AUTHORIZATION=f"Bearer {key}").status_code == 401


def test_remove_replicas_asks_first_and_needs_the_administrator_role(admin, vm, tmp_path):
    from replication.services import jobs

    job = start_replication_completed(vm, tmp_path / "replica.img")
    volume = job.disks.get().target_volume
    url = reverse("vm-remove-replicas", args=[vm.pk])
    page = admin.get(url).content.decode()
    assert "Remove the replicas of web01?" in page and "the next cycle copies every disk in full" in page
    assert volume.path in page
    assert client_as("operator").post(url).status_code == 403
    volume.refresh_from_db()
    assert volume.retired_at is None
    assert admin.post(url).status_code == 302
    volume.refresh_from_db()
    assert volume.retired_at is not None and volume.source_disk is None
    assert "has no replica volumes" in admin.get(url).content.decode()
    assert jobs.ReplicationJob.objects.filter(pk=job.pk).exists()


def start_replication_completed(vm, replica):
    """A cycle whose replica is a file, completed without a worker (the view tests queue nothing)."""
    from replication.choices import JobStatus
    from replication.models import TargetVolume
    from replication.services import jobs

    job = jobs.start_replication(vm)
    assert job.enter_stage("Initializing", JobStatus.PREPARING)
    assert job.enter_stage("Transfer", JobStatus.REPLICATING)
    disk = job.disks.get()
    replica.write_bytes(b"\0" * MiB)
    TargetVolume.objects.filter(pk=disk.target_volume_id).update(path=str(replica))
    assert disk.start_attempt("t") and disk.complete(bytes_total=1, bytes_zeroed=0, throughput_bps=1)
    assert job.transition(JobStatus.FINALIZING)
    jobs.commit_and_complete(job)
    return job

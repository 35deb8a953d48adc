"""Sources by allow-list, secrets by reference, timeouts on probes: what a
user may register as a disk (command, Sources page, admin), re-checked when
a job builds its order; where a vCenter's password may come from; a source
or vCenter that never answers gives an error within the timeout."""

import os
import socket
import threading
import time
from io import StringIO
from pathlib import Path

import pytest
from django.conf import settings
from django.contrib.auth.models import User
from django.core.management import CommandError, call_command
from django.test import Client, override_settings
from django.urls import reverse

from replication.choices import JobStatus
from replication.models import ReplicationJob, VCenter, VirtualMachine
from replication.services import jobs
from replication.services import vmware as vmware_service
from replication.services.inventory import register_image_vm
from tests.helpers import MiB, NbdkitProcess, make_image, user_with_role

pytestmark = [pytest.mark.integration, pytest.mark.django_db]


@pytest.fixture
def hanging_server():
    """A TCP listener on 127.0.0.1 that accepts and never says a word (as an
    HTTP server does to an NBD or TLS client): its port."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    accepted, stop = [], threading.Event()

    def accept():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join(5)
    for conn in accepted:
        conn.close()
    listener.close()


def forbidden_disks(tmp_path: Path) -> dict[str, tuple[str, str]]:
    """name -> (locator, the reason's words) of disks no user may register."""
    link = tmp_path / "innocent.img"
    link.symlink_to("/etc/shadow")
    fifo = tmp_path / "pipe.img"
    os.mkfifo(fifo)
    volume = Path(settings.OMA_VOLUME_DIR) / "migration-vol-of-another-vm.img"
    make_image(volume, MiB, [(0, 4096)])
    escape = str(tmp_path) + "/.." * len(tmp_path.parts) + "/etc/passwd"
    export_socket = Path(settings.OMA_RUN_DIR) / "export.sock"
    return {
        "shadow": ("/etc/shadow", "not inside a directory of IMAGE_SOURCE_DIRS"),
        "symlink": (str(link), "(it leads to /etc/shadow) is not inside a directory of IMAGE_SOURCE_DIRS"),
        "proc": ("/proc/self/environ", "not inside a directory of IMAGE_SOURCE_DIRS"),
        "dotdot": (escape, "(it leads to /etc/passwd) is not inside"),
        "fifo": (str(fifo), "neither a regular file nor a block device"),
        "volume": (str(volume), "inside the OMA's own OMA_VOLUME_DIR"),
        "export": (f"nbd+unix:///migration-vol-x?socket={export_socket}", "inside the OMA's own OMA_RUN_DIR"),
        "nbd-host": ("nbd://10.9.8.7:10809/disk", "NBD_SOURCE_HOSTS names no server"),
    }


DISK_NAMES = ["shadow", "symlink", "proc", "dotdot", "fifo", "volume", "export", "nbd-host"]


@pytest.mark.parametrize("which", DISK_NAMES)
def test_add_vm_refuses_what_is_not_an_allowed_source(which, tmp_path):
    locator, reason = forbidden_disks(tmp_path)[which]
    with pytest.raises(CommandError) as caught:
        call_command("add_vm", "stolen", "--disk", locator, stdout=StringIO())
    assert reason in str(caught.value)
    assert not VirtualMachine.objects.exists()


@pytest.mark.parametrize("which", DISK_NAMES)
def test_the_sources_page_refuses_what_is_not_an_allowed_source(which, tmp_path):
    locator, reason = forbidden_disks(tmp_path)[which]
    client = Client()
    client.force_login(user_with_role("someone", "administrator"))
    page = client.post(reverse("sources"), {"step": "image", "name": "stolen", "disks": locator})
    assert page.status_code == 200
    assert reason in page.content.decode().replace("&#x27;", "'")
    assert not VirtualMachine.objects.exists()


@pytest.mark.parametrize("which", DISK_NAMES)
def test_the_admin_disk_form_refuses_what_is_not_an_allowed_source(which, tmp_path):
    from replication.admin import SourceDiskForm

    locator, reason = forbidden_disks(tmp_path)[which]
    form = SourceDiskForm(data={"locator": locator})
    assert not form.is_valid()
    assert reason in " ".join(form.errors["locator"])


def test_an_allowed_image_registers(tmp_path):
    image = make_image(tmp_path / "good.img", 2 * MiB, [(0, MiB)])
    vm = register_image_vm("good", [str(image)])
    assert vm.disks.get().capacity_bytes == 2 * MiB


def test_image_sources_are_refused_until_a_directory_is_configured(tmp_path):
    image = make_image(tmp_path / "good.img", MiB, [(0, 4096)])
    with override_settings(IMAGE_SOURCE_DIRS=[]), pytest.raises(CommandError, match="IMAGE_SOURCE_DIRS names no"):
        call_command("add_vm", "vm", "--disk", str(image), stdout=StringIO())


def test_the_var_directory_is_never_a_source_even_under_an_allowed_parent():
    token = Path(settings.VAR_DIR) / "allowlist-test-token"
    token.write_text("secret")
    try:
        with override_settings(IMAGE_SOURCE_DIRS=[str(settings.BASE_DIR)]):
            with pytest.raises(CommandError, match="inside the OMA's var directory"):
                call_command("add_vm", "vm", "--disk", str(token), stdout=StringIO())
    finally:
        token.unlink()


def test_nbd_sources_only_from_allowed_hosts_and_never_the_oma_export(sockdir, tmp_path):
    with override_settings(NBD_SOURCE_HOSTS=["nbd.example.com:10809"]):
        with pytest.raises(CommandError, match=r"127.0.0.1:10809 is not in NBD_SOURCE_HOSTS"):
            call_command("add_vm", "vm", "--disk", "nbd://127.0.0.1/x", stdout=StringIO())
    with override_settings(NBD_SOURCE_HOSTS=["127.0.0.1"], OMA_EXPORT_LISTEN="127.0.0.1:10811"):
        with pytest.raises(CommandError, match="the OMA's own export server"):
            call_command("add_vm", "vm", "--disk", "nbd://127.0.0.1:10811/migration-vol-1", stdout=StringIO())
    with pytest.raises(CommandError, match="takes no tls-certificates parameter"):
        call_command("add_vm", "vm", "--disk", f"nbds+unix:///?socket={sockdir}/s&tls-certificates=/etc",
                     stdout=StringIO())
    # A socket in an allowed directory still is a source.
    image = make_image(tmp_path / "src.img", MiB, [(0, 4096)])
    server = NbdkitProcess(sockdir, "--readonly", "file", str(image))
    try:
        call_command("add_vm", "nbd-ok", "--disk", server.uri, stdout=StringIO())
    finally:
        server.stop()
    assert VirtualMachine.objects.get(name="nbd-ok").disks.get().capacity_bytes == MiB


@pytest.mark.django_db(transaction=True)
def test_a_source_swapped_for_a_symlink_after_registration_fails_its_job(tmp_path, monkeypatch):
    monkeypatch.setattr("replication.services.jobs.enqueue_prepare", lambda *args: None)
    sent = []
    monkeypatch.setattr("replication.dispatch.publish", lambda task_name, args, **kwargs: sent.append(task_name))
    monkeypatch.setattr("replication.services.jobs.orders.request_stop", lambda job, reason: False)
    image = make_image(tmp_path / "swapped.img", MiB, [(0, 4096)])
    vm = register_image_vm("swapped", [str(image)])
    job = jobs.start_replication(vm)
    image.unlink()
    image.symlink_to("/etc/passwd")
    jobs.prepare_job(job.id)
    job = ReplicationJob.objects.get(pk=job.id)
    assert "vma.copy_disk" not in sent
    assert job.status == JobStatus.FAILED
    assert "the copy of disk-2000 refused" in job.error_message
    assert "(it leads to /etc/passwd) is not inside a directory of IMAGE_SOURCE_DIRS" in job.error_message


def test_a_copy_order_carries_the_real_path_it_checked(tmp_path, monkeypatch):
    from replication.services import orders

    monkeypatch.setattr("replication.services.jobs.enqueue_prepare", lambda *args: None)
    image = make_image(tmp_path / "real.img", MiB, [(0, 4096)])
    link = tmp_path / "link.img"
    link.symlink_to(image)
    job = jobs.start_replication(register_image_vm("linked", [str(link)]))
    assert orders.copy_order(job.disks.get()).source_locator == str(image)


def test_a_hanging_nbd_source_is_an_error_within_the_timeout(hanging_server):
    uri = f"nbd://127.0.0.1:{hanging_server}/x"
    started = time.monotonic()
    with override_settings(NBD_SOURCE_HOSTS=[f"127.0.0.1:{hanging_server}"], PROBE_TIMEOUT_S=1.0):
        with pytest.raises(CommandError, match=r"did not answer .* within 1 s \(PROBE_TIMEOUT_S\)"):
            call_command("add_vm", "hangs", "--disk", uri, stdout=StringIO())
        client = Client()
        client.force_login(user_with_role("someone", "administrator"))
        page = client.post(reverse("sources"), {"step": "image", "name": "hangs", "disks": uri})
    assert "within 1 s (PROBE_TIMEOUT_S)" in page.content.decode()
    assert time.monotonic() - started < 8
    assert not VirtualMachine.objects.exists()


# vCenters ---------------------------------------------------------------------

def test_a_vcenter_password_reference_must_stay_in_the_secrets_dir_or_an_allowed_variable(tmp_path):
    outside = tmp_path / "pw"
    outside.write_text("x")
    args = ["add_vcenter", "vcx", "--host", "127.0.0.1", "--user", "u", "--thumbprint", "AB" * 20, "--no-check"]
    for secret, reason in [(["--password-file", str(outside)], "is not inside OMA_SECRETS_DIR"),
                           (["--password-file", os.path.join(settings.OMA_SECRETS_DIR, "..", "..", "..", "etc",
                                                             "passwd")], "is not inside OMA_SECRETS_DIR"),
                           (["--password-env", "VMA_TOKEN"], "may not hold a vCenter password")]:
        with pytest.raises(CommandError, match=reason):
            call_command(*args, *secret, stdout=StringIO())
    assert not VCenter.objects.exists()
    call_command(*args, "--password-env", "VCENTER_PASSWORD_VCX", stdout=StringIO())
    assert VCenter.objects.get(name="vcx").password_env == "VCENTER_PASSWORD_VCX"


def test_a_cloud_secret_reference_must_stay_in_the_secrets_dir_or_an_allowed_variable(tmp_path, monkeypatch):
    from replication.models import CloudError, CloudStackConfig
    from replication.platforms.cloudstack.config import register_cloud

    outside = tmp_path / "cloud-secret"
    outside.write_text("x")
    fields = {"api_url": "https://cloud.example/client/api", "api_key": "k", "zone_id": "z"}
    for secret, reason in [({"secret_file": str(outside)}, "is not inside OMA_SECRETS_DIR"),
                           ({"secret_env": "VMA_TOKEN"}, "may not hold a CloudStack secret key")]:
        with pytest.raises(CloudError, match=reason):
            register_cloud("cloudx", check=False, **fields, **secret)
    assert not CloudStackConfig.objects.exists()
    # A record edited behind the checks is refused where the secret is read.
    monkeypatch.setenv("VMA_TOKEN", "the-agent-token")
    edited = CloudStackConfig.objects.create(name="cloud-edited", secret_env="VMA_TOKEN", **fields)
    with pytest.raises(CloudError, match="may not hold a CloudStack secret key"):
        edited.secret()


def test_a_record_edited_behind_the_checks_is_not_read(monkeypatch):
    monkeypatch.setenv("VMA_TOKEN", "the-agent-token")
    vcenter = VCenter.objects.create(name="vc-edited", host="attacker.example", username="u",
                                     password_env="VMA_TOKEN", thumbprint="AB" * 20)
    with pytest.raises(vmware_service.VCenterConfigError, match="may not hold a vCenter password"):
        vmware_service.read_password(vcenter)


@pytest.fixture
def admin_client():
    client = Client()
    client.force_login(User.objects.create_superuser("admin", password="s3cret-pass"))
    return client


def test_the_admin_refuses_a_host_change_without_the_password(admin_client):
    secret = Path(settings.OMA_SECRETS_DIR) / "vcenter-vc-admin.password"
    secret.write_text("the-real-password")
    vcenter = VCenter.objects.create(name="vc-admin", host="vc.example.com", username="u",
                                     password_file=str(secret), thumbprint="AB:" * 19 + "AB")
    url = reverse("admin:replication_vcenter_change", args=[vcenter.pk])
    page = admin_client.get(url)
    assert 'name="password_file"' not in page.content.decode()  # shown, never typed
    form = {"name": "vc-admin", "host": "attacker.example", "port": "443", "username": "u", "password": "",
            "password_env": "", "thumbprint": vcenter.thumbprint, "_save": "Save"}
    page = admin_client.post(url, form)
    assert page.status_code == 200
    assert "needs the password typed again" in page.content.decode()
    form.update(host="vc.example.com", password_file="/work/var/vma-token")  # not a field: ignored
    admin_client.post(url, form)
    vcenter.refresh_from_db()
    assert (vcenter.host, vcenter.password_file) == ("vc.example.com", str(secret))


def test_the_admin_refuses_a_password_variable_outside_the_allow_list(admin_client):
    vcenter = VCenter.objects.create(name="vc-env", host="vc.example.com", username="u",
                                     password_env="VCENTER_PASSWORD_VC_ENV", thumbprint="AB:" * 19 + "AB")
    url = reverse("admin:replication_vcenter_change", args=[vcenter.pk])
    page = admin_client.post(url, {"name": "vc-env", "host": "vc.example.com", "port": "443", "username": "u",
                                   "password": "", "password_env": "SECRET_KEY", "thumbprint": vcenter.thumbprint,
                                   "_save": "Save"})
    assert "may not hold a vCenter password" in page.content.decode()
    vcenter.refresh_from_db()
    assert vcenter.password_env == "VCENTER_PASSWORD_VC_ENV"


def test_a_vcenter_that_never_answers_is_an_error_within_the_timeout(hanging_server, monkeypatch):
    from replication.services import sources as source_service

    monkeypatch.setenv("VCENTER_PASSWORD_HANG", "pw")
    started = time.monotonic()
    with override_settings(PROBE_TIMEOUT_S=1.0), \
            pytest.raises(vmware_service.VCenterConfigError, match=r"did not present a certificate within 1 s"):
        source_service.certificate_thumbprint("127.0.0.1", hanging_server)
    with override_settings(VCENTER_TIMEOUT_S=1.0), \
            pytest.raises(vmware_service.VSphereError, match=f"127.0.0.1:{hanging_server} did not"):
        vmware_service.register_vcenter("vc-hang", "127.0.0.1", "u", "AB" * 20, port=hanging_server,
                                        password_env="VCENTER_PASSWORD_HANG")
    assert time.monotonic() - started < 10
    assert not VCenter.objects.exists()


def test_a_cloud_that_never_answers_is_an_error_naming_it_and_the_timeout(hanging_server, monkeypatch):
    from replication.models import CloudError, CloudStackConfig
    from replication.platforms.cloudstack.client import CloudClient

    monkeypatch.setenv("CLOUDSTACK_SECRET_TEST", "s")
    config = CloudStackConfig(name="c", api_url=f"http://127.0.0.1:{hanging_server}/client/api", api_key="k",
                              secret_env="CLOUDSTACK_SECRET_TEST", zone_id="z")
    started = time.monotonic()
    with override_settings(PROBE_TIMEOUT_S=1.0), pytest.raises(CloudError, match=r"did not answer listZones within "
                                                                                 r"1 s \(PROBE_TIMEOUT_S\)"):
        CloudClient(config).check()
    assert time.monotonic() - started < 8

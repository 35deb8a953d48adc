"""Production defaults and bad input (issue 26): the system's files private
(and tightened at start when found open), DEBUG off, static files and a CSP
with DEBUG off, `check --deploy` clean, names without control characters or
excess length everywhere, bounded numbers, login throttling, the OpenAPI
document behind the API's auth."""

import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from django.conf import settings
from django.contrib.auth.models import User
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ImproperlyConfigured, ValidationError
from django.core.management import CommandError, call_command
from django.db import connection

from oma_site import private_files
from oma_site.log_format import OneLineFormatter
from replication.models import VirtualMachine
from replication.platforms.local.volumes import LocalVolumeProvider
from replication.services.inventory import register_image_vm
from replication.services.jobs import start_replication
from tests.helpers import MiB, make_image, user_with_role

PROJECT_ROOT = Path(__file__).resolve().parent.parent
BAD_NAMES = {"newline": "vm1\n[2026-01-01 00:00:00,000: INFO/MainProcess] forged", "nul": "vm\x00one",
             "tab": "vm\tone", "long": "v" * 10_000}


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def run_django(code_or_args: list[str], **env) -> subprocess.CompletedProcess:
    full_env = {key: value for key, value in os.environ.items() if key not in ("DEBUG", "HTTPS")}
    full_env.update(env)
    return subprocess.run([sys.executable, *code_or_args], cwd=PROJECT_ROOT, env=full_env, capture_output=True,
                          text=True, timeout=120)


# --- files of the system ------------------------------------------------------

@pytest.mark.django_db
def test_the_database_var_and_a_new_volume_are_private(tmp_path):
    if connection.vendor == "sqlite":
        database = Path(connection.settings_dict["NAME"])
        assert mode(database) == 0o600, f"{database} is {mode(database):04o}"
    assert mode(settings.VAR_DIR) == 0o700
    for directory in (settings.OMA_VOLUME_DIR, settings.OMA_RUN_DIR):
        assert mode(directory) == 0o700, directory
    # Created 0600 whatever umask the process runs with.
    previous = os.umask(0o022)
    try:
        provider = LocalVolumeProvider(tmp_path / "volumes", tmp_path / "run")
        path = provider.create_volume("migration-vol-private", MiB)
    finally:
        os.umask(previous)
    assert mode(path) == 0o600 and mode(tmp_path / "volumes") == 0o700


def test_data_left_open_is_tightened_at_start_with_a_warning(tmp_path):
    volumes = tmp_path / "volumes"
    volumes.mkdir()
    volumes.chmod(0o755)
    volume = volumes / "migration-vol-open"
    volume.write_bytes(b"x")
    volume.chmod(0o644)
    done = run_django(["manage.py", "check"], DJANGO_SETTINGS_MODULE="oma_site.test_settings",
                      OMA_TEST_VOLUME_DIR=str(volumes))
    assert done.returncode == 0, done.stderr
    assert mode(volumes) == 0o700 and mode(volume) == 0o600
    assert f"{volumes} was open to other users (mode 0755): tightened to 0700" in done.stderr
    assert f"{volume} was open to other users (mode 0644): tightened to 0600" in done.stderr


def test_what_cannot_be_tightened_stops_the_process_with_the_fix(tmp_path, monkeypatch):
    directory = tmp_path / "data"
    directory.mkdir()
    directory.chmod(0o755)

    def refused(path, mode):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(private_files.os, "chmod", refused)
    with pytest.raises(ImproperlyConfigured, match=rf"run `chmod 700 {directory}` as its owner"):
        private_files._tighten(directory, private_files.DIR_MODE, "chmod 700")


def test_a_symlinked_volume_is_never_followed(tmp_path):
    target = tmp_path / "device"
    target.write_bytes(b"")
    target.chmod(0o644)
    (tmp_path / "link").symlink_to(target)
    assert not private_files._tighten(tmp_path / "link", private_files.FILE_MODE, "chmod 600")
    assert mode(target) == 0o644


# --- production defaults ------------------------------------------------------

def test_debug_is_off_unless_asked_for_and_the_secret_key_is_generated_private(tmp_path):
    code = "import django; django.setup(); from django.conf import settings as s; print(s.DEBUG, s.SECRET_KEY)"
    key_path = tmp_path / "secret-key"
    done = run_django(["-c", code], DJANGO_SETTINGS_MODULE="oma_site.settings", SECRET_KEY_PATH=str(key_path))
    assert done.returncode == 0, done.stderr
    debug, key = done.stdout.split()
    assert debug == "False"
    assert key == key_path.read_text().strip() and len(key) >= 50 and mode(key_path) == 0o600
    again = run_django(["-c", code], DJANGO_SETTINGS_MODULE="oma_site.settings", SECRET_KEY_PATH=str(key_path))
    assert again.stdout.split()[1] == key, "the key stays the same across starts"
    assert run_django(["-c", code], DJANGO_SETTINGS_MODULE="oma_site.settings", DEBUG="1").stdout.startswith("True")


def test_check_deploy_is_clean_with_the_production_settings():
    done = run_django(["manage.py", "check", "--deploy", "--fail-level", "WARNING"],
                      DJANGO_SETTINGS_MODULE="oma_site.settings", HTTPS="1", ALLOWED_HOSTS="oma.example.com")
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.integration  # the agent's web server in its own process
def test_the_running_server_serves_static_files_a_csp_and_a_404_without_urls(vma_server):
    # The runserver of the tests runs on the defaults: DEBUG unset.
    css = requests.get(f"{vma_server}/static/replication/oma.css", timeout=10)
    assert css.status_code == 200 and css.headers["Content-Type"].startswith("text/css") and ".bar" in css.text
    assert requests.get(f"{vma_server}/static/admin/css/base.css", timeout=10).status_code == 200
    login = requests.get(f"{vma_server}/login/", timeout=10)
    policy = login.headers["Content-Security-Policy"]
    assert "default-src 'self'" in policy and "script-src 'self'" in policy and "'unsafe-inline'" not in policy
    missing = requests.get(f"{vma_server}/no-such-page/", timeout=10)
    assert missing.status_code == 404
    assert "admin/" not in missing.text and "URLconf" not in missing.text and "DEBUG" not in missing.text


@pytest.mark.django_db
def test_pages_carry_no_inline_style_the_csp_would_block(client, tmp_path, monkeypatch):
    monkeypatch.setattr("replication.services.jobs.enqueue_prepare", lambda *args: None)
    vm = register_image_vm("vm-csp", [str(make_image(tmp_path / "d.img", MiB, [(0, MiB)]))])
    job = start_replication(vm)
    client.force_login(user_with_role("viewer", "viewer"))
    for url in ("/", f"/jobs/{job.id}/", "/vms/", f"/vms/{vm.pk}/"):
        page = client.get(url).content.decode()
        assert "style=" not in page and "<style" not in page and "<script>" not in page, url


# --- bad input ------------------------------------------------------------------

@pytest.mark.django_db
@pytest.mark.parametrize("kind", BAD_NAMES)
def test_a_bad_vm_name_is_refused_by_add_vm_the_sources_page_and_the_admin(kind, client, tmp_path):
    name = BAD_NAMES[kind]
    image = make_image(tmp_path / "d.img", MiB, [(0, MiB)])
    reason = "at most 200 are allowed" if kind == "long" else "must not contain control characters"
    with pytest.raises(CommandError, match=reason):
        call_command("add_vm", name, "--disk", str(image))

    client.force_login(User.objects.create_superuser("admin", password="s3cret-pass-x"))
    page = client.post("/sources/", {"step": "image", "name": name, "disks": str(image)})
    assert page.status_code == 200 and reason in page.content.decode()

    form = {"name": name, "source_kind": "image", "agent": "local", "firmware": "bios", "nics": "[]",
            "snapshots": "[]", "disks-TOTAL_FORMS": "1", "disks-INITIAL_FORMS": "0", "disks-MIN_NUM_FORMS": "0",
            "disks-MAX_NUM_FORMS": "1000", "disks-0-locator": str(image)}
    page = client.post("/admin/replication/virtualmachine/add/", form)
    admin_reason = {"long": "at most 200 characters", "nul": "Null characters are not allowed"}.get(
        kind, "must not contain control characters")
    assert page.status_code == 200 and admin_reason in page.content.decode()
    assert not VirtualMachine.objects.exists()


@pytest.mark.django_db
def test_other_operator_names_are_checked_in_their_services():
    from replication.models import CloudError
    from replication.platforms.cloudstack.config import register_cloud
    from replication.services import scheduler, vmware

    with pytest.raises(scheduler.ScheduleError, match="control characters"):
        scheduler.create_group("group\none")
    with pytest.raises(vmware.VCenterConfigError, match="at most 100"):
        vmware.register_vcenter("v" * 101, "vc.example", "admin", "00" * 20, password_env="VC_PW", check=False)
    with pytest.raises(CloudError, match="control characters"):
        register_cloud("cloud\x00", api_url="https://cloud.example/client/api", api_key="k",
                       secret_env="CLOUDSTACK_SECRET_CS", zone_id="z", check=False)


def test_a_name_cannot_forge_a_log_line():
    formatter = OneLineFormatter("%(levelname)s %(name)s: %(message)s")
    record = logging.LogRecord("replication", logging.INFO, __file__, 1, "registered VM %s", (BAD_NAMES["newline"],),
                               None)
    line = formatter.format(record)
    assert "\n" not in line and "vm1\\n[2026-01-01" in line


@pytest.mark.django_db
def test_a_rate_of_1e99_is_a_400_on_the_page_and_an_error_from_set_limit(client, tmp_path, monkeypatch):
    monkeypatch.setattr("replication.services.jobs.enqueue_prepare", lambda *args: None)
    vm = register_image_vm("vm-rate", [str(make_image(tmp_path / "d.img", MiB, [(0, MiB)]))])
    job = start_replication(vm)
    client.force_login(user_with_role("limiter", "operator"))
    for rate in ("1e99", "inf", "nan", "99999999999999999999G"):
        page = client.post(f"/jobs/{job.id}/limit/", {"rate": rate})
        assert page.status_code == 400, rate
        assert "the rate must be" in page.content.decode(), rate
        with pytest.raises(CommandError, match="the rate must be"):
            call_command("set_limit", job.id, rate)
    job.refresh_from_db()
    assert job.bandwidth_limit_bps is None


@pytest.mark.django_db
def test_durations_and_group_numbers_are_bounded():
    from replication.services import scheduler

    for text in ("1e99", "inf", "400d"):
        with pytest.raises(CommandError):
            call_command("group", "create", "g1", "--rpo", text)
    with pytest.raises(scheduler.ScheduleError, match="between 0 and"):
        scheduler.create_group("g1", max_concurrent=10**12)


@pytest.mark.django_db
def test_the_openapi_document_needs_a_login(client):
    answer = client.get("/api/openapi.json")
    assert answer.status_code == 401 and answer["Content-Type"] == "application/json"
    client.force_login(user_with_role("reader", "viewer"))
    assert client.get("/api/openapi.json").json()["openapi"].startswith("3.")


@pytest.mark.django_db
def test_the_nth_wrong_password_locks_the_login_out(client):
    User.objects.create_user("target", password="right-horse-battery")
    for _ in range(settings.AXES_FAILURE_LIMIT - 1):
        page = client.post("/login/", {"username": "target", "password": "wrong"})
        assert page.status_code == 200 and "_auth_user_id" not in client.session
    locked = client.post("/login/", {"username": "target", "password": "wrong"})
    assert locked.status_code == 429
    # Locked out: even the right password is refused now.
    again = client.post("/login/", {"username": "target", "password": "right-horse-battery"})
    assert again.status_code == 429 and "_auth_user_id" not in client.session


@pytest.mark.django_db
def test_the_standard_password_validators_apply():
    user = User(username="operator")
    for weak in ("short", "password123", "1234567890123", "operator-1"):
        with pytest.raises(ValidationError):
            validate_password(weak, user)
    validate_password("correct-horse-battery-staple", user)

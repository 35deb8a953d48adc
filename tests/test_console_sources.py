"""vCenter sources from the pages, against the vCenter simulator: edit the
connection (a login first), rotate the password (refused one: the old stays),
delete (refused with the reason while VMs depend on it)."""

import html
import re
from pathlib import Path

import pytest
from django.test import Client
from django.urls import reverse

from replication.models import VCenter, VirtualMachine
from replication.services import vmware as vmware_service
from tests.helpers import cloud_form_data, user_with_role

pytestmark = pytest.mark.django_db


def client_as(role):
    from django.contrib.auth.models import User

    client = Client()
    client.force_login(User.objects.filter(username=role).first() or user_with_role(role, role))
    return client


def feedback(response, field):
    found = re.findall(rf'<div class="invalid-feedback[^"]*" data-error="{re.escape(field)}">([^<]*)</div>',
                       response.content.decode())
    assert found, f"no error beside {field}"
    return html.unescape(" ".join(found))


@pytest.fixture
def recorded(vcsim_factory, tmp_path, settings):
    settings.OMA_SECRETS_DIR = tmp_path / "secrets"
    settings.OMA_SECRETS_DIR.mkdir()
    sim = vcsim_factory({"vms": []})
    record = vmware_service.register_vcenter("vc-edit", sim.host, sim.username, sim.thumbprint, port=sim.port,
                                             password_file=str(sim.password_file))
    return sim, record


def connection(sim, **changes):
    data = {"action": "connection", "vc-host": sim.host, "vc-port": str(sim.port), "vc-username": sim.username,
            "vc-thumbprint": sim.thumbprint, "vc-agent": "local"}
    data.update(changes)
    return data


def test_edit_a_vcenter_valid_invalid_and_refused(recorded):
    sim, record = recorded
    url = reverse("vcenter-edit", args=[record.pk])
    admin = client_as("administrator")
    assert client_as("operator").post(url, connection(sim, **{"vc-port": "1"})).status_code == 403
    response = admin.post(url, connection(sim, **{"vc-thumbprint": "12:34"}))
    assert response.status_code == 400
    assert "is not a SHA-1 thumbprint (40 hex digits)" in feedback(response, "vc-thumbprint")
    response = admin.post(url, connection(sim, **{"vc-port": "70000"}))
    assert "the port must be 1..65535, not 70000" in feedback(response, "vc-port")
    response = admin.post(url, connection(sim, **{"vc-username": "nobody"}))
    assert response.status_code == 400 and 'class="alert alert-danger"' in response.content.decode()
    record.refresh_from_db()
    assert record.username == sim.username, "a refused login stores nothing"
    assert admin.post(url, connection(sim, **{"vc-thumbprint": sim.thumbprint.lower()})).status_code == 302


def test_rotate_the_password_keeps_the_old_one_when_refused(recorded, settings):
    sim, record = recorded
    url = reverse("vcenter-edit", args=[record.pk])
    admin = client_as("administrator")
    response = admin.post(url, {"action": "password", "pw-password": "wrong-one"})
    assert response.status_code == 400 and feedback(response, "pw-password")
    record.refresh_from_db()
    assert record.password_file == str(sim.password_file)
    assert not list(Path(settings.OMA_SECRETS_DIR).glob("vcenter-*")), "a refused password leaves no file"
    assert client_as("operator").post(url, {"action": "password", "pw-password": sim.password}).status_code == 403
    assert admin.post(url, {"action": "password", "pw-password": sim.password}).status_code == 302
    record.refresh_from_db()
    secret = Path(record.password_file)
    assert secret.parent == Path(settings.OMA_SECRETS_DIR).absolute() and secret.read_text() == sim.password
    assert secret.stat().st_mode & 0o777 == 0o600 and sim.password not in admin.get(url).content.decode()


def test_delete_is_refused_while_vms_depend_on_the_vcenter(recorded):
    sim, record = recorded
    vm = VirtualMachine.objects.create(name="depends", vcenter=record, moref="vm-1")
    url = reverse("vcenter-delete", args=[record.pk])
    admin = client_as("administrator")
    response = admin.post(url)
    assert response.status_code == 409
    assert "1 VM(s) recorded from it depend on it (depends)" in html.unescape(response.content.decode())
    assert VCenter.objects.filter(pk=record.pk).exists()
    vm.delete()
    page = admin.get(url).content.decode()
    assert "Delete vCenter vc-edit?" in page and "nothing on the vCenter itself changes" in page
    assert client_as("operator").post(url).status_code == 403
    assert admin.post(url).status_code == 302 and not VCenter.objects.filter(pk=record.pk).exists()


def test_add_and_edit_the_cloud_secret_by_reference(cloud_sim):
    from replication.models import CloudStackConfig

    sim, secret = cloud_sim
    url = reverse("cloud-edit")
    admin = client_as("administrator")
    assert client_as("operator").post(url, cloud_form_data(sim, secret)).status_code == 403
    response = admin.post(url, cloud_form_data(sim, secret, secret_file=""))
    assert response.status_code == 400
    assert "give the secret key as exactly one of a file or an environment variable" in feedback(
        response, "secret_file")
    response = admin.post(url, cloud_form_data(sim, secret, zone_id="no-such-zone"))
    assert response.status_code == 400 and "no-such-zone" in html.unescape(response.content.decode())
    response = admin.post(url, cloud_form_data(sim, secret, oma_vm_id=""))
    assert "This field is required." in feedback(response, "oma_vm_id")
    assert not CloudStackConfig.objects.exists(), "nothing saved from a refused form"

    assert admin.post(url, cloud_form_data(sim, secret)).status_code == 302
    config = CloudStackConfig.objects.get()
    assert config.is_active and config.secret_file == str(secret) and config.zone_id == sim.zone["id"]
    page = admin.get(url).content.decode()
    assert f'value="{sim.api_key}"' in page and sim.secret not in page, "the secret is never shown"
    assert admin.post(url, cloud_form_data(sim, secret, template_id="")).status_code == 302
    config.refresh_from_db()
    assert config.template_id == "" and CloudStackConfig.objects.count() == 1

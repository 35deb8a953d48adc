"""The terminal-only source and access tasks in a real headless Chromium,
driven from the browser alone (tests/browser.py's helpers): a vCenter
edited, its password rotated and it deleted (against the vCenter
simulator), the CloudStack cloud added and edited (against its simulator),
an API token made, used and revoked; an agent enrolled with a pairing
code made on the Agents page, approved and revoked there. Each page is shot at 1280 and 390 px
into test-artifacts/screens/ and checked for overflow and words broken
mid-word at both widths."""

from pathlib import Path

import pytest
import requests
from playwright.sync_api import expect

from replication.models import ApiToken, CloudStackConfig, VCenter, VirtualMachine
from replication.services import vmware as vmware_service
from simulators.vcenter import vm_spec
from tests.browser import at_both_widths, error_beside, log_in
from tests.helpers import MiB, cloud_form_data
from tests.test_enrolment import rabbit  # noqa: F401 (a fixture: the test's own vhost on the real RabbitMQ)

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def test_a_vcenter_is_edited_its_password_rotated_and_it_is_deleted_from_the_browser(
        live_server, browser_page, vcsim_factory, tmp_path, settings):
    settings.OMA_SECRETS_DIR = tmp_path / "secrets"
    settings.OMA_SECRETS_DIR.mkdir()
    sim = vcsim_factory({"vms": [vm_spec("web01", [MiB])]})
    record = vmware_service.register_vcenter("vc-edit", "localhost", sim.username, sim.thumbprint, port=sim.port,
                                             password_file=str(sim.password_file))
    page = browser_page
    log_in(page, live_server)
    page.click("text=Sources")
    page.click("text=Edit vc-edit")
    expect(page.locator("h1")).to_have_text("vCenter vc-edit")
    at_both_widths(page, "vcenter-edit")

    # Edit: a bad port and a refused login store nothing; a good edit (the
    # address, a lower-case thumbprint) is logged in with, then stored.
    page.fill('input[name="vc-port"]', "70000")
    page.click("text=Save the connection")
    expect(error_beside(page, "vc-port")).to_contain_text("the port must be 1..65535, not 70000")
    page.fill('input[name="vc-port"]', str(sim.port))
    page.fill('input[name="vc-username"]', "nobody")
    page.click("text=Save the connection")
    expect(page.locator('[data-form="vcenter"] .alert-danger')).to_be_visible()
    at_both_widths(page, "vcenter-edit-refused")
    record.refresh_from_db()
    assert (record.host, record.username) == ("localhost", sim.username), "a refused login stores nothing"
    page.fill('input[name="vc-username"]', sim.username)
    page.fill('input[name="vc-host"]', sim.host)
    page.fill('input[name="vc-thumbprint"]', sim.thumbprint.lower())
    page.click("text=Save the connection")
    expect(page.locator("[data-message]")).to_contain_text("vCenter vc-edit saved; the login with its settings worked")
    record.refresh_from_db()
    assert (record.host, record.thumbprint) == (sim.host, sim.thumbprint)

    # Rotate: a refused password keeps the old one, the reason beside the field; the right one is stored.
    page.fill('input[name="pw-password"]', "not-the-password")
    page.click("text=Rotate the password")
    expect(error_beside(page, "pw-password")).to_be_visible()
    expect(page.locator('input[name="pw-password"]')).to_have_class("form-control is-invalid")
    at_both_widths(page, "vcenter-password-refused")
    record.refresh_from_db()
    assert record.password_file == str(sim.password_file)
    assert not list(Path(settings.OMA_SECRETS_DIR).glob("vcenter-*")), "a refused password leaves no file"
    page.fill('input[name="pw-password"]', sim.password)
    page.click("text=Rotate the password")
    expect(page.locator("[data-message]")).to_contain_text("new password stored; the login with it worked")
    record.refresh_from_db()
    assert record.password_file != str(sim.password_file) and Path(record.password_file).read_text() == sim.password
    expect(page.locator("main")).to_contain_text(f"Now read from {record.password_file}")

    # Delete: refused while a VM protected from it depends on it, naming it.
    page.click("text=Sources")
    page.click("text=Choose VMs of vc-edit")
    page.check('input[value="web01"]')
    page.click("text=Protect the chosen VMs")
    expect(page.locator('[data-vm="web01"]')).to_be_visible()
    vm = VirtualMachine.objects.get(name="web01", vcenter=record)
    page.goto(f"{live_server.url}/sources/vcenters/{record.pk}/edit/")
    expect(page.locator("[data-delete-refusal]")).to_contain_text("1 VM(s) recorded from it depend on it (web01)")
    page.click("text=Delete vCenter vc-edit…")
    expect(page.locator("[data-refusal]")).to_contain_text("depend on it (web01)")
    expect(page.locator("button:has-text('Delete vCenter vc-edit')")).to_have_count(0)
    at_both_widths(page, "vcenter-delete-refused")
    assert VCenter.objects.filter(pk=record.pk).exists()

    # The VM goes (in the admin); then the vCenter may go.
    page.goto(f"{live_server.url}/admin/replication/virtualmachine/{vm.pk}/delete/")
    page.click("input[type=submit]")
    expect(page.locator(".messagelist")).to_contain_text("web01")
    assert not VirtualMachine.objects.filter(pk=vm.pk).exists()
    page.goto(f"{live_server.url}/sources/vcenters/{record.pk}/edit/")
    page.click("text=Delete vCenter vc-edit…")
    expect(page.locator("h1")).to_have_text("Delete vCenter vc-edit?")
    expect(page.locator("[data-consequences]")).to_contain_text("nothing on the vCenter itself changes")
    at_both_widths(page, "vcenter-delete-confirm")
    page.click("button:has-text('Delete vCenter vc-edit')")
    expect(page.locator("[data-message]")).to_contain_text("vCenter vc-edit deleted.")
    assert not VCenter.objects.filter(pk=record.pk).exists()
    expect(page.locator('[data-vcenter="vc-edit"]')).to_have_count(0)


def fill_cloud_form(page, data: dict):
    for name, value in data.items():
        page.fill(f'[data-form="cloud"] [name="{name}"]', value)


def test_the_cloud_is_added_and_edited_from_the_browser(live_server, browser_page, cloud_sim):
    sim, secret = cloud_sim
    page = browser_page
    log_in(page, live_server)
    page.goto(f"{live_server.url}/cloud/")
    page.click("text=Add the CloudStack cloud")
    expect(page.locator("h1")).to_have_text("Add the CloudStack cloud")
    at_both_widths(page, "cloud-add")

    # Refused: no secret reference beside its field, an unknown zone from the cloud itself.
    fill_cloud_form(page, cloud_form_data(sim, secret, secret_file=""))
    page.click("text=Check with the cloud and save")
    expect(error_beside(page, "secret_file")).to_contain_text(
        "give the secret key as exactly one of a file or an environment variable")
    fill_cloud_form(page, cloud_form_data(sim, secret, zone_id="no-such-zone"))
    page.click("text=Check with the cloud and save")
    expect(page.locator("main")).to_contain_text("no-such-zone")
    at_both_widths(page, "cloud-add-refused")
    assert not CloudStackConfig.objects.exists(), "nothing saved from a refused form"

    fill_cloud_form(page, cloud_form_data(sim, secret))
    page.click("text=Check with the cloud and save")
    expect(page.locator("h1")).not_to_have_text("Add the CloudStack cloud")
    config = CloudStackConfig.objects.get()
    assert config.is_active and config.secret_file == str(secret) and config.zone_id == sim.zone["id"]
    at_both_widths(page, "cloud-added")

    # Edit: the form comes back filled (never the secret); a change is checked and stored on the same cloud.
    page.goto(f"{live_server.url}/cloud/")
    page.click("text=Edit the cloud")
    expect(page.locator("h1")).to_have_text("Edit the cloud")
    expect(page.locator('[name="api_key"]')).to_have_value(sim.api_key)
    assert sim.secret not in page.content(), "the secret is never shown"
    at_both_widths(page, "cloud-edit")
    page.fill('[name="template_id"]', "")
    page.click("text=Check with the cloud and save")
    expect(page.locator("h1")).not_to_have_text("Edit the cloud")
    config.refresh_from_db()
    assert config.template_id == "" and CloudStackConfig.objects.count() == 1


def test_an_api_token_is_made_used_and_revoked_from_the_browser(live_server, browser_page):
    page = browser_page
    log_in(page, live_server)
    page.goto(f"{live_server.url}/tokens/")
    expect(page.locator("h1")).to_have_text("API tokens")
    page.select_option('select[name="user"]', "administrator")
    page.fill('input[name="name"]', "bad\x07name")
    page.click("text=Make the token")
    expect(error_beside(page, "name")).to_be_visible()
    assert not ApiToken.objects.exists()
    page.fill('input[name="name"]', "monitoring")
    page.click("text=Make the token")
    key = page.locator("[data-new-token] [data-key]").inner_text().strip()
    expect(page.locator("[data-new-token]")).to_contain_text("it is shown only this once")
    at_both_widths(page, "token-made")
    token = ApiToken.objects.get()
    assert token.key_sha256 == ApiToken.digest(key) and token.name == "monitoring"
    page.goto(f"{live_server.url}/tokens/")
    expect(page.locator('[data-token="monitoring"]')).to_be_visible()
    assert key not in page.content(), "shown once"
    at_both_widths(page, "tokens")

    api = f"{live_server.url}/api/jobs/"
    assert requests.get(api, headers={"Authorization": f"Bearer {key}"}, timeout=30).status_code == 200
    token.refresh_from_db()
    assert token.last_used_at is not None
    page.reload()
    expect(page.locator('[data-token="monitoring"]')).not_to_contain_text("never")

    page.click("text=Revoke monitoring…")
    expect(page.locator("h1")).to_have_text("Revoke token monitoring of administrator?")
    at_both_widths(page, "token-revoke-confirm")
    assert ApiToken.objects.exists(), "asking revokes nothing"
    page.click("button:has-text('Revoke')")
    expect(page.locator('[data-token="monitoring"]')).to_have_count(0)
    assert not ApiToken.objects.exists()
    assert requests.get(api, headers={"Authorization": f"Bearer {key}"}, timeout=30).status_code == 401


def test_an_agent_is_enrolled_approved_and_revoked_from_the_browser(live_server, browser_page, rabbit,  # noqa: F811
                                                                    tmp_path):
    from replication.choices import AgentState
    from replication.models import Agent
    from vma_agent.enrol import agent_key

    page = browser_page
    log_in(page, live_server)
    page.goto(f"{live_server.url}/agents/")
    page.click("text=New pairing code")
    code = page.locator("[data-pairing-code]").inner_text()
    at_both_widths(page, "agents-pairing-code")
    # The agent host presents the code (as vma_agent.enrol does).
    enrolled = requests.post(f"{live_server.url}/api/agents/enrol/", timeout=10, json={
        "code": code, "name": "site-page", "public_key": agent_key(tmp_path / "state", "site-page"), "version": "1"})
    assert enrolled.status_code == 201, enrolled.text

    page.goto(f"{live_server.url}/agents/")
    expect(page.locator('[data-agent="site-page"] [data-state]')).to_have_text("pending approval")
    page.locator('[data-agent="site-page"]').get_by_text("Approve…").click()
    expect(page.locator("[data-consequences]")).to_contain_text("create its own broker user")
    at_both_widths(page, "agent-approve-confirm")
    page.click("button:has-text('Approve site-page')")
    expect(page.locator("[data-message]")).to_contain_text("agent site-page approved: now active")
    assert Agent.objects.get(name="site-page").state == AgentState.ACTIVE

    page.locator('[data-agent="site-page"]').get_by_text("Revoke…").click()
    expect(page.locator("[data-consequences]")).to_contain_text("delete its broker user")
    page.click("button:has-text('Revoke site-page')")
    expect(page.locator("[data-message]")).to_contain_text("agent site-page revoked: now revoked")
    assert Agent.objects.get(name="site-page").state == AgentState.REVOKED
    # a revoked agent has nothing left to do
    expect(page.locator('[data-agent="site-page"] a, [data-agent="site-page"] button')).to_have_count(0)
    at_both_widths(page, "agents-revoked")

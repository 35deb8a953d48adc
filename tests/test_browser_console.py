"""The operator console in a real headless Chromium (tests/browser.py's
helpers), driven from the browser alone: a VM's settings, a cycle with a
bandwidth limit on a real worker pair, its checksums compared as a task,
its decommissioning; a protection group created with its VM; a network
mapped and unmapped; the boot check and hardware set (each page shot and
checked at 1280 and 390 px)."""

from pathlib import Path

import pytest
from playwright.sync_api import expect

from replication.choices import JobStatus, VMState
from replication.models import (
    NetworkMapping,
    ProtectionGroup,
    ReplicationJob,
    TargetVolume,
    VirtualMachine,
    VMContext,
)
from replication.services.inventory import register_image_vm
from tests.browser import ARTIFACTS, at_both_widths, error_beside, log_in
from tests.helpers import MiB, make_image, wait_for_job, wait_until
from tests.test_failover_live import isolated_network  # noqa: F401 - a fixture

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def test_vm_settings_a_limited_cycle_checksums_and_decommission_from_the_browser(
        celery_worker_process, live_server, browser_page, tmp_path):
    page = browser_page
    image = make_image(tmp_path / "console.img", 6 * MiB, [(0, 3 * MiB)], seed=11)
    vm = register_image_vm("console-vm", [str(image)])
    log_in(page, live_server)
    page.goto(f"{live_server.url}/vms/{vm.pk}/settings/")
    expect(page.locator("h1")).to_have_text("Settings of console-vm")

    # The boot check: a bad regex and timeout are refused beside their fields, nothing stored.
    boot = page.locator('[data-form="boot"]')
    boot.locator('input[value="screen"]').check()
    boot.locator('input[name="boot-regex"]').fill("(")
    boot.locator('input[name="boot-timeout"]').fill("5000")
    page.click("text=Save the boot check")
    expect(error_beside(page, "boot-regex")).to_contain_text("is not a regular expression")
    expect(error_beside(page, "boot-timeout")).to_contain_text("must be 1..3600 seconds, not 5000")
    expect(page.locator('input[name="boot-regex"]')).to_have_class("form-control is-invalid")
    assert VMContext.of(vm).boot_check_timeout_s == 120
    page.locator('[data-form="boot"] input[name="boot-regex"]').fill(r"BOOT-MARKER: \w+")
    page.locator('[data-form="boot"] input[name="boot-timeout"]').fill("240")
    page.click("text=Save the boot check")
    expect(page.locator("[data-message]")).to_contain_text("boot settings saved")
    context = VMContext.of(vm)
    assert (context.boot_probes, context.boot_check_regex, context.boot_check_timeout_s) == (
        "screen", r"BOOT-MARKER: \w+", 240)

    # Hardware: Secure Boot on BIOS is refused beside it; on UEFI it is taken.
    hardware = page.locator('[data-form="hardware"]')
    hardware.locator('select[name="hw-firmware"]').select_option("bios")
    hardware.locator('select[name="hw-secure_boot"]').select_option("on")
    page.click("text=Save the hardware")
    expect(error_beside(page, "hw-secure_boot")).to_contain_text("Secure Boot needs UEFI firmware")
    assert VMContext.of(vm).hardware == {}
    page.locator('[data-form="hardware"] select[name="hw-firmware"]').select_option("efi")
    page.click("text=Save the hardware")
    expect(page.locator("[data-hardware]")).to_contain_text("EFI Secure Boot")
    assert VMContext.of(vm).hardware == {"firmware": "efi", "secure_boot": True}

    # A cycle with a bandwidth limit: a bad rate is refused, a good one runs on the worker pair.
    page.locator('[data-form="replicate"] input[name="rep-limit"]').fill("fast")
    page.click("text=Start the cycle")
    expect(error_beside(page, "rep-limit")).to_contain_text("'fast' is not a rate")
    assert not ReplicationJob.objects.exists()
    page.locator('[data-form="replicate"] input[name="rep-limit"]').fill("64M")
    page.click("text=Start the cycle")
    expect(page.locator("h1")).to_contain_text("Job job-")
    job = wait_for_job(ReplicationJob.objects.get(vm=vm).id)
    assert job.status == JobStatus.COMPLETED and job.bandwidth_limit_bps == 64 * MiB
    replica = Path(TargetVolume.objects.get(source_disk__vm=vm).path)
    assert replica.exists()

    # The checksums, compared by a task; the page shows the outcome.
    page.goto(f"{live_server.url}/vms/{vm.pk}/settings/")
    page.click("text=Compare the checksums")
    expect(page.locator("[data-message]")).to_contain_text("Comparing the checksums of console-vm's disks")

    def compared():
        page.goto(f"{live_server.url}/vms/{vm.pk}/settings/")
        return page.locator("[data-checksum-run]").first.get_attribute("data-status") != "running"

    wait_until(compared, 60, "the checksum comparison")
    expect(page.locator("[data-checksum-run]").first).to_contain_text("Every comparable disk matches")
    expect(page.locator('[data-checksum-run] [data-disk="disk-2000"]').first).to_contain_text("match")

    # Decommission: the confirmation names what will happen, then it happens.
    page.click("text=Decommission console-vm…")
    expect(page.locator("h1")).to_have_text("Decommission console-vm?")
    consequences = page.locator("[data-consequences]")
    expect(consequences).to_contain_text(str(replica))
    expect(consequences).to_contain_text("keep its jobs, failovers, recovery point records and history")
    page.screenshot(path=str(ARTIFACTS / "decommission-confirm.png"), full_page=True)
    assert replica.exists(), "asking deletes nothing"
    page.click("button:has-text('Decommission console-vm')")
    expect(page.locator("[data-decommissioned]")).to_be_visible()
    expect(page.locator("[data-state]")).to_have_text("Decommissioned")
    assert not replica.exists()
    assert VMContext.of(vm).state == VMState.DECOMMISSIONED
    assert ReplicationJob.objects.filter(vm=vm, pk=job.pk).exists(), "its history stays"
    page.goto(f"{live_server.url}/vms/")
    expect(page.locator('[data-vm="console-vm"]')).to_have_count(0)


def test_a_protection_group_is_created_with_its_vm_from_the_browser(
        live_server, tmp_path, browser_page):
    page = browser_page
    register_image_vm("grouped-vm", [str(make_image(tmp_path / "g.img", MiB, [(0, 4096)]))])
    log_in(page, live_server)
    page.click("text=Protection")
    page.click("text=New protection group")
    expect(page.locator("h1")).to_have_text("New protection group")
    page.fill('input[name="name"]', "gui-group")
    page.fill('input[name="interval_s"]', "30m")
    page.fill('input[name="rpo_target_s"]', "soon")
    page.check("text=grouped-vm")
    page.click("text=Create the group")
    expect(error_beside(page, "rpo_target_s")).to_contain_text("'soon' is not a duration such as 90s, 15m")
    assert not ProtectionGroup.objects.exists()
    page.fill('input[name="rpo_target_s"]', "15m")
    page.fill('input[name="drill_interval_s"]', "1d")
    page.click("text=Create the group")
    expect(page.locator('[data-group="gui-group"]')).to_contain_text("grouped-vm")
    group = ProtectionGroup.objects.get(name="gui-group")
    assert (group.interval_s, group.rpo_target_s, group.drill_interval_s) == (1800, 900, 86400)
    assert VirtualMachine.objects.get(name="grouped-vm").group == group
    page.screenshot(path=str(ARTIFACTS / "group-created.png"), full_page=True)


@pytest.fixture
def settings_page(live_server, browser_page, tmp_path):
    """An administrator on the settings page of a VM with a NIC on 'VM Network'."""
    image = make_image(tmp_path / "settings.img", MiB, [(0, 4096)])
    vm = register_image_vm("settings-vm", [str(image)])
    VirtualMachine.objects.filter(pk=vm.pk).update(nics=[{"mac": "00:50:56:00:00:07", "network": "VM Network"}])
    log_in(browser_page, live_server)
    browser_page.goto(f"{live_server.url}/vms/{vm.pk}/settings/")
    expect(browser_page.locator("h1")).to_have_text("Settings of settings-vm")
    return browser_page, vm


def test_a_network_is_mapped_and_unmapped_from_the_browser(settings_page, isolated_network):  # noqa: F811
    page, vm = settings_page
    at_both_widths(page, "vm-settings-unmapped")
    form = page.locator('[data-form="network"]')
    form.locator('input[name="net-source"]').fill("VM Network")
    form.locator('input[name="net-destination"]').fill("no-such-network")
    page.click("text=Map the network")
    expect(error_beside(page, "net-destination")).to_contain_text(
        "the destination has no network named 'no-such-network'")
    assert not NetworkMapping.objects.exists()
    page.locator('[data-form="network"] input[name="net-destination"]').fill(isolated_network)
    page.click("text=Map the network")
    expect(page.locator('[data-network="VM Network"]')).to_contain_text(isolated_network)
    assert NetworkMapping.as_dict() == {"VM Network": isolated_network}
    at_both_widths(page, "vm-settings-mapped")

    # Removal asks first, naming the mapping and the VM whose live failover it stops.
    page.locator('[data-mapping="VM Network"]').locator("text=Remove").click()
    expect(page.locator("h1")).to_have_text("Remove the mapping of network VM Network?")
    consequences = page.locator("[data-consequences]")
    expect(consequences).to_contain_text(f"remove the mapping VM Network -> {isolated_network} for every VM")
    expect(consequences).to_contain_text("refuse a live failover of the 1 VM(s) with a NIC on VM Network "
                                         "(settings-vm)")
    at_both_widths(page, "network-unmap-confirm")
    assert NetworkMapping.objects.exists(), "asking removes nothing"
    page.click("button:has-text('Remove the mapping of VM Network')")
    expect(page.locator("[data-message]")).to_contain_text("'VM Network' no longer mapped")
    expect(page.locator('[data-network="VM Network"]')).to_contain_text("not mapped")
    expect(page.locator("[data-mapping]")).to_have_count(0)
    assert not NetworkMapping.objects.exists()


def test_the_boot_check_and_hardware_are_set_from_the_browser(settings_page):
    page, vm = settings_page
    boot = page.locator('[data-form="boot"]')
    boot.locator('input[value="network"]').check()
    boot.locator('input[name="boot-regex"]').fill("[")
    boot.locator('input[name="boot-timeout"]').fill("0")
    page.click("text=Save the boot check")
    expect(error_beside(page, "boot-regex")).to_contain_text("is not a regular expression")
    expect(error_beside(page, "boot-timeout")).to_contain_text("must be 1..3600 seconds, not 0")
    at_both_widths(page, "vm-settings-refused")
    assert VMContext.of(vm).boot_check_timeout_s == 120, "nothing stored from a refused form"
    page.locator('[data-form="boot"] input[name="boot-regex"]').fill(r"login:\s")
    page.locator('[data-form="boot"] input[name="boot-timeout"]').fill("300")
    page.click("text=Save the boot check")
    expect(page.locator("[data-message]")).to_contain_text("settings-vm: boot settings saved")
    context = VMContext.of(vm)
    assert (context.boot_probes, context.boot_check_regex, context.boot_check_timeout_s) == (
        "network", r"login:\s", 300)

    hardware = page.locator('[data-form="hardware"]')
    hardware.locator('select[name="hw-nic_model"]').select_option("e1000e")
    hardware.locator('select[name="hw-disk_bus"]').select_option("sata")
    hardware.locator('select[name="hw-firmware"]').select_option("bios")
    hardware.locator('select[name="hw-secure_boot"]').select_option("on")
    page.click("text=Save the hardware")
    expect(error_beside(page, "hw-secure_boot")).to_contain_text("Secure Boot needs UEFI firmware")
    assert VMContext.of(vm).hardware == {}
    page.locator('[data-form="hardware"] select[name="hw-secure_boot"]').select_option("off")
    page.click("text=Save the hardware")
    expect(page.locator("[data-message]")).to_contain_text("settings-vm: hardware settings saved")
    assert VMContext.of(vm).hardware == {"firmware": "bios", "secure_boot": False, "disk_bus": "sata",
                                         "nic_model": "e1000e"}
    expect(page.locator("[data-hardware]")).to_contain_text("BIOS")
    at_both_widths(page, "vm-settings-saved")

"""Protection schedules and drills in a real headless Chromium, driven from
the pages alone: an administrator gives a group a schedule, changes it to a
cron expression, pauses it, clears it and deletes the group (each change in
django-celery-beat's tasks, and in the admin's log); an operator runs a
drill of a group from the Protection page and follows it there to its
result, a real test failover booted by libvirt and QEMU and ended. Each
page is shot and checked at 1280 and 390 px."""

import pytest
from django.contrib.admin.models import LogEntry
from django.template.defaultfilters import floatformat
from django_celery_beat.models import PeriodicTask
from playwright.sync_api import expect

from replication.choices import DrillStatus, VMState
from replication.models import DrillRun, ProtectionGroup, VirtualMachine, VMContext
from replication.services import scheduler
from replication.services.inventory import register_image_vm
from replication.services.jobs import start_replication
from simulators.boot_disk import boot_disk_builder
from tests.browser import at_both_widths, error_beside, log_in
from tests.helpers import MiB, make_image, sha256, wait_for_job, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def edit(page, group: str):
    page.click("text=Protection")
    page.click(f"text=Edit {group}")
    expect(page.locator("h1")).to_have_text(f"Edit group {group}")


def test_a_groups_schedule_is_set_changed_paused_cleared_and_the_group_deleted_from_the_browser(
        live_server, browser_page, tmp_path):
    page = browser_page
    register_image_vm("sched-vm", [str(make_image(tmp_path / "s.img", MiB, [(0, 4096)]))])
    log_in(page, live_server)

    # A schedule every 30 minutes, with a drill every day.
    page.click("text=Protection")
    page.click("text=New protection group")
    page.fill('input[name="name"]', "nightly")
    page.fill('input[name="interval_s"]', "30m")
    page.fill('input[name="drill_interval_s"]', "1d")
    page.check("text=sched-vm")
    page.click("text=Create the group")
    section = page.locator('[data-group="nightly"]')
    expect(section).to_contain_text("every 1800 s")
    expect(section).to_contain_text("drills every 24h 00m")
    group = ProtectionGroup.objects.get(name="nightly")
    assert (group.periodic_task.interval.every, group.periodic_task.enabled) == (1800, True)
    assert group.drill_task.interval.every == 86400
    at_both_widths(page, "protection-scheduled")

    # Both an interval and a cron expression, then a cron expression beat cannot
    # read: each refused beside its field, the schedule as it was.
    edit(page, "nightly")
    at_both_widths(page, "group-edit-schedule")
    page.fill('input[name="cron"]', "0 */4 * * *")
    page.click("text=Save group nightly")
    expect(error_beside(page, "interval_s")).to_contain_text("give either an interval or a cron expression")
    page.fill('input[name="interval_s"]', "")
    page.fill('input[name="cron"]', "0 */4 * *")
    page.click("text=Save group nightly")
    expect(error_beside(page, "cron")).to_contain_text("needs 5 fields")
    expect(page.locator('input[name="cron"]')).to_have_class("form-control is-invalid")
    group.refresh_from_db()
    assert (group.interval_s, group.cron, group.periodic_task.interval.every) == (1800, "", 1800)
    at_both_widths(page, "group-edit-schedule-refused")

    # A cron schedule in Paris time.
    page.fill('input[name="cron"]', "0 */4 * * *")
    page.fill('input[name="timezone"]', "Europe/Paris")
    page.click("text=Save group nightly")
    expect(page.locator("[data-message]")).to_contain_text("Protection group nightly saved: cron 0 */4 * * * "
                                                           "(Europe/Paris)")
    expect(section).to_contain_text("cron 0 */4 * * * (Europe/Paris)")
    task = PeriodicTask.objects.get(pk=ProtectionGroup.objects.get(name="nightly").periodic_task_id)
    assert task.interval is None and task.enabled
    assert (task.crontab.minute, task.crontab.hour, str(task.crontab.timezone)) == ("0", "*/4", "Europe/Paris")

    # Paused: the badge on the page; beat starts nothing (its tasks disabled).
    edit(page, "nightly")
    page.check('input[name="paused"]')
    page.click("text=Save group nightly")
    expect(section.locator(".badge")).to_have_text("paused")
    group = ProtectionGroup.objects.get(name="nightly")
    assert not group.periodic_task.enabled and not group.drill_task.enabled
    at_both_widths(page, "protection-paused")

    # Resumed with no schedule and no drills: its tasks gone, the group and its VM kept.
    edit(page, "nightly")
    page.uncheck('input[name="paused"]')
    page.fill('input[name="cron"]', "")
    page.fill('input[name="drill_interval_s"]', "")
    page.click("text=Save group nightly")
    expect(section).to_contain_text("no schedule")
    expect(section).to_contain_text("no drill schedule")
    expect(section.locator(".badge")).to_have_count(0)
    group = ProtectionGroup.objects.get(name="nightly")
    assert (group.periodic_task, group.drill_task, group.paused) == (None, None, False)
    assert not PeriodicTask.objects.filter(description__contains="nightly").exists()
    assert VirtualMachine.objects.get(name="sched-vm").group == group

    # Deleted, after a confirmation naming what happens.
    edit(page, "nightly")
    page.click("text=Delete group nightly…")
    expect(page.locator("h1")).to_have_text("Delete group nightly?")
    expect(page.locator("[data-consequences]")).to_contain_text("leave its VMs (sched-vm) in no group")
    at_both_widths(page, "group-delete-confirm")
    assert ProtectionGroup.objects.filter(name="nightly").exists(), "asking deletes nothing"
    page.click("button:has-text('Delete group nightly')")
    expect(page.locator("[data-message]")).to_contain_text("Protection group nightly deleted")
    expect(page.locator('[data-group="nightly"]')).to_have_count(0)
    assert VirtualMachine.objects.get(name="sched-vm").group is None

    logged = [(entry.action_flag, entry.change_message) for entry in
              LogEntry.objects.filter(user__username="administrator", object_repr="nightly").order_by("id")]
    assert logged == [(1, "created from the pages"), *[(2, "changed from the pages")] * 3,
                      (3, "deleted from the pages")]


def test_an_operator_runs_a_drill_from_the_protection_page_and_sees_its_result(
        celery_worker_process, live_server, browser_page, tmp_path):
    """Two VMs: one replicated (it boots on the destination, its boot seen on
    its console), one never replicated (it fails its drill, with the reason)."""
    from replication.platforms import get_destination

    destination = get_destination()
    for name in destination.list_vms("oma-test-drill-"):  # left by an interrupted earlier run
        destination.destroy(name)
    disk = tmp_path / "drill.img"
    boot_disk_builder().build_boot_disk(disk, "DRILL")
    booted = register_image_vm("drill-boot", [str(disk)])
    job = wait_for_job(start_replication(booted).id)
    assert job.status == "completed", job.error_message
    replica = job.disks.get().target_volume.path
    before = sha256(replica)
    context = VMContext.of(booted)
    context.boot_check_regex, context.boot_check_timeout_s = r"BOOT-MARKER: DRILL", 180
    context.save()
    never = register_image_vm("drill-never", [str(make_image(tmp_path / "n.img", MiB, [(0, 4096)]))])
    group = scheduler.create_group("rehearsed")
    scheduler.add_vms(group, [booted, never])

    page = browser_page
    asked = []
    page.on("dialog", lambda dialog: asked.append(dialog.message))  # the fixture accepts it
    log_in(page, live_server, role="operator")
    page.click("text=Protection")
    section = page.locator('[data-group="rehearsed"]')
    expect(section.locator('[data-rpo="drill-boot"] [data-drill]')).to_have_text("never rehearsed")
    expect(section.locator("text=Edit rehearsed")).to_have_count(0)  # changing groups is the administrator's
    at_both_widths(page, "protection-before-drill")

    section.locator("text=Run a drill of rehearsed now").click()
    expect(page.locator("[data-message]")).to_contain_text("Drill of group rehearsed: drill-boot, drill-never.")
    assert asked and asked[0].startswith("Run a drill of group rehearsed: each of its 2 VMs in turn")
    # One VM at a time: the first boots, the second waits for it.
    expect(section.locator('[data-drill-run="drill-boot"]')).to_have_attribute("data-status", "running")
    expect(section.locator('[data-drill-run="drill-never"]')).to_have_attribute("data-status", "queued")
    expect(section.locator('[data-drill-run="drill-boot"]')).to_contain_text("operator")  # who asked
    at_both_widths(page, "protection-drill-running")

    def ended():
        page.reload()
        return not section.locator('[data-drill-run][data-status="running"], '
                                   '[data-drill-run][data-status="queued"]').count()

    wait_until(ended, 300, "the drill to end on the page (the guest boots)", interval=1)
    passed = section.locator('[data-drill-run="drill-boot"]')
    expect(passed).to_have_attribute("data-status", "passed")
    expect(passed).to_contain_text("BOOT-MARKER: DRILL")
    run = DrillRun.objects.get(vm=booted)
    assert run.rto_s > 0 and run.requested_by == "operator"
    expect(passed).to_contain_text(f"{floatformat(run.rto_s, 1)} s")  # as the page rounds (half up)
    failed = section.locator('[data-drill-run="drill-never"]')
    expect(failed).to_have_attribute("data-status", "failed")
    expect(failed).to_contain_text("not ready for failover")
    expect(section.locator('[data-rpo="drill-boot"] [data-drill]')).to_have_attribute("data-drill", "passed")
    expect(section.locator('[data-rpo="drill-never"] [data-drill]')).to_have_attribute("data-drill", "failed")
    at_both_widths(page, "protection-drill-ended")

    # The drill's test failover, from its link: booted and ended.
    passed.locator(f"text=test failover {run.failover_id}").click()
    expect(page.locator("[data-status]")).to_have_text("ended")
    at_both_widths(page, "drill-failover")

    assert DrillRun.objects.get(vm=never).status == DrillStatus.FAILED
    assert sha256(replica) == before, "a rehearsal never writes into the replica"
    assert VMContext.of(booted).state == VMState.READY_FOR_FAILOVER
    assert destination.list_vms("oma-test-drill-") == [], "the drill ended its test"
    (entry,) = LogEntry.objects.filter(user__username="operator")
    assert (entry.object_repr, entry.change_message) == ("rehearsed", "drill started from the pages: 2 VM(s)")


"""The GUI in a real headless Chromium (Debian's, driven by Playwright), on
a live server, with a real Celery worker copying real NBD sources."""

from pathlib import Path

import pytest
from django.contrib.auth.models import User
from django.template.defaultfilters import floatformat
from playwright.sync_api import expect, sync_playwright

from replication.models import ReplicationJob
from replication.services.inventory import register_image_vm
from replication.services.jobs import start_replication
from simulators.boot_disk import boot_disk_builder
from tests.browser import (
    ARTIFACTS,
    CHROMIUM,
    CHROMIUM_FLAGS,
    DESKTOP,
    PHONE,
    SCREENS,
    WIDER_THAN_THE_VIEWPORT,
    WORDS_BROKEN_IN_CELLS,
    check_page,
    log_in,
)
from tests.helpers import (
    MiB,
    make_image,
    replica_sha256,
    sha256,
    slow_nbd_source,
    source_exports_running,
    wait_for_job,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]
def test_replicate_from_the_gui_and_watch_it_live(celery_worker_process, progress_poller, live_server, browser_page,
                                                  tmp_path, sockdir):
    page = browser_page
    images = [make_image(tmp_path / f"d{i}.img", 24 * MiB + 4097 * i, [(0, 24 * MiB)], seed=i) for i in range(2)]
    servers = [slow_nbd_source(sockdir, image, "250ms") for image in images]
    try:
        register_image_vm("gui-vm", [server.uri for server in servers])
        log_in(page, live_server)

        page.click("text=VMs")
        page.locator('[data-vm="gui-vm"] select').select_option("full")
        page.click("text=Replicate gui-vm")
        expect(page.locator("h1")).to_contain_text("Job job-")
        page.evaluate("window.__loaded_once = true")  # gone if the page reloads

        seen = set()
        bar = page.locator('[data-disk="disk-2000"] [role=progressbar]')
        dashboard_shot = False
        for _ in range(300):
            value = float(bar.get_attribute("aria-valuenow"))
            seen.add(value)
            if 0 < value < 100 and not dashboard_shot:  # the dashboard with the job in flight
                dashboard = page.context.new_page()
                dashboard.goto(f"{live_server.url}/")
                dashboard.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
                dashboard.close()
                dashboard_shot = True
            if page.locator("[data-status]").inner_text() == "completed":
                break
            page.wait_for_timeout(100)
        expect(page.locator("[data-status]")).to_have_text("completed")
        assert page.evaluate("window.__loaded_once") is True, "the page updated in place"
        for disk in ("disk-2000", "disk-2001"):
            expect(page.locator(f'[data-disk="{disk}"] [role=progressbar]')).to_have_attribute(
                "aria-valuenow", "100.0")
        assert any(0 < value < 100 for value in seen), f"the bar moved through intermediate values: {seen}"
        page.screenshot(path=str(ARTIFACTS / "job-page.png"), full_page=True)
        assert dashboard_shot
    finally:
        for server in servers:
            server.stop()
    job = ReplicationJob.objects.get(vm__name="gui-vm")
    for disk, image in zip(job.disks.order_by("disk_key"), images, strict=True):
        assert replica_sha256(disk) == sha256(image)


def test_cancel_a_running_job_from_the_gui(celery_worker_process, progress_poller, live_server, browser_page,
                                           tmp_path, sockdir):
    page = browser_page
    image = make_image(tmp_path / "slow.img", 64 * MiB, [(0, 64 * MiB)], seed=3)
    server = slow_nbd_source(sockdir, image, "300ms")
    try:
        vm = register_image_vm("gui-cancel", [server.uri])
        log_in(page, live_server)
        page.goto(f"{live_server.url}/vms/")
        page.click("text=Replicate gui-cancel")
        expect(page.locator("[data-status]")).to_have_text("replicating", timeout=20_000)
        page.click("text=Cancel job")
        expect(page.locator("[data-status]")).to_have_text("cancelled", timeout=10_000)
        page.screenshot(path=str(ARTIFACTS / "job-cancelled.png"), full_page=True)
        job = wait_for_job(vm.jobs.get().id)
        # The copy notices within a progress interval and stops; its source export goes.
        for _ in range(100):
            if not job.disks.exclude(status="cancelled").exists():
                break
            page.wait_for_timeout(100)
        assert list(job.disks.values_list("status", flat=True)) == ["cancelled"]
    finally:
        server.stop()
    assert source_exports_running() == []



def test_a_test_failover_from_the_gui_boots_and_ends(celery_worker_process, live_server, browser_page, tmp_path):
    from replication.models import FailoverJob, VMContext
    from replication.platforms import get_destination

    # VMs an interrupted earlier run left on the destination would make these failovers refuse their names.
    destination = get_destination()
    for name in destination.list_vms("oma-test-gui-boot") + destination.list_vms("oma-live-gui-boot"):
        destination.destroy(name)

    boot_disk = boot_disk_builder()
    disk = tmp_path / "boot.img"
    boot_disk.build_boot_disk(disk, "GUI")
    vm = register_image_vm("gui-boot", [str(disk)])
    job = wait_for_job(start_replication(vm).id)
    assert job.status == "completed", job.error_message
    context = VMContext.of(vm)
    context.boot_check_regex, context.boot_check_timeout_s = r"BOOT-MARKER: GUI", 180
    context.save()
    page = browser_page
    log_in(page, live_server)

    page.click("text=VMs")
    row = page.locator('[data-vm="gui-boot"]')
    expect(row.locator("[data-state]")).to_have_text("Ready for failover")
    row.locator("text=Test failover gui-boot").click()  # the confirmation is accepted
    expect(page.locator("body")).to_contain_text(f"Test failover {FailoverJob.objects.get(vm=vm).pk} of gui-boot "
                                                 "started")
    wait_until(lambda: FailoverJob.objects.get(vm=vm).status not in ("pending", "running"), 180,
               "the test failover to end (the guest boots)", interval=0.25)
    page.click("text=VMs")
    row = page.locator('[data-vm="gui-boot"]')
    expect(row.locator("[data-failover]")).to_contain_text("BOOT-MARKER: GUI")
    # Protection goes on under a test: nothing paused, the Replicate button stays.
    expect(row.locator("[data-state]")).to_have_text("Ready for failover")
    expect(row).not_to_contain_text("paused")
    expect(row.locator("text=Replicate gui-boot")).to_be_visible()
    expect(row.locator("[data-points]")).to_have_attribute("data-points", "1")
    page.screenshot(path=str(ARTIFACTS / "vm-list-test-failover.png"), full_page=True)

    row.locator("text=End test gui-boot").click()
    expect(page.locator('[data-vm="gui-boot"] [data-state]')).to_have_text("Ready for failover")
    expect(page.locator('[data-vm="gui-boot"] [data-failover]')).to_contain_text("ended")

    # Live failover: the confirmation shows every preflight check and the
    # downtime forecast (its boot part from the test just run).
    page.locator('[data-vm="gui-boot"]').locator("text=Live failover gui-boot").click()
    expect(page.locator("h1")).to_have_text("Live failover of gui-boot")
    for check in ("state", "nothing running", "recovery point", "space for the overlays", "memory", "networks"):
        expect(page.locator(f'[data-check="{check}"]')).to_have_attribute("data-ok", "yes")
    expect(page.locator('[data-check="networks"]')).to_contain_text("the VM has no NICs")
    forecast = float(page.locator("[data-forecast]").get_attribute("data-forecast"))
    assert forecast > 0
    expect(page.locator("form[data-source-lost]")).to_contain_text("no shutdown request")
    page.screenshot(path=str(ARTIFACTS / "failover-live-confirm.png"), full_page=True)
    page.click("text=Shut down gui-boot and fail over")
    # The failover's page follows its steps live, to the boot verified.
    expect(page.locator("h1")).to_contain_text("Live failover")
    expect(page.locator('[data-step="final incremental"]')).to_be_visible(timeout=120_000)
    expect(page.locator('[data-step="verify boot"][data-step-status="done"]')).to_be_visible(timeout=240_000)
    expect(page.locator("[data-status]")).to_have_text("succeeded")
    live = FailoverJob.objects.get(vm=vm, kind="live")
    live.refresh_from_db()
    assert live.status == "succeeded", live.error_message
    page.click("text=VMs")
    row = page.locator('[data-vm="gui-boot"]')
    expect(row.locator("[data-state]")).to_have_text("Failed over (live)")
    # Rounded as the page rounds (Django's floatformat rounds half up; Python's
    # format rounds the binary value: 5.85 is 5.9 on the page, 5.8 in an f-string).
    expect(row.locator(".downtime")).to_contain_text(
        f"downtime {floatformat(live.downtime_s, 1)} s (forecast {floatformat(forecast, 1)} s)")
    expect(row.locator("form[data-commit]")).to_contain_text("no rollback after it")
    page.screenshot(path=str(ARTIFACTS / "vm-list-live-failover.png"), full_page=True)
    row.locator("text=Roll back gui-boot").click()
    expect(page.locator("h1")).to_contain_text("Rollback")
    expect(page.locator('[data-step="power on source"][data-step-status="done"]')).to_be_visible(timeout=120_000)
    expect(page.locator("[data-status]")).to_have_text("succeeded")
    page.click("text=VMs")
    expect(page.locator('[data-vm="gui-boot"] [data-state]')).to_have_text("Ready for failover")


def a_job_copying(tmp_path, monkeypatch):
    """A VM with two disks whose job copies (the state a worker's progress
    leaves, without a worker), and a test failover of it with a step: what
    every page has to show at once."""
    from replication.models import FailoverJob, FailoverStep

    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    monkeypatch.setattr("replication.services.jobs.enqueue_prepare", lambda *args: None)
    images = [make_image(tmp_path / f"phone{i}.img", 90 * MiB, [(0, MiB)], seed=i) for i in range(2)]
    vm = register_image_vm("phone-vm-with-a-long-name", [str(p) for p in images])
    job = start_replication(vm)
    ReplicationJob.objects.filter(pk=job.pk).update(status="replicating", current_operation="Transfer",
                                                    bytes_transferred=18 * MiB, total_bytes=90 * MiB,
                                                    throughput_bps=3 * MiB, eta_seconds=24, progress_percent=44.0)
    job.disks.update(status="copying", bytes_done=9 * MiB, bytes_total=45 * MiB, throughput_bps=3 * MiB // 2,
                     eta_seconds=24, progress_percent=20.0, current_operation="Transfer")
    failover = FailoverJob.objects.create(vm=vm, kind="test", actor="operator", destination_vm="oma-test-phone-vm")
    FailoverStep.objects.create(failover=failover, name="preflight", detail="1 volume(s) of " + job.id)
    return vm, job, failover


def test_every_page_fits_a_phone_and_shows_progress_and_eta(live_server, tmp_path, monkeypatch):
    """At 390 px (Chromium with a phone's viewport, one job copying) no page is
    wider than the screen, and the job's progress and ETA are on it."""
    vm, job, failover = a_job_copying(tmp_path, monkeypatch)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_context(viewport=PHONE, is_mobile=True, has_touch=True).new_page()
        try:
            log_in(page, live_server)
            ARTIFACTS.mkdir(exist_ok=True)
            for name, path in [("dashboard", "/"), ("job", f"/jobs/{job.id}/"), ("vms", "/vms/"),
                               ("vm", f"/vms/{vm.pk}/"), ("volumes", "/volumes/"),
                               ("failover", f"/failovers/{failover.pk}/"), ("cloud", "/cloud/"),
                               ("sources", "/sources/"), ("protection", "/protection/")]:
                page.goto(f"{live_server.url}{path}")
                page.wait_for_load_state("networkidle")
                width = page.evaluate("document.documentElement.scrollWidth")
                page.screenshot(path=str(ARTIFACTS / f"phone-{name}.png"), full_page=True)
                assert width <= PHONE["width"], f"{name} is {width} px wide at {PHONE['width']} px"
                if name in ("dashboard", "job"):
                    bar = page.locator('[role="progressbar"]').first.bounding_box()
                    assert bar and bar["x"] >= 0 and bar["x"] + bar["width"] <= PHONE["width"], (name, bar)
                    expect(page.locator("main")).to_contain_text("20.0 % · Transfer" if name == "dashboard"
                                                                 else "20.0 % of the data")
                    expect(page.locator("main")).to_contain_text("24s")
        finally:
            browser.close()


def test_the_admins_job_list_fits_1280_px_with_data_throughput_and_created(live_server, tmp_path, monkeypatch):
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    monkeypatch.setattr("replication.services.jobs.enqueue_prepare", lambda *args: None)
    image = make_image(tmp_path / "admin.img", 90 * MiB, [(0, MiB)])
    job = start_replication(register_image_vm("admin-vm-with-a-rather-long-name", [str(image)]))
    ReplicationJob.objects.filter(pk=job.pk).update(status="replicating", current_operation="Preparing Migration",
                                                    bytes_transferred=18 * MiB, total_bytes=90 * MiB,
                                                    throughput_bps=3 * MiB)
    job.disks.update(status="copying", throughput_bps=3 * MiB)  # the list shows its copying disks' sum
    User.objects.create_superuser("admin", password="s3cret-pass")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_context(viewport={"width": 1280, "height": 800}).new_page()
        try:
            page.goto(f"{live_server.url}/admin/login/?next=/admin/replication/replicationjob/")
            page.fill("#id_username", "admin")
            page.fill("#id_password", "s3cret-pass")
            page.click("input[type=submit]")
            expect(page.locator("#result_list")).to_be_visible()
            page.screenshot(path=str(ARTIFACTS / "admin-jobs-1280.png"), full_page=True)
            assert page.evaluate("document.documentElement.scrollWidth") <= 1280
            # The list fits its own box: nothing clipped or scrolled away.
            overflow = page.evaluate("(() => { const r = document.querySelector('.results'); "
                                     "return r.scrollWidth - r.clientWidth; })()")
            assert overflow <= 0, f"the job list is {overflow} px wider than its box"
            row = page.locator("#result_list tbody tr").first
            expect(row).to_contain_text("18.0 MiB of 90.0 MiB")
            expect(row).to_contain_text("3.0 MiB/s")
            expect(page.locator("#result_list thead")).to_contain_text("Created at")
            expect(row).to_contain_text(job.created_at.astimezone().strftime("%Y-%m-%d"))
        finally:
            browser.close()


def test_an_operator_adds_a_vcenter_chooses_vms_and_adds_an_image_vm_from_the_browser(
        live_server, browser_page, vcsim_factory, tmp_path, settings):
    import subprocess

    from replication.models import VCenter, VirtualMachine
    from simulators.vcenter import vm_spec

    settings.OMA_SECRETS_DIR = tmp_path / "secrets"
    settings.OMA_SECRETS_DIR.mkdir()
    sim = vcsim_factory({"vms": [vm_spec("web01", [MiB]), vm_spec("db01", [2 * MiB])]})
    secrets_before = set(settings.OMA_SECRETS_DIR.iterdir())  # the simulator's own password file
    page = browser_page
    log_in(page, live_server)
    page.click("text=Sources")

    # The certificate is fetched and shown; the operator trusts it and gives the login.
    page.fill('input[name="host"]', sim.host)
    page.fill('input[name="port"]', str(sim.port))
    page.click("text=Fetch its certificate")
    expect(page.locator("[data-thumbprint]")).to_have_text(sim.thumbprint)
    page.fill('input[name="name"]', "vc-gui")
    page.fill('input[name="user"]', sim.username)
    page.fill('input[name="password"]', "not-the-password")
    page.click("text=Trust this certificate and add the vCenter")
    expect(page.locator('[data-error="vcenter"]')).to_contain_text("refused the login")
    assert not VCenter.objects.filter(name="vc-gui").exists()
    assert set(settings.OMA_SECRETS_DIR.iterdir()) == secrets_before, "a refused login stores no password"
    page.fill('input[name="password"]', sim.password)
    page.click("text=Trust this certificate and add the vCenter")
    expect(page.locator("h1")).to_have_text("VMs of vc-gui")
    SCREENS.mkdir(parents=True, exist_ok=True)
    findings = []
    check_page(page, live_server, "vcenter-inventory", page.viewport_size["width"], findings)
    assert not findings, "\n".join(findings)
    vcenter = VCenter.objects.get(name="vc-gui")
    assert vcenter.thumbprint == sim.thumbprint and sim.password not in page.content()
    secret = Path(vcenter.password_file)
    assert secret.read_text() == sim.password and secret.stat().st_mode & 0o777 == 0o600

    # Of the two VMs, the operator protects one.
    expect(page.locator('[data-vm="db01"]')).to_contain_text("2.0 MiB")
    page.check('input[aria-label="protect web01"]')
    page.click("text=Protect the chosen VMs")
    expect(page.locator("body")).to_contain_text("1 VM(s) of vc-gui protected: web01")
    assert list(VirtualMachine.objects.filter(vcenter=vcenter).values_list("name", flat=True)) == ["web01"]

    # An image VM goes through add_vm's checks: a vmdk is refused with the reason, a raw image is taken.
    vmdk = tmp_path / "disk.vmdk"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", str(vmdk), "8M"], check=True)
    page.click("text=Sources")
    page.fill('form:has(input[value="image"]) input[name="name"]', "img-gui")
    page.fill('textarea[name="disks"]', str(vmdk))
    page.click("text=Add the VM")
    expect(page.locator('[data-error="image"]')).to_contain_text("is vmdk, neither raw nor qcow2")
    raw = make_image(tmp_path / "disk.img", 3 * MiB, [(0, MiB)])
    page.fill('textarea[name="disks"]', str(raw))
    page.click("text=Add the VM")
    expect(page.locator('[data-vm="img-gui"]')).to_contain_text("3.0 MiB")
    page.set_viewport_size(PHONE)
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]


def test_recovery_point_ages_on_the_pages_match_the_database_and_over_target_is_marked(live_server, browser_page,
                                                                                       tmp_path, monkeypatch):
    """Two VMs of a group with a 1 h target: one cycle 10 minutes old, one 3
    hours old (over). The protection page, the VMs page and the dashboard show
    the ages the database gives, and mark the one over its target."""
    from django.utils import timezone

    from replication.services import rpo, scheduler

    monkeypatch.setattr("replication.services.jobs.enqueue_prepare", lambda *args: None)
    group = scheduler.create_group("gold", rpo_target_s=3600, max_concurrent=2)
    ages = {"rpo-fresh": 600, "rpo-stale": 3 * 3600}
    for name, age in ages.items():
        vm = register_image_vm(name, [str(make_image(tmp_path / f"{name}.img", MiB, [(0, MiB)]))])
        scheduler.add_vms(group, [vm])
        job = start_replication(vm)
        ReplicationJob.objects.filter(pk=job.pk).update(
            status="completed", recovery_point_at=timezone.now() - timezone.timedelta(seconds=age),
            completed_at=timezone.now())
    page = browser_page
    log_in(page, live_server)
    expected = {point.vm.name: point for point in rpo.recovery_points()}
    for path in ("/protection/", "/vms/", "/"):
        page.goto(f"{live_server.url}{path}")
        for name, point in expected.items():
            row = page.locator(f'[data-rpo="{name}"]')
            shown = float(row.locator("[data-age]").first.get_attribute("data-age"))
            # The page was rendered a moment after `expected` was read.
            assert point.age_s <= shown <= point.age_s + 30, (path, name, shown, point.age_s)
            assert (row.locator("[data-over]").count() > 0) == point.over_target, (path, name)
        page.screenshot(path=str(ARTIFACTS / f"rpo{path.strip('/').replace('/', '-') or '-dashboard'}.png"),
                        full_page=True)
    assert expected["rpo-stale"].over_target and not expected["rpo-fresh"].over_target
    page.goto(f"{live_server.url}/protection/")
    expect(page.locator("[data-over-target]")).to_contain_text("1 VM over its recovery point target: rpo-stale")


def test_open_a_vm_page_from_the_vms_table(live_server, browser_page, tmp_path):
    from django.utils import timezone

    from replication.models import RecoveryPoint

    images = [make_image(tmp_path / f"p{i}.img", 2 * MiB, [(0, MiB)], seed=i) for i in range(2)]
    vm = register_image_vm("page-vm", [str(image) for image in images])
    register_image_vm("other-vm", [str(images[0])])
    job = start_replication(vm)
    at = timezone.now() - timezone.timedelta(minutes=5)
    ReplicationJob.objects.filter(pk=job.pk).update(status="completed", recovery_point_at=at, started_at=at,
                                                    completed_at=at, bytes_transferred=2 * MiB, total_bytes=2 * MiB)
    RecoveryPoint.objects.create(vm=vm, job=job, frozen_at=at, changed_bytes=MiB)
    page = browser_page
    log_in(page, live_server, role="viewer")
    page.goto(f"{live_server.url}/vms/")
    page.fill("#vm-q", "page-")
    page.click("[data-vm-search] button[type=submit]")
    expect(page.locator("tr[data-vm]")).to_have_count(1)
    assert "q=page-" in page.url
    page.screenshot(path=str(ARTIFACTS / "vm-list-search.png"), full_page=True)
    page.click("text=page-vm")
    page.wait_for_url(f"{live_server.url}/vms/{vm.pk}/")
    expect(page.locator("h1")).to_contain_text("page-vm")
    expect(page.locator("[data-disk-label]")).to_have_text(["Disk 1", "Disk 2"])
    expect(page.locator("[data-disk] [data-locator]").first).to_have_text(vm.disks.order_by("disk_key")[0].locator)
    expect(page.locator(f'[data-point="{vm.recovery_points.get().pk}"] [data-point-retention]')).to_have_text(
        "kept by the policy")
    expect(page.locator("[data-hardware] tbody tr")).to_have_count(6)
    page.screenshot(path=str(ARTIFACTS / "vm-page.png"), full_page=True)
    page.click(f'[data-cycle="{job.id}"] a')
    page.wait_for_url(f"{live_server.url}/jobs/{job.id}/")
    expect(page.locator("[data-status]")).to_have_text("completed")
def admin_pages(job):
    """The Django admin's pages an administrator opens most."""
    from replication.models import Agent

    Agent.objects.get_or_create(name="local")
    return [("admin", "/admin/"), ("admin-jobs", "/admin/replication/replicationjob/"),
            ("admin-vms", "/admin/replication/virtualmachine/"),
            ("admin-job", f"/admin/replication/replicationjob/{job.pk}/change/"),
            ("admin-agents", "/admin/replication/agent/")]


def test_a_walk_over_every_page_at_desktop_and_phone_widths(live_server, tmp_path, monkeypatch):
    """Every page (a job copying, a failover, a protection group), the
    admin's main ones included, at 1280 and 390 px: nothing wider than the screen, no table word broken mid-word at
    1280 px, and no serious or critical axe-core finding. Screenshots go to
    test-artifacts/screens/."""
    from replication.services import scheduler

    vm, job, failover = a_job_copying(tmp_path, monkeypatch)
    scheduler.add_vms(scheduler.create_group("gold", rpo_target_s=3600, max_concurrent=2), [vm])
    SCREENS.mkdir(parents=True, exist_ok=True)
    pages = [("dashboard", "/"), ("job", f"/jobs/{job.id}/"), ("vms", "/vms/"), ("volumes", "/volumes/"),
             ("failover", f"/failovers/{failover.pk}/"), ("live-failover", f"/vms/{vm.pk}/failover/live/"),
             ("protection", "/protection/"), ("sources", "/sources/"), ("agents", "/agents/"), ("cloud", "/cloud/"),
             ("vm", f"/vms/{vm.pk}/"), ("vm-settings", f"/vms/{vm.pk}/settings/"),
             ("group-new", "/protection/groups/new/"), ("cloud-edit", "/cloud/edit/"), ("tokens", "/tokens/")]
    findings = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            # The checks themselves catch what they look for: a word squeezed
            # into a narrow cell, an element sticking out.
            page = browser.new_context(viewport=DESKTOP).new_page()
            page.goto(f"{live_server.url}/login/")
            page.evaluate("""() => {
              const main = document.querySelector("main"), table = document.createElement("table");
              table.innerHTML = "<tbody><tr><td>Completed</td><td>Transfer</td></tr></tbody>";
              table.querySelectorAll("td").forEach((td) => {
                td.style.width = "3em";
                td.style.wordBreak = "break-all";
              });
              const wide = document.createElement("div");
              wide.style.width = "2000px";
              wide.id = "too-wide";
              main.append(table, wide);
            }""")
            broken = page.evaluate(WORDS_BROKEN_IN_CELLS)
            assert any('"Completed"' in e for e in broken) and any('"Transfer"' in e for e in broken), broken
            assert any("div#too-wide" in e for e in page.evaluate(WIDER_THAN_THE_VIEWPORT))
            page.context.close()
            for viewport, phone in ((DESKTOP, False), (PHONE, True)):
                page = browser.new_context(viewport=viewport, is_mobile=phone, has_touch=phone).new_page()
                width = viewport["width"]
                page.goto(f"{live_server.url}/login/")
                check_page(page, live_server, "login", width, findings)
                log_in(page, live_server)
                for name, path in pages:
                    page.goto(f"{live_server.url}{path}")
                    expect(page.locator("h1")).to_be_visible()
                    if path != "/" and not path.startswith("/admin/"):
                        link = page.locator("header nav [aria-current=page]")
                        expect(link).to_have_count(1 if name in ("vms", "volumes", "protection", "sources",
                                                                  "agents", "cloud", "live-failover", "vm",
                                                                  "vm-settings", "group-new", "cloud-edit",
                                                                  "tokens") else 0)
                    check_page(page, live_server, name, width, findings)
                if phone:  # the menu folds behind its button and opens on a tap
                    nav_height = page.locator("header").bounding_box()["height"]
                    assert nav_height < PHONE["height"] / 8, f"the phone's navbar is {nav_height} px high"
                    page.click("header .navbar-toggler")
                    expect(page.locator("#main-nav")).to_be_visible()
                    expect(page.locator("#main-nav >> text=Protection")).to_be_visible()
                for name, path in admin_pages(job):
                    page.goto(f"{live_server.url}{path}")
                    expect(page.locator("h1")).to_be_visible()
                    check_page(page, live_server, name, width, findings)
                page.context.close()
        finally:
            browser.close()
    assert not findings, "\n".join(findings)


def test_a_destructive_action_asks_first_even_in_a_refreshed_fragment(live_server, tmp_path, monkeypatch):
    """Confirmations come from console.js (the CSP blocks inline handlers): the
    operator is asked, dismissing changes nothing, and a form a live
    refresh brought in asks as well."""
    vm, job, failover = a_job_copying(tmp_path, monkeypatch)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_context(viewport=DESKTOP).new_page()
            log_in(page, live_server)
            page.goto(f"{live_server.url}/jobs/{job.id}/")
            asked = []
            page.once("dialog", lambda dialog: (asked.append(dialog.message), dialog.dismiss()))
            page.click("text=Cancel job")
            assert asked == [f"Cancel job {job.id}?"]
            # The fragment refreshes in place: its new form is asked for too.
            page.evaluate("window.__first = document.querySelector('form[data-confirm]')")
            page.wait_for_function("() => !document.contains(window.__first)")
            job.refresh_from_db()
            assert job.status == "replicating", "a dismissed confirmation cancels nothing"
            page.once("dialog", lambda dialog: (asked.append(dialog.message), dialog.accept()))
            page.click("text=Cancel job")
            expect(page.locator("[data-status]")).to_have_text("cancelled")
            assert len(asked) == 2
        finally:
            browser.close()

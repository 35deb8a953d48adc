"""The live pages (htmx polling a fragment) and the operator's time zone in
a real headless Chromium: a job's page follows the database without a
reload, says when it has lost the server, polls on and recovers, and reloads
to the login when the session ends; times come in the zone the browser runs
in, on the pages and in the admin."""

import re
from datetime import UTC, datetime

import pytest
from playwright.sync_api import expect, sync_playwright

from replication.models import ReplicationJob
from tests.browser import CHROMIUM, CHROMIUM_FLAGS, DESKTOP, PHONE, log_in
from tests.test_browser import a_job_copying

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def test_a_live_page_follows_the_server_says_when_it_is_lost_and_recovers(live_server, tmp_path, monkeypatch):
    vm, job, failover = a_job_copying(tmp_path, monkeypatch)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            context = browser.new_context(viewport=PHONE, is_mobile=True, has_touch=True)
            page = context.new_page()
            refused = []  # what the CSP blocked: htmx is configured to need no inline style, script or eval
            page.on("console", lambda m: refused.append(m.text) if "Content Security Policy" in m.text else None)
            log_in(page, live_server)
            page.goto(f"{live_server.url}/jobs/{job.id}/")
            banner, error = page.locator("#live-status"), page.locator("#job [data-error]")
            expect(banner).to_be_hidden()
            page.evaluate("window.__first = document.querySelector('#job table')")

            # The fragment is swapped in place, its cells labelled for the phone's stacked rows.
            ReplicationJob.objects.filter(pk=job.pk).update(error_message="first reason")
            expect(error).to_have_text("first reason")
            assert page.evaluate("() => !document.contains(window.__first)"), "the table is the refreshed one"
            labels = page.locator("#job table tbody tr").first.locator("td")
            expect(labels.first).to_have_attribute("data-label", "Disk")
            expect(labels.nth(2)).to_have_attribute("data-label", "Status")

            # The server out of reach: the banner says so, the page keeps what it had, polling goes on.
            context.set_offline(True)
            expect(banner).to_be_visible()
            expect(banner).to_have_text("Lost contact with the server; retrying…")
            ReplicationJob.objects.filter(pk=job.pk).update(error_message="second reason")
            expect(error).to_have_text("first reason")
            context.set_offline(False)
            expect(error).to_have_text("second reason")
            expect(banner).to_be_hidden()

            # The session ends: the next poll reloads the page, which goes to the login.
            context.clear_cookies()
            expect(page).to_have_url(re.compile(rf"/login/\?next=/jobs/{job.id}/$"))
            assert not refused, refused
        finally:
            browser.close()


def test_times_are_in_the_browsers_zone_on_pages_and_in_the_admin(live_server, tmp_path, monkeypatch, settings):
    """TIME_ZONE_DISPLAY is UTC; a browser in New York sees New York's time,
    with its abbreviation, on the job's page and in the admin; one in Tokyo
    that goes straight to the admin sees Tokyo's."""
    settings.TIME_ZONE_DISPLAY = "UTC"
    vm, job, failover = a_job_copying(tmp_path, monkeypatch)
    ReplicationJob.objects.filter(pk=job.pk).update(created_at=datetime(2026, 1, 15, 12, 30, tzinfo=UTC))
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_context(viewport=DESKTOP, timezone_id="America/New_York").new_page()
            log_in(page, live_server)  # the login page has told the server the zone
            assert {c["name"]: c["value"] for c in page.context.cookies()}["tz"] == "America/New_York"
            page.goto(f"{live_server.url}/jobs/{job.id}/")
            created = page.locator("#job dt", has_text="Created").locator("xpath=following-sibling::dd[1]")
            expect(created).to_have_text("2026-01-15 07:30:00 EST")
            page.goto(f"{live_server.url}/admin/replication/replicationjob/{job.pk}/change/")
            expect(page.locator(".field-created_at .readonly")).to_have_text("2026-01-15 07:30:00 EST")
            # The admin tells the zone too, for an operator who goes there first.
            page = browser.new_context(viewport=DESKTOP, timezone_id="Asia/Tokyo").new_page()
            page.goto(f"{live_server.url}/admin/login/")
            page.fill("#id_username", "administrator")
            page.fill("#id_password", "s3cret-pass")
            page.click("input[type=submit]")
            page.goto(f"{live_server.url}/admin/replication/replicationjob/{job.pk}/change/")
            expect(page.locator(".field-created_at .readonly")).to_have_text("2026-01-15 21:30:00 JST")
        finally:
            browser.close()

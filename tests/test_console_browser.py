"""The console in a real headless Chromium against a real daemon on 127.0.0.1 (S15).

Log in (keyboard only), change the proxy URL and see it in the API, toggle SSL
verification and decline/accept the confirmation (asked once per browser
session), add an invalid CIDR and see the error next to the field, enable
metrics with a template and see the scrape; narrow (390 px) layout; a viewer's
console cannot change provider settings.  Screenshots: tests/artifacts/.
"""

from __future__ import annotations

import json
import re

import pytest_twisted
import treq
from playwright.sync_api import expect

from tests.authhelpers import call, create_user
from tests.browser import Browser, require_browser, screenshot

SSL_WARNING = ("Disabling SSL verification is a security risk. Only do this if you have a "
               "self-signed certificate or are behind a corporate proxy. Continue?")
PASSWORD = "correct horse battery"


@pytest_twisted.async_yield_fixture
async def browser():
    require_browser()
    instance = await Browser().start()
    yield instance
    await instance.stop()


async def provider_config(daemon):
    response, body = await call(daemon, "GET", "/api/cloud/providers/replicate", key=daemon.admin_key)
    assert response.code == 200, body
    return body["config"]


# -- browser steps (run on the browser thread) --------------------------------------------

def open_and_login_with_keyboard(browser, url, username, width=1280, height=900):
    page = browser.new_page(width, height)
    page.goto(url + "/")
    page.get_by_label("Username").wait_for()
    screenshot(page, f"login-{width}.png")
    # Keyboard only: the username field has focus; Tab to the password; Enter submits.
    assert page.evaluate("document.activeElement.id") == "login-username"
    page.keyboard.type(username)
    page.keyboard.press("Tab")
    page.keyboard.type(PASSWORD)
    page.keyboard.press("Enter")
    page.get_by_role("link", name="Jobs").wait_for()
    page.get_by_text(f"{username} (").wait_for()
    return page


def open_advanced_configuration(page):
    page.get_by_role("link", name="Cloud").click()
    page.get_by_role("link", name="Advanced Configuration").click()
    expect(page.locator("#provider-select")).to_have_value("replicate")
    expect(page.get_by_label("HTTP Timeout")).not_to_have_value("")


def change_proxy_url(page, value):
    field = page.get_by_label("Proxy URL")
    field.fill(value)
    field.press("Tab")
    page.get_by_text("Saved Proxy URL.").wait_for()
    screenshot(page, "advanced-configuration-proxy.png")


def toggle_ssl(page, answer):
    """Click SSL Verification; answer the confirmation (if any) with ``answer``;
    return the dialog messages seen."""
    seen = []

    def on_dialog(dialog):
        seen.append((dialog.type, dialog.message))
        if answer:
            dialog.accept()
        else:
            dialog.dismiss()

    page.evaluate("document.getElementById('provider-saved').textContent = ''")
    page.on("dialog", on_dialog)
    try:
        toggle = page.get_by_role("switch", name="SSL Verification")
        toggle.click()
        expect(page.locator("#provider-saved")).to_have_text(
            re.compile(r"^(Saved SSL Verification\.|SSL Verification left on\.)$"))
        checked = toggle.is_checked()
    finally:
        page.remove_listener("dialog", on_dialog)
    return seen, checked


def invalid_cidr(page):
    field = page.get_by_label("Webhook Security")
    field.fill("10.0.0.0/8\nnot-a-cidr/99")
    field.press("Tab")
    error = page.locator("#webhook_allowed_ips-error")
    expect(error).to_have_text(re.compile(r"\S"))
    expect(field).to_have_attribute("aria-invalid", "true")
    screenshot(page, "advanced-configuration-invalid-cidr.png")
    return {
        "invalid": field.get_attribute("aria-invalid"),
        "describedby": field.get_attribute("aria-describedby"),
        "error": error.text_content(),
        "error_near_field": page.evaluate(
            "document.getElementById('webhook_allowed_ips').parentElement.contains("
            "document.getElementById('webhook_allowed_ips-error'))"),
    }


def enable_metrics(page):
    page.get_by_role("link", name="Admin").click()
    page.get_by_role("link", name="Metrics").click()
    page.get_by_role("button", name="Standard").click()
    page.get_by_text("Applied the standard template.").wait_for()
    enable = page.get_by_role("switch", name="Enable Prometheus metrics")
    if not enable.is_checked():
        enable.click()
        page.get_by_text("Saved metrics settings.").wait_for()
    page.get_by_role("button", name="Preview").click()
    expect(page.locator("#metrics-preview")).to_have_text(re.compile(r"\S"))
    screenshot(page, "admin-metrics.png")
    return page.locator("#metrics-preview").text_content()


def narrow_layout(page):
    result = {}
    for view in ("#jobs", "#cloud/advanced", "#admin/metrics", "#health"):
        page.evaluate(f"location.hash = '{view}'")
        page.wait_for_timeout(300)
        result[view] = page.evaluate(
            "document.documentElement.scrollWidth <= window.innerWidth + 1")
        screenshot(page, "narrow-" + view.strip("#").replace("/", "-") + ".png")
    return result


def viewer_console(page):
    page.get_by_role("link", name="Cloud").click()
    page.get_by_text("Reading provider settings needs the operator role").wait_for()
    page.get_by_role("link", name="Admin").click()
    page.get_by_text("This section needs the admin role.").wait_for()
    screenshot(page, "viewer-admin-denied.png")
    return True


def wait_for_live_updates(page):
    page.get_by_role("link", name="Jobs").click()
    expect(page.locator("#jobs-live")).to_have_text("Live updates on.")


def job_row_text(page, job_id):
    row = page.locator(f"tr[data-job-id='{job_id}']")
    expect(row).to_be_visible()
    expect(row.locator("td.status")).to_have_text("running")
    screenshot(page, "jobs-live.png")
    return row.inner_text()


def operator_sees_read_only_settings(page):
    open_advanced_configuration(page)
    expect(page.locator("#provider-saved")).to_have_text(re.compile("Read only"))
    expect(page.get_by_label("Proxy URL")).to_be_disabled()
    expect(page.get_by_role("switch", name="SSL Verification")).to_be_disabled()
    page.get_by_role("link", name="Admin").click()
    page.get_by_text("This section needs the admin role.").wait_for()
    return True


def progress_text(page, job_id):
    cell = page.locator(f"tr[data-job-id='{job_id}'] td.progress-cell")
    # No event is sent for bytes: the console polls progress of active jobs.
    expect(cell).to_have_text(re.compile(r"1 object\(s\), .*1 uploading"), timeout=20000)
    return cell.inner_text()


def close_page(page):
    messages = list(page.console_messages)
    page.context.close()
    return messages


# -- the tests ----------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_console_login_proxy_ssl_toggle_and_field_errors(daemon, browser):
    await create_user(daemon, "alice", "admin", PASSWORD)
    page = await browser.run(open_and_login_with_keyboard, browser, daemon.url, "alice")
    await browser.run(open_advanced_configuration, page)

    # Proxy URL saved on change, visible in the API.
    await browser.run(change_proxy_url, page, "http://127.0.0.1:3128")
    assert (await provider_config(daemon))["proxy_url"] == "http://127.0.0.1:3128"

    # SSL verification: declining keeps it on (nothing saved) ...
    assert (await provider_config(daemon))["ssl_verify"] is True
    seen, checked = await browser.run(toggle_ssl, page, False)
    assert seen == [("confirm", SSL_WARNING)] and checked is True
    assert (await provider_config(daemon))["ssl_verify"] is True
    # ... accepting turns it off ...
    seen, checked = await browser.run(toggle_ssl, page, True)
    assert seen == [("confirm", SSL_WARNING)] and checked is False
    assert (await provider_config(daemon))["ssl_verify"] is False
    # ... turning it back on asks nothing, and disabling again in this browser
    # session does not ask a second time.
    seen, checked = await browser.run(toggle_ssl, page, False)
    assert seen == [] and checked is True
    assert (await provider_config(daemon))["ssl_verify"] is True
    seen, checked = await browser.run(toggle_ssl, page, False)
    assert seen == [] and checked is False
    assert (await provider_config(daemon))["ssl_verify"] is False

    # An invalid CIDR: the error sits next to the field and nothing is saved.
    result = await browser.run(invalid_cidr, page)
    assert result["invalid"] == "true"
    assert "webhook_allowed_ips-error" in result["describedby"].split()
    assert result["error_near_field"] is True
    assert "webhook_allowed_ips" in result["error"] or "CIDR" in result["error"] or "not-a-cidr" in result["error"]
    assert (await provider_config(daemon))["webhook_allowed_ips"] == []

    messages = await browser.run(close_page, page)
    assert not [m for m in messages if m.startswith("pageerror")], messages


@pytest_twisted.ensureDeferred
async def test_console_a_new_browser_session_asks_again(daemon, browser):
    await create_user(daemon, "bob", "admin", PASSWORD)
    for _ in range(2):
        page = await browser.run(open_and_login_with_keyboard, browser, daemon.url, "bob")
        await browser.run(open_advanced_configuration, page)
        if not (await provider_config(daemon))["ssl_verify"]:
            await call(daemon, "PUT", "/api/cloud/providers/replicate", {"ssl_verify": True},
                       key=daemon.admin_key)
            await browser.run(page.reload)
            await browser.run(open_advanced_configuration, page)
        seen, checked = await browser.run(toggle_ssl, page, True)
        assert seen == [("confirm", SSL_WARNING)] and checked is False
        await browser.run(close_page, page)


@pytest_twisted.ensureDeferred
async def test_console_enables_metrics_with_a_template_and_the_scrape_works(daemon, browser):
    routes = {template for template, *_ in daemon.service.root.routes()}
    assert "/api/cloud/metrics/config" in routes, \
        "the metrics configuration API (S10) is not registered"
    await create_user(daemon, "carol", "admin", PASSWORD)
    page = await browser.run(open_and_login_with_keyboard, browser, daemon.url, "carol")
    preview = await browser.run(enable_metrics, page)
    assert "simpletuner_" in preview
    response = await treq.get(daemon.url + "/api/cloud/metrics/prometheus")
    text = (await response.content()).decode()
    assert response.code == 200, text
    assert "simpletuner_jobs_total" in text and "simpletuner_http_requests_total" in text
    response, config = await call(daemon, "GET", "/api/cloud/metrics/config", key=daemon.admin_key)
    flat = json.dumps(config)
    assert '"prometheus_enabled": true' in flat
    await browser.run(close_page, page)


@pytest_twisted.ensureDeferred
async def test_console_at_390px_and_only_admins_can_change_settings(daemon, browser):
    await create_user(daemon, "dora", "admin", PASSWORD)
    await create_user(daemon, "viv", "viewer", PASSWORD)
    page = await browser.run(open_and_login_with_keyboard, browser, daemon.url, "dora", 390, 844)
    fits = await browser.run(narrow_layout, page)
    assert all(fits.values()), fits
    await browser.run(close_page, page)

    page = await browser.run(open_and_login_with_keyboard, browser, daemon.url, "viv")
    assert await browser.run(viewer_console, page)
    await browser.run(close_page, page)
    before = await provider_config(daemon)
    assert before["proxy_url"] == ""

    await create_user(daemon, "otis", "operator", PASSWORD)
    page = await browser.run(open_and_login_with_keyboard, browser, daemon.url, "otis")
    assert await browser.run(operator_sees_read_only_settings, page)
    await browser.run(close_page, page)



@pytest_twisted.ensureDeferred
async def test_jobs_list_updates_live_from_the_event_stream(daemon, browser):
    from stdaemon.jobs import store as jobs_store

    await create_user(daemon, "erin", "operator", PASSWORD)
    page = await browser.run(open_and_login_with_keyboard, browser, daemon.url, "erin")
    await browser.run(wait_for_live_updates, page)
    now = daemon.ctx.now()
    job, _ = await daemon.ctx.db.run_write(jobs_store.create_or_get, {
        "job_id": "livejob0001", "provider": "replicate", "status": "running", "config_name": "flux-lora",
        "created_at": now, "cost_usd": 1.25, "hardware_type": "h100", "user_id": None,
        "metadata": {"hardware_profile": "h100"}}, now)
    daemon.ctx.events.publish(job)  # no reload, no click: the stream brings it in
    text = await browser.run(job_row_text, page, "livejob0001")
    assert "flux-lora" in text and "1.2500" in text and "h100" in text
    # Upload progress from the storage capability's real tracker.
    progress = daemon.ctx.upload_progress
    done = progress.start("livejob0001", "outputs/model-1.safetensors")
    progress.add("livejob0001", done, 2 * 1024 * 1024)
    progress.finish("livejob0001", done, stored_bytes=2 * 1024 * 1024, object_completed=True)
    uploading = progress.start("livejob0001", "outputs/model-2.safetensors")
    progress.add("livejob0001", uploading, 512 * 1024)
    shown = await browser.run(progress_text, page, "livejob0001")
    assert "2.5 MiB" in shown  # stored plus in flight
    await browser.run(close_page, page)

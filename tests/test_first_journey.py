"""The first day of a SimpleTuner user, end to end (issue 13 "Done when"): a real
``twistd -n stdaemon`` process on a fresh state directory, its one-time setup link
opened in a real headless Chromium to set the admin password, the Replicate token
set in the console's Cloud tab, a config saved with ``PUT /api/configs/x`` and
``POST /api/cloud/jobs/submit {"config_name_to_load": "x"}`` creating a prediction
at the TLS fake Replicate with the newest version of
``simpletuner/advanced-trainer-h100`` -- no version configured anywhere.

Also: "Sign in with API key" and the write-only token field (source shown,
removal) on an in-process daemon.  Screenshots: tests/artifacts/.
"""

from __future__ import annotations

import json
import os
import re

import pytest_twisted
import treq
import yaml
from playwright.sync_api import expect
from twisted.internet import reactor, task

from tests.authhelpers import call
from tests.browser import screenshot
from tests.test_console_browser import browser  # noqa: F401 (fixture: a headless Chromium)
from tests.fake_replicate import FakeReplicate
from tests.test_process import Daemon

H100 = "simpletuner/advanced-trainer-h100"
PASSWORD = "first day password"


# -- browser steps (browser thread) --------------------------------------------------------

def first_sign_in(browser, setup_url):
    page = browser.new_page()
    page.goto(setup_url)
    expect(page.get_by_role("heading", name="Set the admin password")).to_be_visible()
    expect(page.locator("#setup-intro")).to_contain_text("admin")
    assert "setup=" not in page.url  # the token left the address bar
    page.get_by_label("New password").fill(PASSWORD)
    page.get_by_label("Repeat password").fill(PASSWORD)
    screenshot(page, "first-sign-in.png")
    page.get_by_role("button", name="Set password and sign in").click()
    page.get_by_text("admin (admin)").wait_for()
    page.get_by_role("link", name="Jobs").wait_for()
    return page


def set_token_in_console(page, token):
    page.get_by_role("link", name="Cloud").click()
    page.get_by_role("link", name="Advanced Configuration").click()
    expect(page.locator("#token-status")).to_have_text("No token is configured.")
    field = page.get_by_label("Replicate API Token")
    expect(field).to_have_attribute("type", "password")
    field.fill(token)
    page.get_by_role("button", name="Save token").click()
    expect(page.locator("#token-status")).to_have_text("A token is configured (source: file).")
    expect(field).to_have_value("")  # write-only
    screenshot(page, "console-token-saved.png")
    return page.content()


def reopen_used_link(browser, setup_url):
    page = browser.new_page()
    page.goto(setup_url)
    expect(page.locator("#login-error")).to_contain_text("used already or has expired")
    expect(page.get_by_label("Username")).to_be_visible()
    page.context.close()


def sign_in_with_api_key(browser, url, key):
    page = browser.new_page()
    page.goto(url + "/")
    page.get_by_role("heading", name="Sign in with API key").wait_for()
    page.get_by_label("API key").fill("st_not-a-real-key")
    page.get_by_role("button", name="Sign in with API key").click()
    expect(page.locator("#key-login-error")).to_have_text("Invalid or revoked API key.")
    expect(page.get_by_label("API key")).to_have_attribute("aria-invalid", "true")
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in with API key").click()
    page.get_by_text("admin (admin)").wait_for()
    screenshot(page, "sign-in-with-api-key.png")
    return page


def token_from_env_and_removal(page):
    page.get_by_role("link", name="Cloud").click()
    page.get_by_role("link", name="Advanced Configuration").click()
    expect(page.locator("#token-status")).to_have_text("A token is configured (source: file).")
    page.get_by_role("button", name="Remove token").click()
    expect(page.locator("#token-status")).to_have_text("No token is configured.")
    expect(page.get_by_role("button", name="Remove token")).to_be_disabled()
    # An empty save is refused next to the field.
    page.get_by_role("button", name="Save token").click()
    field = page.get_by_label("Replicate API Token")
    expect(field).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#provider_token-error")).to_have_text("Enter the API token.")
    messages = list(page.console_messages)
    page.context.close()
    return messages


# -- helpers -------------------------------------------------------------------------------

async def wait_for(predicate, timeout=30.0, what="condition"):
    for _ in range(int(timeout / 0.1)):
        value = predicate()
        if value:
            return value
        await task.deferLater(reactor, 0.1, lambda: None)
    raise AssertionError(f"timed out waiting for {what}")


async def wait_ready(daemon):
    async def probe():
        try:
            response = await treq.get(daemon.url + "/api/cloud/health/ready", timeout=2)
            await response.content()
            return response.code == 200
        except Exception:
            return False

    for _ in range(300):
        if daemon.proc.poll() is not None:
            raise AssertionError(f"daemon exited early:\n{daemon.output()}")
        if await probe():
            return
        await task.deferLater(reactor, 0.1, lambda: None)
    raise AssertionError(f"daemon not ready:\n{daemon.output()}")


async def api(daemon, key, method, path, body=None):
    headers = {"X-API-Key": key, "Content-Type": "application/json"}
    response = await treq.request(method, daemon.url + path, headers=headers,
                                  data=None if body is None else json.dumps(body).encode())
    text = await response.text()
    return response.code, (json.loads(text) if text else None)


# -- the tests -----------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_fresh_install_to_first_prediction_with_simpletuners_own_requests(tmp_path, browser):
    from tests.services import free_port

    fake = await FakeReplicate(reactor).start()
    bundle = fake.write_ca_bundle(tmp_path / "replicate-ca.pem")
    port = free_port()
    config = tmp_path / "stdaemon.yaml"
    # Only where Replicate and the daemon are reachable: no token, no model version.
    config.write_text(yaml.safe_dump({
        "server": {"public_url": f"http://127.0.0.1:{port}"},
        "providers": {"replicate": {"api_base_url": fake.url, "ssl_ca_bundle": bundle}}}))
    home = tmp_path / "home"
    home.mkdir()
    daemon = _spawn_on(tmp_path, port, home, config)
    try:
        await wait_ready(daemon)
        log_text = daemon.output()
        match = re.search(r"(http://127\.0\.0\.1:\d+/console/#setup=[A-Za-z0-9_-]+)", log_text)
        assert match, log_text
        setup_url = match.group(1)
        assert setup_url.startswith(daemon.url)

        page = await browser.run(first_sign_in, browser, setup_url)
        await browser.run(set_token_in_console, page, fake.state.token)
        await browser.run(lambda p: p.context.close(), page)
        await browser.run(reopen_used_link, browser, setup_url)

        secrets_file = os.path.join(daemon.state, "secrets.json")
        assert oct(os.stat(secrets_file).st_mode & 0o777) == "0o600"
        assert fake.state.token not in daemon.output()  # never logged

        with open(os.path.join(daemon.state, "config", "cloud", "admin.key")) as fh:
            key = fh.read().strip()
        code, body = await api(daemon, key, "PUT", "/api/configs/x", {
            "config": {"model_family": "flux", "model_type": "lora", "max_train_steps": 500},
            "dataloader_config": [{"id": "pics", "type": "local", "instance_data_dir": "/data"}]})
        assert code == 201, body
        # Exactly what `simpletuner cloud submit x` sends.
        code, body = await api(daemon, key, "POST", "/api/cloud/jobs/submit?provider=replicate",
                               {"config_name_to_load": "x"})
        assert code == 200 and body["success"] is True, body
        sent = fake.state.requests_to("POST", "/v1/predictions")
        assert len(sent) == 1
        assert sent[0].body["version"] == f"{H100}:{fake.state.newest_version(H100)['id']}"
        assert json.loads(sent[0].body["input"]["config_json"])["max_train_steps"] == 500
        assert sent[0].headers["authorization"] == f"Bearer {fake.state.token}"
        code, job = await api(daemon, key, "GET", f"/api/cloud/jobs/{body['job_id']}")
        assert job["job"]["config_name"] == "x" and job["job"]["status"] == "queued"
    finally:
        # SIGTERM, waiting without blocking the reactor (the fake Replicate lives in it
        # and the daemon's last poll may be talking to it).
        if daemon.proc.poll() is None:
            daemon.proc.terminate()
            await wait_for(lambda: daemon.proc.poll() is not None, 20, "the daemon to stop")
        daemon.out.close()
        assert daemon.proc.returncode == 0, daemon.output()
        await fake.stop()


def _spawn_on(tmp_path, port, home, config):
    import subprocess

    from tests.test_process import ROOT, TWISTD

    daemon = Daemon.__new__(Daemon)
    daemon.port = port
    daemon.state = str(tmp_path / "state")
    daemon.log_path = str(tmp_path / f"stdout-{port}.log")
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith("SIMPLETUNER_") and k != "REPLICATE_API_TOKEN"}
    environ.update({"SIMPLETUNER_STATE_DIR": daemon.state, "HOME": str(home)})
    daemon.out = open(daemon.log_path, "w")
    daemon.proc = subprocess.Popen(
        [TWISTD, "-n", "--pidfile=", "stdaemon", "--listen", f"tcp:{port}:interface=127.0.0.1",
         "--config", str(config)], stdout=daemon.out, stderr=subprocess.STDOUT, env=environ, cwd=ROOT)
    daemon.url = f"http://127.0.0.1:{port}"
    return daemon


@pytest_twisted.ensureDeferred
async def test_console_sign_in_with_api_key_and_token_removal(make_daemon, tmp_path, browser, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("REPLICATE_API_TOKEN", raising=False)
    daemon = await make_daemon()
    response, body = await call(daemon, "PUT", "/api/cloud/providers/replicate/token",
                                {"token": "r8_from_the_api"}, key=daemon.admin_key)
    assert response.code == 200 and body["source"] == "file"
    page = await browser.run(sign_in_with_api_key, browser, daemon.url, daemon.admin_key)
    messages = await browser.run(token_from_env_and_removal, page)
    assert not [m for m in messages if m.startswith("pageerror")], messages
    response, body = await call(daemon, "GET", "/api/cloud/providers/replicate/token", key=daemon.admin_key)
    assert body["configured"] is False
    with open(daemon.ctx.secrets.file_target()) as fh:
        assert "REPLICATE_API_TOKEN" not in json.load(fh)

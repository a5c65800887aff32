"""A real headless Chromium (Debian's) driven by Playwright, next to a daemon in the reactor.

Playwright's sync API must not run on the reactor thread, and its objects
belong to the thread that made them: every browser step runs on ONE
dedicated worker thread (``Browser.run(fn, *args)`` → Deferred), while the
daemon keeps serving in the reactor.  Screenshots go to ``tests/artifacts/``.
"""

from __future__ import annotations

import os

from twisted.internet import reactor
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from tests.services import require_binary

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update"]
ARTIFACTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "artifacts")


class Browser:
    def __init__(self):
        self.pool = ThreadPool(minthreads=1, maxthreads=1, name="playwright")
        self._playwright = None
        self.browser = None

    def run(self, fn, *args, **kwargs):
        return deferToThreadPool(reactor, self.pool, fn, *args, **kwargs)

    async def start(self):
        self.pool.start()
        await self.run(self._launch)
        return self

    def _launch(self):
        from playwright.sync_api import sync_playwright

        self._playwright = sync_playwright().start()
        self.browser = self._playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                                        headless=True)

    def new_page(self, width=1280, height=900):
        """(on the browser thread) a page in a fresh context (own cookies and sessionStorage)."""
        context = self.browser.new_context(viewport={"width": width, "height": height})
        page = context.new_page()
        page.set_default_timeout(15000)
        page.console_messages = []
        page.on("console", lambda msg: page.console_messages.append(f"{msg.type}: {msg.text}"))
        page.on("pageerror", lambda exc: page.console_messages.append(f"pageerror: {exc}"))
        return page

    async def stop(self):
        try:
            await self.run(self._close)
        finally:
            self.pool.stop()

    def _close(self):
        if self.browser is not None:
            self.browser.close()
        if self._playwright is not None:
            self._playwright.stop()


def require_browser() -> None:
    require_binary("chromium")
    if not os.access(CHROMIUM, os.X_OK):
        require_binary(CHROMIUM)


def screenshot(page, name: str) -> str:
    os.makedirs(ARTIFACTS, exist_ok=True)
    path = os.path.join(ARTIFACTS, name)
    page.screenshot(path=path, full_page=True)
    return path

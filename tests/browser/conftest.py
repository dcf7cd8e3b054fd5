"""A real dashboard server (uvicorn in a thread, on a free loopback port) over a digits logreg run,
and headless Chromium (Debian's /usr/bin/chromium, driven by Playwright) to look at its pages.

Without /usr/bin/chromium the browser tests are skipped, unless ``INFLUENCE_REQUIRE_BROWSER=1``
(then they fail). Screenshots go to a pytest temporary folder and are copied to
``$INFLUENCE_ARTIFACTS`` (default ``bench/results/screenshots/``, git-ignored).
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvicorn

import engine
from app.main import ROOT, create_app
from app.settings import Settings

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
DEFAULT_ARTIFACTS = ROOT / "bench" / "results" / "screenshots"
VIEWPORT = {"width": 1280, "height": 900}


@pytest.fixture(scope="session")
def browser_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Digits (8×8, 10 classes) with logistic regression: a realistic run that builds in seconds."""
    out = tmp_path_factory.mktemp("browser-runs") / "digits-logreg"
    engine.build("digits", "logreg", out, device="cpu", progress=False)
    return out


@contextmanager
def serving(run: Path, **settings: Any) -> Iterator[str]:
    """Base URL of a uvicorn server (in a thread, on a free loopback port) serving the dashboard
    for ``run`` with these settings; stopped on exit."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    app = create_app(Settings(run=run, port=port, **settings))
    config = uvicorn.Config(app, log_level="warning", ws="none", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the dashboard server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="session")
def server_url(browser_run: Path) -> Iterator[str]:
    """Base URL of the session's dashboard server for ``browser_run`` (no API key)."""
    with serving(browser_run) as base:
        yield base


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """Headless Chromium; skipped when it is not installed (failed with INFLUENCE_REQUIRE_BROWSER=1)."""
    if not CHROMIUM.is_file():
        message = f"{CHROMIUM} is not installed"
        if os.environ.get("INFLUENCE_REQUIRE_BROWSER") == "1":
            pytest.fail(message + " (INFLUENCE_REQUIRE_BROWSER=1)")
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="session")
def screenshot_dirs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    artifacts = Path(os.environ.get("INFLUENCE_ARTIFACTS") or DEFAULT_ARTIFACTS)
    artifacts.mkdir(parents=True, exist_ok=True)
    return [tmp_path_factory.mktemp("screenshots"), artifacts]


@dataclass
class Tab:
    """A browser page that records console errors, page errors and failed requests."""

    page: Any
    base: str
    shot_dirs: list[Path]
    problems: list[str] = field(default_factory=list)
    expected_status: dict[str, int] = field(default_factory=dict)  # path -> an expected 4xx

    def watch(self) -> None:
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        self.page.on("requestfailed", self._failed)
        self.page.on("response", self._response)

    def _failed(self, request: Any) -> None:
        # a request still in flight when the page navigates (a form submit, a reload) is
        # cancelled with ERR_ABORTED: not a fault of the page; HTTP errors are caught by _response
        if "ERR_ABORTED" not in str(request.failure):
            self.problems.append(f"request failed: {request.url} ({request.failure})")

    def _expected(self, url: str, status: int | None = None) -> bool:
        expected = self.expected_status.get(url.removeprefix(self.base))
        return expected is not None and status in (None, expected)

    def _console(self, message: Any) -> None:
        # Chromium logs an error for every 4xx response, the expected ones included
        if message.type == "error" and not (message.text.startswith("Failed to load resource")
                                             and self._expected(message.location.get("url", ""))):
            self.problems.append(f"console: {message.text}")

    def _response(self, response: Any) -> None:
        if response.status >= 400 and not self._expected(response.url, response.status):
            self.problems.append(f"HTTP {response.status}: {response.url}")

    def goto(self, path: str) -> Any:
        # wait until the network is idle (favicon included), so that a test that navigates away
        # at once does not abort a request still in flight
        return self.page.goto(self.base + path, wait_until="networkidle")

    def wait_for_plots(self, *names: str) -> None:
        for name in names:
            self.page.wait_for_selector(f"#plot-{name}.drawn .main-svg", state="attached")

    def loaded_images(self, selector: str) -> int:
        """How many images match ``selector``, once every one has loaded (naturalWidth > 0)."""
        self.page.wait_for_function(
            "sel => { const imgs = [...document.querySelectorAll(sel)];"
            " return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0); }",
            arg=selector)
        return int(self.page.eval_on_selector_all(selector, "imgs => imgs.length"))

    def screenshot(self, name: str) -> None:
        first, *others = self.shot_dirs
        path = first / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        for d in others:
            shutil.copyfile(path, d / path.name)

    def assert_clean(self) -> None:
        assert self.problems == [], "\n".join(self.problems)


@contextmanager
def open_tab(browser: Any, base: str, shot_dirs: list[Path]) -> Iterator[Tab]:
    """A watched tab on ``base`` in a fresh browser context (its own storage), closed on exit."""
    context = browser.new_context(viewport=VIEWPORT)
    context.set_default_timeout(30_000)
    t = Tab(context.new_page(), base, shot_dirs)
    t.watch()
    try:
        yield t
    finally:
        context.close()


@pytest.fixture
def tab(browser: Any, server_url: str, screenshot_dirs: list[Path]) -> Iterator[Tab]:
    with open_tab(browser, server_url, screenshot_dirs) as t:
        yield t

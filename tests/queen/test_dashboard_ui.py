"""The dashboard in a real headless Chromium (Debian's, driven by Playwright) against a real queen.

One queen (the real app under uvicorn) with an inventory of one local node, one tiny-model worker
registered on that node, one browser for the module; each test opens its own
browser context, so nothing (sessionStorage included) leaks between tests.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, expect, sync_playwright

from rbee_control.queen import InventoryFleet

from ..worker_proc import WorkerProcess
from .conftest import serve_queen

CHROMIUM = "/usr/bin/chromium"
CLIENT_KEY = "ui-client-key"
ADMIN_KEY = "ui-admin-key"
MODEL = "tiny-ui"
NODE = "hall-pc"
WAIT_MS = 60_000  # a bound on waiting, not a speed expectation


@dataclass
class Served:
    url: str
    worker: WorkerProcess
    worker_id: str


class QueenThread:
    """The queen app under uvicorn on its own event loop in a thread: the browser's API is synchronous
    and must not share a loop with it, and the app is already imported (a `queen-rbee` process would
    pay its start-up again)."""

    def __init__(self, inventory: Path) -> None:
        self.inventory = inventory
        self.loop = asyncio.new_event_loop()
        self.started = threading.Event()
        self.url: str | None = None
        self.error: BaseException | None = None
        self._stop: asyncio.Event | None = None
        self.thread = threading.Thread(target=self._run, name="queen", daemon=True)

    def _run(self) -> None:
        try:
            self.loop.run_until_complete(self._serve())
        except BaseException as exc:
            self.error = exc
        finally:
            self.started.set()
            self.loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        fleet = InventoryFleet.from_inventory(self.inventory)
        async with serve_queen(fleet, api_key=CLIENT_KEY, admin_key=ADMIN_KEY) as queen:
            self.url = queen.url
            self.started.set()
            await self._stop.wait()

    def start(self) -> str:
        self.thread.start()
        assert self.started.wait(60), "the queen did not start"
        assert self.url is not None, f"the queen failed to start: {self.error!r}"
        return self.url

    def stop(self) -> None:
        if self._stop is not None and self.thread.is_alive():
            self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(60)
        assert not self.thread.is_alive(), "the queen did not stop"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Served]:
    base = tmp_path_factory.mktemp("ui")
    inventory = base / "inventory.yaml"
    inventory.write_text(f"nodes:\n  {NODE}:\n    transport: local\n    home: {base / 'home'}\n")
    worker = WorkerProcess(tiny_model, log_dir=base, ctx=2048)  # loads while the queen starts
    queen = QueenThread(inventory)
    try:
        url = queen.start()
        worker.wait_ready()
        body = {"url": worker.url, "api_key": worker.api_key, "model": MODEL, "node": NODE}
        headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
        registered = httpx.post(f"{url}/v2/workers/register", json=body, headers=headers, timeout=30)
        assert registered.status_code == 201, registered.text
        yield Served(url, worker, registered.json()["id"])
    finally:
        try:
            queen.stop()
        finally:
            worker.kill()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (scripts/setup.sh does)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    problems: list[str] = []
    page.on("console", lambda m: _console(problems, m))
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    try:
        yield page
        assert problems == []  # a CSP violation or a script error would show here
    finally:
        context.close()


def _console(problems: list[str], message: ConsoleMessage) -> None:
    # a refused key is a 401/403 the page expects; anything else logged as an error is a fault
    if message.type == "error" and not re.search(r"status of 40[13]", message.text):
        problems.append(message.text)


def _sign_in(page: Page, served: Served, key: str) -> None:
    page.goto(f"{served.url}/ui/")
    page.fill("#key", key)
    page.click("#key-form button[type=submit]")


def test_the_page_shows_the_fleet_and_streams_a_playground_answer(page: Page, served: Served) -> None:
    _sign_in(page, served, ADMIN_KEY)
    worker_row = page.locator(f"#workers tr[data-worker='{served.worker_id}']")
    expect(worker_row).to_contain_text(MODEL)
    expect(worker_row).to_contain_text("0 / 1")
    node_row = page.locator(f"#nodes tr[data-node='{NODE}']")
    expect(node_row).to_contain_text(re.compile(r"cpu:0 .*\d+(\.\d)? GiB / \d+(\.\d)? GiB"))
    expect(page.locator("#models tbody")).to_contain_text(MODEL)
    assert page.evaluate("localStorage.length") == 0  # the key lives in the tab only
    assert page.evaluate("sessionStorage.getItem('rbee.queen.key')") == ADMIN_KEY

    page.fill("#chat-prompt", "Say something")
    page.fill("#chat-max", "12")
    with page.expect_response(re.compile(r"/v1/chat/completions$")) as answered:
        page.click("#chat-send")
    response = answered.value
    assert response.status == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    expect(page.locator("#chat-status")).to_contain_text("done:")
    assert page.locator("#chat-answer").text_content()
    done = re.search(r"done: (\d+) tokens", page.locator("#chat-status").text_content() or "")
    assert done is not None and 0 < int(done.group(1)) <= 12  # the stream's usage chunk
    request_row = page.locator("#requests tbody tr").first
    expect(request_row).to_contain_text(served.worker_id)
    expect(request_row.locator("td").nth(5)).to_have_text("ok")
    expect(request_row.locator("td").nth(6)).to_have_text(done.group(1))  # what the queen counted

    page.reload()  # the tab keeps its key: no second prompt
    expect(page.locator(f"#workers tr[data-worker='{served.worker_id}']")).to_be_visible()
    expect(page.locator("#login")).to_be_hidden()


def test_a_wrong_key_shows_an_error_and_no_data(page: Page, served: Served) -> None:
    _sign_in(page, served, "not-the-key")
    expect(page.locator("#error")).to_contain_text("401")
    expect(page.locator("#fleet")).to_be_hidden()
    assert page.locator("#workers tbody tr").count() == 0
    assert MODEL not in page.content() and served.worker.url not in page.content()
    assert page.evaluate("sessionStorage.length") == 0  # a refused key is not kept


def test_the_client_key_is_refused_with_the_reason(page: Page, served: Served) -> None:
    _sign_in(page, served, CLIENT_KEY)
    expect(page.locator("#error")).to_contain_text("admin key")
    expect(page.locator("#fleet")).to_be_hidden()
    assert MODEL not in page.content()


def test_without_a_key_the_page_asks_for_one_and_fetches_nothing(page: Page, served: Served) -> None:
    asked: list[str] = []
    page.on("request", lambda r: asked.append(r.url))
    page.goto(f"{served.url}/ui/")
    expect(page.locator("#key")).to_be_visible()
    expect(page.locator("#fleet")).to_be_hidden()
    assert MODEL not in page.content() and NODE not in page.content()
    assert sorted(u.removeprefix(served.url) for u in asked) == ["/ui/", "/ui/app.js", "/ui/style.css"]

"""The console end to end in a real headless browser (Debian's chromium, driven by
Selenium): log in, create a key, make a request with it (openai SDK), see it in the
overview and the usage, log in with it (a member's own view), revoke it, see the next
request refused. A screenshot goes
to var/e2e/ when it fails; the page's load time is written to var/e2e/load.txt
(reported by scripts/test, never asserted)."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest

from bench.fake_upstream import FakeUpstream

from .admin_support import MASTER, start
from .conftest import ROOT, SECRETS, MakeProxy, Proxy

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
ARTIFACTS = ROOT / "var" / "e2e"
WAIT = 20.0

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="no chromium + chromedriver on this machine (apt-get install chromium "
    "chromium-driver; .ci/run installs them)",
)


@pytest.fixture
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="morngpt-e2e-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--no-first-run", f"--user-data-dir={profile}", "--window-size=1280,900",
    ):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(DRIVER)))
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
async def proxy(make_proxy: MakeProxy, upstream: FakeUpstream, monkeypatch: Any) -> Proxy:
    return await start(make_proxy, upstream.url, monkeypatch)


def until(what: str, check: Callable[[], Any], timeout: float = WAIT) -> Any:
    """Poll ``check`` (in the browser's thread) until it returns something truthy."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            found = check()
            if found:
                return found
        except Exception as exc:  # the element is not there yet, or went stale
            last = exc
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what} (last error: {last!r})")


def scenario(driver: Any, console: str, api: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    def chat(key: str) -> None:
        with openai.OpenAI(base_url=api, api_key=key, max_retries=0) as client:
            client.chat.completions.create(model="m1", messages=[{"role": "user", "content": "hi"}])

    def css(selector: str) -> Any:
        return driver.find_element(By.CSS_SELECTOR, selector)

    def text(test_id: str) -> str:
        return str(css(f'[data-testid="{test_id}"]').text)

    driver.get(console)
    field = until("the login form", lambda: driver.find_element(By.ID, "credential"))
    timing = driver.execute_script(
        "const t = performance.getEntriesByType('navigation')[0];"
        "return [t.domContentLoadedEventEnd, t.loadEventEnd];"
    )
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "load.txt").write_text(
        f"console page load: DOMContentLoaded {timing[0]:.0f} ms, load {timing[1]:.0f} ms\n"
    )
    field.send_keys(MASTER, Keys.ENTER)  # keyboard only: the form submits on Enter

    until("the overview", lambda: text("requests-total") != "…")
    driver.find_element(By.LINK_TEXT, "Keys").click()

    def create(name: str, rpm: str) -> str:
        until("the key form", lambda: driver.find_element(By.NAME, "name")).send_keys(name)
        driver.find_element(By.NAME, "rpm").send_keys(rpm)
        driver.find_element(By.XPATH, "//button[text()='Create key']").click()
        until("the key's row", lambda: css(f'[data-testid="key-{name}"]'))
        key = str(text("new-key"))
        SECRETS.add(key)
        assert key.startswith("sk-morn-")
        return key

    other = create("other-key", "")
    key = create("e2e-key", "600")
    assert key != other
    row = until(
        "the key's row", lambda: driver.find_element(By.CSS_SELECTOR, '[data-testid="key-e2e-key"]')
    )
    key_id = row.find_elements(By.TAG_NAME, "td")[1].text

    chat(key)

    driver.find_element(By.LINK_TEXT, "Overview").click()
    until("the request in the overview", lambda: int(text("requests-total")) >= 1)

    def usage_shows_it() -> bool:
        driver.find_element(By.LINK_TEXT, "Usage").click()
        driver.find_element(By.NAME, "group_by").send_keys("key")  # the select, by keyboard
        cells = driver.find_elements(By.CSS_SELECTOR, f'[data-testid="usage-{key_id}"] td')
        return len(cells) > 1 and cells[1].text == "1"

    until("the request in the usage table", usage_shows_it)

    # The key's holder logs in with it: a member's own view, their key and usage only.
    driver.find_element(By.XPATH, "//button[text()='Log out']").click()
    until("the login form", lambda: driver.find_element(By.ID, "credential")).send_keys(
        key, Keys.ENTER
    )
    until("the member's view", lambda: driver.find_element(By.LINK_TEXT, "My key")).click()
    assert not driver.find_elements(By.LINK_TEXT, "Overview")
    rows = until("the member's key", lambda: driver.find_elements(By.CSS_SELECTOR, "tbody tr"))
    assert [r.get_attribute("data-testid") for r in rows] == ["key-e2e-key"]
    assert not driver.find_elements(By.XPATH, "//button[text()='Create key']")
    driver.find_element(By.XPATH, "//button[text()='Log out']").click()
    until("the login form", lambda: driver.find_element(By.ID, "credential")).send_keys(
        MASTER, Keys.ENTER
    )

    until("the keys link", lambda: driver.find_element(By.LINK_TEXT, "Keys")).click()
    until(
        "the revoke button",
        lambda: driver.find_element(By.XPATH, "//button[@aria-label='Revoke e2e-key']"),
    ).click()
    driver.switch_to.alert.accept()
    until(
        "the key to show as revoked",
        lambda: (
            driver.find_element(
                By.CSS_SELECTOR, '[data-testid="key-e2e-key"] [data-testid="status"]'
            ).text
            == "revoked"
        ),
    )

    def refused() -> bool:
        try:
            chat(key)
        except openai.AuthenticationError:
            return True
        return False

    until("the revoked key to be refused", refused)


async def test_console_end_to_end(
    proxy: Proxy, browser: Any, request: pytest.FixtureRequest
) -> None:
    ops = proxy.state.config.server.ops_port
    console = f"http://127.0.0.1:{ops}/console/"
    try:
        # Selenium blocks: it runs in a thread while the proxy serves on this loop.
        await asyncio.to_thread(scenario, browser, console, proxy.base)
    except BaseException:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / f"{request.node.name}.png"
        browser.save_screenshot(str(shot))
        print(f"screenshot of the failure: {shot}")
        raise

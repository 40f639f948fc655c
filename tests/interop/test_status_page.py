"""usbipyd's status page in a real browser: Debian's headless Chromium, driven by
Selenium through Debian's chromedriver. The page shows the demo's devices, turns a
row to "in use" when a client imports it (no reload), lets an admin release it,
and shows a hostile busid as text. A screenshot is kept in build/test-output/."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import serving_status
from tests.interop.conftest import require
from usbipy.client import sync
from usbipy.devices import CdcAcm
from usbipy.devices.demo import demo_devices
from usbipy.server import ServerThread
from usbipy.server.http import HttpEndpoint

try:
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:  # (the test extra has it: under CI, missing is a failure)
    if os.environ.get("USBIPY_REQUIRE_ALL"):
        raise
    pytest.skip("selenium is not installed (pip install -e '.[test]')", allow_module_level=True)

HOST = "127.0.0.1"
HOSTILE_BUSID = "1-9<script>alert(1)</script>"
OUTPUT = Path(__file__).resolve().parents[2] / "build" / "test-output"
#: Seconds the issue gives an import to show on an open page.
LIVE_WITHIN = 2.0


@pytest.fixture
def browser() -> Iterator[Any]:
    chromium = require("chromium")
    chromedriver = require("chromedriver")
    profile = tempfile.mkdtemp(prefix="usbipy-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    # (no network beyond loopback here: Chromium's own background traffic is turned off)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                 f"--user-data-dir={profile}", "--window-size=1200,800"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=chromedriver),
                              options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def served() -> Iterator[tuple[ServerThread, HttpEndpoint]]:
    hostile = CdcAcm()
    hostile.busid = HOSTILE_BUSID
    with serving_status([*demo_devices(disk_size=8 << 20), hostile]) as served:
        yield served


#: Each row's busid and state text, read in one go (the page re-renders its rows on
#: every event: an element found a moment ago may be gone).
ROWS = """return Array.from(document.querySelectorAll('#device-rows tr[data-busid]'),
    row => [row.dataset.busid, row.querySelector('td.busid').textContent,
            row.querySelector('td.state').textContent]);"""


def state_of(driver: Any, busid: str) -> str:
    for row_busid, _shown, state in driver.execute_script(ROWS):
        if row_busid == busid:
            return str(state)
    return ""


def test_the_page_follows_imports_and_releases_live(browser: Any, served: Any) -> None:
    srv, endpoint = served
    wait = WebDriverWait(browser, 30, poll_frequency=0.05)
    browser.get(f"{endpoint.base}/")
    wait.until(lambda d: d.find_element(By.ID, "live").text == "live")
    wait.until(lambda d: all(state_of(d, b) == "available" for b in ("1-1", "1-2", "1-3")))
    names = browser.find_element(By.ID, "device-rows").text
    assert "1209:0001" in names and "1209:0002" in names and "1209:0003" in names

    # a hostile busid is shown as text: no script element was made of it
    rows = [row for row in browser.execute_script(ROWS) if row[0] == HOSTILE_BUSID]
    assert len(rows) == 1 and rows[0][1] == HOSTILE_BUSID
    assert browser.execute_script(
        "return document.querySelectorAll('#device-rows script').length") == 0

    browser.execute_script("window.usbipyMarker = 'not reloaded';")
    with sync.connect(HOST, "1-1", srv.port) as device:
        shown_at = time.monotonic()
        WebDriverWait(browser, LIVE_WITHIN, poll_frequency=0.05).until(
            lambda d: state_of(d, "1-1") == "in use by 127.0.0.1")
        assert time.monotonic() - shown_at <= LIVE_WITHIN
        assert browser.execute_script("return window.usbipyMarker") == "not reloaded"
        OUTPUT.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(OUTPUT / "status-page.png"))

        # an admin releases it: the page asks first, and a "no" releases nothing
        click_release = """
            window.asked = [];
            window.confirm = (text) => { window.asked.push(text); return arguments[0]; };
            const row = Array.from(document.querySelectorAll('#device-rows tr'))
                .find(r => r.dataset.busid === '1-1');
            row.querySelector('button.release').click();"""
        browser.execute_script(click_release, False)
        assert browser.execute_script("return window.asked") == [
            "Release 1-1 from 127.0.0.1? The client loses the device."]
        device.control(0x80, 6, 0x0100, 0, 18, timeout=5)  # (still ours)
        assert state_of(browser, "1-1") == "in use by 127.0.0.1"
        browser.execute_script(click_release, True)
        wait.until(lambda d: state_of(d, "1-1") == "available")
        with pytest.raises(Exception):  # noqa: B017 (the session is gone: any error)
            for _ in range(50):
                device.control(0x80, 6, 0x0100, 0, 18, timeout=5)
                time.sleep(0.05)
    assert browser.execute_script("return window.usbipyMarker") == "not reloaded"
    assert "Released" in browser.find_element(By.ID, "message").text

    # on a phone: the table becomes cards, and nothing runs off the side
    browser.set_window_size(400, 900)
    wait.until(lambda d: d.execute_script(
        "return document.documentElement.scrollWidth <= window.innerWidth"))
    OUTPUT.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(OUTPUT / "status-page-phone.png"))

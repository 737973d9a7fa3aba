"""The console in a real browser (headless Chromium): log in, watch a run appear live after a signed
delivery, open it, replay a dead run, cancel a queued run, refuse a wrong token. Screenshots are saved
under each test's tmp_path (`screenshots/`)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import requests

from browser_support import browser  # noqa: F401  (fixture)
from console_support import TOKEN, console_server  # noqa: F401  (fixture)
from platform_support import deliver, wait_until

BEARER = {"Authorization": f"Bearer {TOKEN}"}
WAIT = 15


def _wait(driver, condition, timeout: float = WAIT):  # type: ignore[no-untyped-def]
    """Wait for `condition`; an element the page replaced while it was read (the live run view
    re-renders as the run changes) is looked up again at the next poll, not a failure."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05,
                         ignored_exceptions=(NoSuchElementException, StaleElementReferenceException)).until(condition)


def _text(driver, selector: str) -> str:  # type: ignore[no-untyped-def]
    """The rendered text of `selector` ("" if absent), read in one script call: the live page replaces
    elements as the run changes, so an element handle found a moment ago may be gone when read."""
    return driver.execute_script("const e = document.querySelector(arguments[0]); return e ? e.innerText : '';",
                                 selector).strip()


def _css(driver, selector: str):  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, selector)


def _log_in(b, base: str, token: str = TOKEN, next_path: str = "/runs") -> None:  # type: ignore[no-untyped-def]
    b.get(f"{base}{next_path}")
    _wait(b.driver, lambda d: "/login" in d.current_url)  # the 401 page sends the browser to the form
    _css(b.driver, "#token").send_keys(token)
    _css(b.driver, "form[action='/login'] button").click()


def _state(base: str, run_id: str) -> dict:
    return requests.get(f"{base}/api/runs/{run_id}", headers=BEARER, timeout=10).json()


def test_wrong_token_is_refused(browser, console_server):
    _log_in(browser, console_server.base, token="not-the-token-at-all")
    error = _wait(browser.driver, lambda d: _css(d, "#login-error"))
    assert "not valid" in error.text
    browser.shot("wrong-token")
    browser.get(f"{console_server.base}/runs")
    assert "/login" in browser.current_url  # still out: no session was made


def test_a_run_appears_live_and_its_detail_shows_what_happened(browser, console_server):
    base = console_server.base
    _log_in(browser, base)
    _wait(browser.driver, lambda d: d.current_url.endswith("/runs") and "on" in _css(d, "#live").get_attribute("class"))
    browser.shot("runs-empty")
    payload = {"action": "opened", "issue": {"number": 7, "title": "Crash on start"},
               "repository": {"full_name": "acme/app"}, "sender": {"login": "octocat"}}
    run_id = deliver(base, "issues", payload, delivery="delivery-browser-1").json()["runs"][0]
    row = _wait(browser.driver, lambda d: _css(d, f"tr[data-run='{run_id}'][data-state='done']"))  # no reload
    assert "ok" in row.text and "issues.opened" in row.text
    browser.shot("runs-live")
    row.find_element("css selector", "a").click()
    _wait(browser.driver, lambda d: d.current_url.endswith(f"/runs/{run_id}"))
    assert _css(browser.driver, "#run-state").text == "done"
    assert '"ok": true' in _css(browser.driver, "#run-output").text
    headers = _css(browser.driver, "#event-headers").text
    assert "x-github-delivery: delivery-browser-1" in headers and "x-hub-signature-256: [redacted]" in headers
    assert console_server.platform.owner in _css(browser.driver, "#attempts").text
    path = browser.shot("run-detail")
    target = os.environ.get("WASMFLOW_CONSOLE_SCREENSHOT")  # the README's picture: docs/console-run.png
    if target:
        shutil.copyfile(path, Path(target))


def test_replay_a_dead_run_from_its_page(browser, console_server):
    base = console_server.base
    run_id = deliver(base, "push", {"repository": {"full_name": "acme/app"}}).json()["runs"][0]
    wait_until(lambda: _state(base, run_id)["state"] == "dead")
    _log_in(browser, base, next_path=f"/runs/{run_id}")
    _wait(browser.driver, lambda d: d.current_url.endswith(f"/runs/{run_id}"))
    assert _css(browser.driver, "#run-state").text == "dead"
    _css(browser.driver, "#replay").click()
    _wait(browser.driver, lambda d: d.current_url.rstrip("/").split("/")[-1] != run_id)  # on the replay's page
    new_id = browser.current_url.rstrip("/").split("/")[-1]
    replay = wait_until(lambda: (lambda r: r if r["state"] == "dead" else None)(_state(base, new_id)))
    assert replay["replay_of"] == run_id and replay["seq"] == 1
    browser.refresh()
    assert run_id in _css(browser.driver, "main").text  # "replay of" links back
    browser.shot("replayed")


def test_cancel_a_queued_run_from_its_page(browser, console_server):
    base = console_server.base
    spin = [deliver(base, "workflow_run", {"action": "requested"}).json()["runs"][0] for _ in range(2)]
    wait_until(lambda: all(_state(base, r)["state"] == "running" for r in spin))
    queued = deliver(base, "issues", {"action": "opened"}).json()["runs"][0]
    assert _state(base, queued)["state"] == "queued"
    _log_in(browser, base, next_path=f"/runs/{queued}")
    _wait(browser.driver, lambda d: d.current_url.endswith(f"/runs/{queued}"))
    assert _css(browser.driver, "#run-state").text == "queued"
    _css(browser.driver, "#cancel").click()
    _wait(browser.driver, lambda d: "cancelled" in _text(d, "#notice"))
    _wait(browser.driver, lambda d: "cancelled" in _text(d, "main") and _text(d, "#run-state") == "done")
    assert _state(base, queued)["cancelled_by"] == "console"
    browser.shot("cancelled")
    for run_id in spin:  # free the run slot so the server stops at once
        requests.post(f"{base}/api/runs/{run_id}/cancel", headers=BEARER, timeout=10)


def test_readable_on_a_phone_and_dark_by_the_system_setting(browser, console_server):
    base = console_server.base
    deliver(base, "issues", {"action": "opened", "repository": {"full_name": "acme/app"}})
    _log_in(browser, base)
    _wait(browser.driver, lambda d: d.current_url.endswith("/runs"))
    browser.set_window_size(390, 844)
    browser.refresh()
    _wait(browser.driver, lambda d: _css(d, "tr[data-run]"))
    overflow = browser.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the page is {overflow}px wider than a phone screen"
    browser.shot("phone-light")
    background = "return getComputedStyle(document.body).backgroundColor"
    light = browser.execute_script(background)
    browser.execute_cdp_cmd("Emulation.setEmulatedMedia",
                            {"features": [{"name": "prefers-color-scheme", "value": "dark"}]})
    dark = browser.execute_script(background)
    assert light == "rgb(255, 255, 255)" and dark == "rgb(15, 20, 25)", (light, dark)
    browser.shot("phone-dark")

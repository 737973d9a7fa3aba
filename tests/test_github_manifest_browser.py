"""The manifest flow in a real browser, on the real platform server: log in, open /setup, press the
button, let the GitHub stand-in send the browser back, and follow the install link. Screenshots are saved
under the test's temporary directory."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Callable, Iterator

import pytest

from browser_support import browser  # noqa: F401  (the fixture)
from github_manifest_support import EXPECTED_EVENTS, FLOWS_YAML, TOKEN
from platform_support import ServerThread
from wasmflow.devtools.github_standin import GithubStandin
from wasmflow.flows.github_credentials import credentials_dir
from wasmflow.platform.app import Options
from wasmflow.runtime import Runtime


@pytest.fixture
def standin() -> Iterator[GithubStandin]:
    with GithubStandin() as server:
        yield server


def test_the_whole_manifest_flow_in_a_browser(browser, standin: GithubStandin, tmp_path: Path,  # noqa: F811
                                             make_runtime: Callable[..., Runtime],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    for name in ("GITHUB_APP_ID", "GITHUB_APP_PRIVATE_KEY", "GITHUB_WEBHOOK_SECRET", "WASMFLOW_PUBLIC_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GITHUB_API_URL", standin.url)
    runtime = make_runtime(tmp_path / "site", FLOWS_YAML)
    wait = WebDriverWait(browser.driver, 40)
    with ServerThread(runtime, Options(workers=1, poll_interval=0.1, console_token=TOKEN)) as server:
        browser.get(f"{server.base}/setup")
        wait.until(ec.presence_of_element_located((By.ID, "token"))).send_keys(TOKEN)
        browser.shot("01-login")
        browser.find_element(By.CSS_SELECTOR, "form[action='/login'] button[type=submit]").click()

        wait.until(ec.presence_of_element_located((By.ID, "create-app")))
        events = browser.find_element(By.ID, "plan-events").text
        assert all(event in events for event in EXPECTED_EVENTS)
        assert "pull_requests" in browser.find_element(By.ID, "plan-permissions").text
        assert browser.find_element(By.ID, "plan-webhook").text == f"{server.base}/webhooks/github"
        assert "loopback" in browser.find_element(By.TAG_NAME, "main").text  # GitHub could not reach it
        browser.shot("02-setup")
        browser.find_element(By.ID, "create-app").click()

        link = wait.until(ec.presence_of_element_located((By.ID, "install-link")))
        assert browser.current_url.startswith(f"{server.base}/setup/callback?code=")
        app = standin.registered_apps[-1]
        assert app["name"] in browser.find_element(By.ID, "setup-done").text
        assert app["pem"].splitlines()[1] not in browser.page_source
        browser.shot("03-registered")
        assert link.get_attribute("href") == f"{standin.url}/apps/{app['slug']}/installations/new"
        link.click()
        wait.until(ec.title_contains("Install"))
        browser.shot("04-install")

        browser.back()
        browser.refresh()  # the same callback again: its state is spent, so nothing happens twice
        wait.until(ec.presence_of_element_located((By.ID, "setup-error")))
        assert "not started here" in browser.find_element(By.TAG_NAME, "h1").text
        browser.shot("05-callback-again")
        browser.get(f"{server.base}/setup")  # the page now shows the App stored
        assert "install" in wait.until(ec.presence_of_element_located((By.ID, "setup-stored"))).text.lower()

    directory = credentials_dir(tmp_path / "site" / "state")
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in directory.iterdir())
    assert sorted(p.name for p in (tmp_path / "screenshots").iterdir()) == \
        ["01-login.png", "02-setup.png", "03-registered.png", "04-install.png", "05-callback-again.png"]

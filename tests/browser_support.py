"""A real browser for the console's tests: Debian's headless Chromium driven by Selenium.

`browser` is a fixture (import it into a test module: `from browser_support import browser`). It skips,
naming chromium, where the browser or its driver is missing (apt-get install chromium chromium-driver).
`shot(name)` saves a screenshot under the test's tmp_path and returns its path.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterator

import pytest

from optional_support import need_module, require

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


class Browser:
    """A Selenium WebDriver plus the screenshot folder of its test."""

    def __init__(self, driver, shots: Path) -> None:  # type: ignore[no-untyped-def]
        self.driver = driver
        self.shots = shots

    def shot(self, name: str) -> Path:
        self.shots.mkdir(parents=True, exist_ok=True)
        path = self.shots / f"{name}.png"
        self.driver.save_screenshot(str(path))
        return path

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self.driver, name)


def _binary(preferred: str, name: str) -> str:
    if Path(preferred).exists():
        return preferred
    found = shutil.which(name)
    require(found is not None, f"needs Debian's chromium and chromium-driver (apt-get install chromium "
                               f"chromium-driver): {preferred} is missing")
    return str(found)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    webdriver = need_module("selenium.webdriver", "selenium (pip install selenium)")
    chromium = _binary(CHROMIUM, "chromium")
    chromedriver = _binary(CHROMEDRIVER, "chromedriver")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,900", "--no-first-run", "--disable-extensions",
                f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield Browser(driver, tmp_path / "screenshots")
    finally:
        driver.quit()

"""A headless Chromium (Debian's ``chromium`` and ``chromium-driver``, installed by ``make tools``) driven by
Selenium, for tests of the console's pages."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# What chromedriver answers, as an "unknown error" instead of a stale element, when a live update detaches an element
# between its lookup and a read of it.
DETACHED_NODE = "does not belong to the document"
T = TypeVar("T")


@contextmanager
def headless_chromium(width: int = 1280, height: int = 900) -> Iterator[webdriver.Chrome]:
    """One browser with a fresh profile, closed (and its profile removed) afterwards."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if shutil.which(path) is None:
            raise RuntimeError(f"{path} is missing: `make tools` installs Debian's chromium and chromium-driver")
    profile = tempfile.mkdtemp(prefix="difyq-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_until(driver: webdriver.Chrome, condition: Callable[[webdriver.Chrome], T], timeout: float = 20.0) -> T:
    """Poll ``condition`` until it returns something truthy; a TimeoutException otherwise. An element a live
    update replaced meanwhile (stale or detached) or has not shown yet counts as not yet."""
    def attempt(browser: webdriver.Chrome) -> T | bool:
        try:
            return condition(browser)
        except WebDriverException as error:
            if DETACHED_NODE not in (error.msg or ""):
                raise
            return False

    return WebDriverWait(driver, timeout, poll_frequency=0.1,
                         ignored_exceptions=(StaleElementReferenceException, NoSuchElementException)).until(attempt)


def text_of(driver: webdriver.Chrome, by: str, value: str) -> str:
    """An element's text, read again when a live update replaced the element while it was being read."""
    return wait_until(driver, lambda b: (b.find_element(by, value).text,))[0]


def click(driver: webdriver.Chrome, by: str, value: str) -> None:
    """Click an element, found again when a live update replaced it."""
    wait_until(driver, lambda b: b.find_element(by, value).click() or True)


__all__ = ["By", "click", "headless_chromium", "text_of", "wait_until"]

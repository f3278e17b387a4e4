"""The browser helpers the console's tests read live pages with: an element replaced under a read counts as not
yet, whether chromedriver calls it stale or answers that the node no longer belongs to the document; any other
driver error still fails at once."""

from __future__ import annotations

import pytest
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.remote.webdriver import WebDriver

from tests.support.browser import By, headless_chromium, text_of, wait_until

DETACHED_ERROR = ('unknown error: unhandled inspector error: {"code":-32000,"message":"Node with given id does '
                  'not belong to the document"}')
# A page whose one paragraph is replaced by a new one, counting up, every 10 ms: about half of all reads find a
# stale element.
CHURNING_PAGE = ("data:text/html,<p id=n>0</p><script>let n = 0; setInterval(() => {"
                 " const p = document.createElement('p'); p.id = 'n'; p.textContent = String(++n);"
                 " document.getElementById('n').replaceWith(p); }, 10)</script>")


class Reads:
    """A condition that fails with ``errors`` in turn, then answers ``done``."""

    def __init__(self, *errors: WebDriverException) -> None:
        self.errors = list(errors)
        self.calls = 0

    def __call__(self, _driver: object) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "done"


def test_a_detached_node_counts_as_not_yet() -> None:
    reads = Reads(WebDriverException(DETACHED_ERROR), WebDriverException(DETACHED_ERROR))
    assert wait_until(object(), reads, timeout=5) == "done"
    assert reads.calls == 3


def test_another_driver_error_fails_at_once() -> None:
    reads = Reads(WebDriverException("unknown error: session deleted because of page crash"))
    with pytest.raises(WebDriverException, match="page crash"):
        wait_until(object(), reads, timeout=5)
    assert reads.calls == 1


def test_reads_of_an_element_replaced_every_10_ms_succeed() -> None:
    counts: list[int] = []

    def read_on(browser: WebDriver) -> bool:
        """One more read; done once 50 replacements have been read through."""
        counts.append(int(text_of(browser, By.ID, "n")))
        return counts[-1] >= counts[0] + 50

    with headless_chromium() as browser:
        browser.get(CHURNING_PAGE)
        wait_until(browser, read_on, timeout=60)
    assert counts == sorted(counts)

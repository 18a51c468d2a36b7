"""Asking a page in the browser tests: poll a JS expression, or read one once."""

from __future__ import annotations

from selenium.webdriver.support.ui import WebDriverWait


def wait(browser, expression: str, timeout: float = 20):
    """Poll a JS expression until it is truthy; return its value."""
    return WebDriverWait(browser, timeout, poll_frequency=0.05).until(
        lambda d: d.execute_script(f"return ({expression});"),
        message=f"{expression} stayed false for {timeout} s")


def js(browser, expression: str):
    return browser.execute_script(f"return ({expression});")

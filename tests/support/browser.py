"""Headless Chromium over WebDriver (selenium), for the status page.

Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them).
Every WebDriver call blocks, and the in-process sidecar runs on the test's
event loop: call them through :func:`asyncio.to_thread` (see :func:`call`)
or the page's fetches would wait for the test to yield.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Callable
from typing import Any, TypeVar

from selenium import webdriver
from selenium.webdriver.chrome.service import Service

T = TypeVar("T")


def chromium_paths() -> tuple[str, str] | None:
    """(chromium, chromedriver), or None when either binary is not installed."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def start_chromium(width: int = 1600, height: int = 900) -> webdriver.Chrome:
    paths = chromium_paths()
    assert paths is not None, "chromium and chromedriver are needed (apt-get install chromium chromium-driver)"
    browser, driver = paths
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in (
        "--headless=new",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--window-size={width},{height}",
        "--force-color-profile=srgb",
        "--lang=en-US",
    ):
        options.add_argument(argument)
    if os.geteuid() == 0:  # Chromium refuses to run its sandbox as root
        options.add_argument("--no-sandbox")
    # The browser console (CSP violations land there) and the network events.
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    # The path is given, so selenium never tries to download a driver.
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


async def call(function: Callable[..., T], *args: Any) -> T:
    """A blocking WebDriver call, off the event loop."""
    return await asyncio.to_thread(function, *args)

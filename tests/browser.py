"""Headless Chromium and a background uvicorn server, for the browser test of ``instseg
serve`` (tests/test_serve.py) and the README's screenshots (scripts/serve_screenshots.py)."""

from __future__ import annotations

import contextlib
import shutil
import socket
import threading
import time

import pytest


def chromium_driver(width: int = 1280, height: int = 1000, downloads: str | None = None):
    """A headless Chromium through Selenium (a ``width`` x ``height`` window, files the page
    downloads saved to ``downloads``), or a skip that says what is missing."""
    pytest.importorskip("selenium", reason="the browser test needs selenium (dev extra)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip(
            "Chromium could not be installed here (Debian: apt-get install chromium "
            "chromium-driver; make test tries): the browser test of instseg serve did not run"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    if downloads is not None:
        prefs = {"download.default_directory": downloads, "download.prompt_for_download": False}
        options.add_experimental_option("prefs", prefs)
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--window-size={width},{height}",
        "--force-color-profile=srgb",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-extensions",
        "--disable-sync",
        "--no-first-run",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(executable_path=driver))


@contextlib.contextmanager
def background_server(app):
    """``app`` under uvicorn on a free loopback port, in a thread; yields its base url."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()

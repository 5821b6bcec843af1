"""A real browser for the console's tests: headless Chromium from Debian's `chromium` package,
driven by Playwright (whose own browser download is not reachable here). `.ci/run` installs
the package when it is missing; so does this fixture, when it runs as root."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Playwright, sync_playwright

SCREENSHOTS = Path(__file__).resolve().parents[2] / "var" / "screenshots"


def _chromium() -> str:
    found = shutil.which("chromium")
    if found is None and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-q"], check=True, capture_output=True, env=env)
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "chromium"], check=True, capture_output=True, env=env
        )
        found = shutil.which("chromium")
    if found is None:
        pytest.fail("the console's tests need Debian's chromium package: apt-get install chromium")
    return found


# Module-scoped: sync Playwright runs an event loop on this thread while it is open, which
# the async tests of the other packages (pytest-asyncio) must not meet.
@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as running:
        yield running


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    launched = playwright.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
    yield launched
    launched.close()


@pytest.fixture
def shots() -> Path:
    """Where the tests save a screenshot of each page (not committed: var/ is ignored)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS

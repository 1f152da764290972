"""Headless-Chromium checks of report pages (Playwright driving the Debian ``chromium`` binary).

``screenshot(html_path, png_path)`` opens a page with every non-``file:`` request blocked (a report must
open with no network), waits for plotly, saves a full-page PNG and returns the problems it saw: console
errors, uncaught page errors, blocked network requests, JavaScript dialogs (an injected ``alert``) and
plotly figures that did not render an SVG. An empty list means the page is fine.

Tests call :func:`require_chromium` first; it skips the test, with the reason, when Chromium or Playwright
is missing (``apt-get install -y chromium``).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHROMIUM_CANDIDATES = ("/usr/lib/chromium/chromium", "/usr/bin/chromium", "/usr/bin/chromium-browser")
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
RENDER_TIMEOUT_MS = 120_000  # a hang guard, not a speed test: a loaded 2-core machine can take tens of seconds


def chromium_path() -> str | None:
    """The Debian chromium binary (the real ELF under /usr/lib first, then the /usr/bin wrapper)."""
    for cand in CHROMIUM_CANDIDATES:
        if Path(cand).is_file():
            return cand
    return shutil.which("chromium") or shutil.which("chromium-browser")


def require_chromium() -> str:
    """Path of chromium, or ``pytest.skip`` with the reason when it or Playwright is not installed."""
    import pytest

    path = chromium_path()
    if path is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("the playwright Python package is not installed")
    return path


@contextmanager
def open_page(
    html_path: str | Path, width: int = 1400, height: int = 1800
) -> Iterator[tuple[Any, list[str]]]:
    """Open ``html_path`` with the network blocked; yield ``(page, problems)`` once every plotly div rendered.

    ``problems`` collects console errors, uncaught exceptions, blocked (non-``file:``) requests, dialogs
    (``alert`` etc.) and plotly graph divs without a rendered ``svg.main-svg``; it keeps filling while the
    caller uses the page.
    """
    from playwright.sync_api import sync_playwright

    exe = chromium_path()
    if exe is None:
        raise RuntimeError("chromium is not installed (apt-get install -y chromium)")
    problems: list[str] = []

    def on_route(route: Any) -> None:
        url = route.request.url
        if url.startswith(("file:", "data:", "blob:")):
            route.continue_()
        else:
            problems.append(f"network request blocked: {url}")
            route.abort()

    def on_console(msg: Any) -> None:
        if msg.type == "error":
            problems.append(f"console error: {msg.text}")

    def on_dialog(dialog: Any) -> None:
        problems.append(f"dialog opened ({dialog.type}): {dialog.message}")
        dialog.dismiss()

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, args=CHROMIUM_FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.on("console", on_console)
            page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
            page.on("dialog", on_dialog)
            page.route("**/*", on_route)
            page.goto(Path(html_path).resolve().as_uri(), wait_until="load", timeout=RENDER_TIMEOUT_MS)
            n_divs = page.locator("div.plotly-graph-div").count()
            if n_divs:
                try:
                    page.wait_for_function(
                        f"n => ({_RENDERED_JS})().filter(f => f.ok).length >= n",
                        arg=n_divs,
                        timeout=RENDER_TIMEOUT_MS,
                    )
                except Exception:  # noqa: BLE001 - reported below, figure by figure
                    pass
            figs = page.evaluate(_RENDERED_JS)
            for i, fig in enumerate(figs):
                if not fig["ok"]:
                    problems.append(f"plotly figure {i + 1} of {len(figs)} (#{fig['id']}) did not render")
            yield page, problems
        finally:
            browser.close()


_RENDERED_JS = """() => Array.from(document.querySelectorAll('div.plotly-graph-div')).map(d => ({
    id: d.id,
    ok: d.classList.contains('js-plotly-plot') && d.querySelector('.plot-container svg.main-svg') !== null
}))"""


def screenshot(
    html_path: str | Path, png_path: str | Path, width: int = 1400, height: int = 1800
) -> list[str]:
    """Open ``html_path`` in headless Chromium, save a full-page PNG and return the problems (open_page).

    An empty list means: no console or page errors, no network requests, no dialogs, every figure rendered.
    """
    with open_page(html_path, width, height) as (page, problems):
        Path(png_path).parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(png_path), full_page=True)
    return problems

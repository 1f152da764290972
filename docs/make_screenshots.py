"""Regenerate the README screenshots: docs/img/<page>.png for every page type, from real runs on SmolLM2-135M.

Runs ``normscope report smollm2-135m`` (index, sinks, depth-curse, grads, hubness, dla pages),
``normscope compare smollm2-135m minilm-l6`` and a 12-step ``normscope remove-ln`` that removes the final norm
only, all with small settings (about 1k tokens) so that the whole script takes a few minutes on one CPU core.
Each page is opened offline in headless Chromium (tests/browser.py) and 1400 x 1000 pixels are saved: the top of
the index, and each other page from its "Figures" heading down. The script fails, listing them, when a page has
console errors, network requests or figures that did not render.

Usage (from the repository root, with the virtual environment active)::

    OMP_NUM_THREADS=1 python docs/make_screenshots.py                # reports go to a temporary folder
    OMP_NUM_THREADS=1 python docs/make_screenshots.py --work /tmp/s  # keep them (and reuse: --skip-runs)

The numbers on these pages come from 1k tokens and 12 training steps: they show what each page looks like,
not results to quote.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.browser import open_page  # noqa: E402  (needs the repository root on sys.path)

IMG_DIR = ROOT / "docs" / "img"
WIDTH, HEIGHT = 1400, 1000  # the viewport that is saved: the top of each page
MODEL, OTHER = "smollm2-135m", "minilm-l6"

FIGURES = "Figures"  # the section heading an analysis page's screenshot starts at: its first figures
# page name in docs/img -> (the HTML file under the work folder, the <h2> the screenshot starts at; None: the top)
PAGES: dict[str, tuple[str, str | None]] = {
    "index": ("report/index.html", None),
    "sinks": ("report/sinks.html", FIGURES),
    "depth-curse": ("report/depth.html", FIGURES),
    "grads": ("report/grads.html", FIGURES),
    "hubness": ("report/hubness.html", FIGURES),
    "dla": ("report/dla.html", FIGURES),
    "compare": ("compare/compare.html", FIGURES),
    "remove-ln": ("remove-ln/remove-ln.html", FIGURES),
}
MARGIN = 16  # pixels kept above the heading


def commands(work: Path, max_tokens: int) -> list[list[str]]:
    """The normscope command lines (without the program name) that write every page under ``work``."""
    tokens = ["--max-tokens", str(max_tokens)]
    return [
        ["report", MODEL, *tokens, "--out", str(work / "report")],
        ["compare", MODEL, OTHER, *tokens, "--out", str(work / "compare")],
        ["remove-ln", MODEL, "--sites", "ln_final", "--steps", "12", "--batch-size", "2", "--seq-len", "64",
         "--eval-max-tokens", "512", "--no-export", "--run-dir", str(work / "run"), "--out", str(work / "remove-ln")],
    ]


def normscope_exe() -> str:
    """The ``normscope`` script of the running interpreter's environment (then whatever is on PATH)."""
    local = Path(sys.executable).with_name("normscope")
    found = str(local) if local.exists() else shutil.which("normscope")
    if found is None:
        sys.exit("normscope is not installed in this environment (pip install -e .)")
    return found


def run_commands(work: Path, max_tokens: int) -> None:
    """Run each command in turn, one thread each unless OMP_NUM_THREADS says otherwise; stop at a failure."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    exe = normscope_exe()
    for cmd in commands(work, max_tokens):
        t0 = time.perf_counter()
        print("$ normscope " + " ".join(cmd), flush=True)
        subprocess.run([exe, *cmd, "--quiet"], check=True, env=env)
        print(f"  {time.perf_counter() - t0:.0f} s", flush=True)


def take_screenshot(html: Path, png: Path, heading: str | None = None) -> list[str]:
    """Save WIDTH x HEIGHT pixels of ``html`` to ``png``, from the top or from the ``<h2>`` named ``heading``;
    return the problems tests/browser.py saw (console errors, network requests, figures not rendered)."""
    with open_page(html, WIDTH, HEIGHT) as (page, problems):
        png.parent.mkdir(parents=True, exist_ok=True)
        box = page.locator("h2", has_text=heading).first.bounding_box() if heading else None
        if box is None:
            page.screenshot(path=str(png), full_page=False)
        else:
            page_height = page.evaluate("document.documentElement.scrollHeight")
            top = max(0.0, min(box["y"] - MARGIN, page_height - HEIGHT))
            page.screenshot(path=str(png), full_page=True, clip={"x": 0, "y": top, "width": WIDTH, "height": HEIGHT})
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, help="folder for the reports (default: a temporary one)")
    parser.add_argument("--max-tokens", type=int, default=1024, help="tokens per analysis (default 1024)")
    parser.add_argument("--skip-runs", action="store_true", help="screenshot the reports already in --work")
    args = parser.parse_args()
    if args.skip_runs and args.work is None:
        parser.error("--skip-runs needs --work")
    with tempfile.TemporaryDirectory(prefix="normscope-shots-") as tmp:
        work = (args.work or Path(tmp)).resolve()
        if not args.skip_runs:
            run_commands(work, args.max_tokens)
        failed: dict[str, list[str]] = {}
        for name, (rel, heading) in PAGES.items():
            png = IMG_DIR / f"{name}.png"
            problems = take_screenshot(work / rel, png, heading)
            print(f"{png.relative_to(ROOT)}: {png.stat().st_size / 1024:.0f} kB"
                  + (f", {len(problems)} problem(s)" if problems else ""))
            if problems:
                failed[name] = problems
    if failed:
        for name, problems in failed.items():
            print(f"{name}:\n  " + "\n  ".join(problems), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

"""Every page type opens from disk in headless Chromium with no network, no console errors and every figure
rendered (issue 6). Sinks, the index and compare are covered in test_cli.py and test_suite.py; this file runs
the other commands on a tiny model, with the small settings their own CLI tests use, and screenshots each page."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.browser import require_chromium, screenshot
from tests.tiny import save_tiny, tiny_llama, tiny_tokenizer

TEXT = (
    "It was a bright cold day in April, and the clocks were striking thirteen. The hallway smelt of boiled cabbage "
    "and old rag mats. At one end of it a coloured poster, too large for indoor display, had been tacked to the "
    "wall. It depicted simply an enormous face, more than a metre wide: the face of a man of about forty-five, "
    "with a heavy black moustache and ruggedly handsome features. "
)

# command -> (page written, arguments after the model folder; {root} and {tmp} are filled in)
PAGES: dict[str, tuple[str, list[str]]] = {
    "depth-curse": ("depth.html", ["--seq-len", "32", "--max-tokens", "256", "--skip-layers", "0-1", "--window", "1"]),
    "grads": ("grads.html", ["--seq-len", "16", "--max-tokens", "64"]),
    "hubness": ("hubness.html", ["--k", "3", "--max-tokens", "256", "--seq-len", "32"]),
    "dla": ("dla.html", ["--max-tokens", "128", "--seq-len", "32", "--neurons", "2"]),
    "remove-ln": ("remove-ln.html", ["--text", "{root}/train.txt", "--eval-text", "{root}/eval.txt", "--steps", "10",
                                     "--seq-len", "32", "--batch-size", "4", "--run-dir", "{tmp}/run",
                                     "--no-export"]),
}
MIN_PNG_BYTES = 10_000  # a blank or unstyled page compresses far below this


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    r = tmp_path_factory.mktemp("pages")
    save_tiny(tiny_llama(n_layers=3), tiny_tokenizer(), r / "llama")
    (r / "train.txt").write_text(TEXT * 12)
    (r / "eval.txt").write_text(TEXT[::-1] * 3)
    return r


@pytest.mark.parametrize("command", sorted(PAGES))
def test_page_renders_offline_in_chromium(command: str, root: Path, tmp_path: Path) -> None:
    from normscope.cli import app

    require_chromium()
    page, extra = PAGES[command]
    args = [a.format(root=root, tmp=tmp_path) for a in extra]
    res = CliRunner().invoke(app, [command, str(root / "llama"), *args, "--out", str(tmp_path / "rep"), "--quiet"])
    assert res.exit_code == 0, res.output
    png = tmp_path / f"{command}.png"
    assert screenshot(tmp_path / "rep" / page, png) == []
    assert png.stat().st_size > MIN_PNG_BYTES

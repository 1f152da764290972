"""The analysis contract, checked over the whole registry: every command has every shared option and refuses
bad input in one line before loading, `normscope X` and `normscope report --only X` write the same JSON, and
`compare` overlays the per-depth curves of every analysis. Adding an analysis to the registry adds it here."""

from __future__ import annotations

import ast
import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from normscope.analyses import REGISTRY
from normscope.cli import app
from normscope.core.options import ModelOptions, OutputOptions, TextOptions, flag_name
from tests.tiny import save_tiny, tiny_llama, tiny_tokenizer

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--seq-len", "16", "--max-tokens", "128", "--batch-size", "4"]
# per-analysis settings that keep the tiny runs short; the same for the command and for report
FAST = {"hubness": ["--k", "3"], "dla": ["--neurons", "1"]}


def _flags(cls: type) -> list[str]:
    return [flag_name(f) for f in dataclasses.fields(cls) if f.metadata.get("cli", True) and f.name != "model"]


SHARED_FLAGS = _flags(ModelOptions) + _flags(TextOptions) + _flags(OutputOptions)


def _help(*args: str) -> str:
    res = runner.invoke(app, [*args, "--help"], env={"COLUMNS": "220"})
    assert res.exit_code == 0, res.output
    return re.sub(r"[\u2502\s]+", " ", res.output)


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return save_tiny(tiny_llama(n_layers=3), tiny_tokenizer(), tmp_path_factory.mktemp("contract") / "llama")


@pytest.fixture(scope="module")
def llama2(tmp_path_factory) -> Path:
    return save_tiny(tiny_llama(seed=1, n_layers=2), tiny_tokenizer(), tmp_path_factory.mktemp("contract2") / "l2")


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_command_has_every_shared_option_and_its_own(name: str) -> None:
    spec = REGISTRY[name]
    text = _help(spec.command)
    for flag in SHARED_FLAGS + _flags(spec.options):
        assert f" {flag}" in text, f"{spec.command} --help lacks {flag}"
    report = _help("report")
    for flag in _flags(spec.options):  # report and compare carry it under the analysis' name
        assert f" --{name}-{flag[2:]}" in report


def test_option_help_comes_from_the_field_docstrings() -> None:
    text = _help("sinks")
    assert "Sink threshold: a (sequence, layer, head) is a sink when alpha_1 exceeds it" in text
    assert "Tokens per sequence T, specials included" in text  # the text group's docstring


def _bad_inputs(tmp_path: Path) -> list[tuple[list[str], str]]:
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    return [
        (["--dtype", "float8"], "--dtype must be one of"),
        (["--bos", "maybe"], "--bos must be one of"),
        (["--seq-len", "1"], "--seq-len must be at least 2"),
        (["--max-tokens", "0"], "--max-tokens must be at least 1"),
        (["--text", str(tmp_path / "missing.txt")], "does not exist"),
        (["--out", str(a_file)], "is a file"),
    ]


@pytest.mark.parametrize("name", list(REGISTRY))
def test_bad_input_is_one_line_and_exit_2_before_loading(name: str, tmp_path: Path) -> None:
    spec = REGISTRY[name]
    missing_model = str(tmp_path / "no-such-model")  # had anything loaded, the error would name the model
    for args, words in _bad_inputs(tmp_path):
        res = runner.invoke(app, [spec.command, missing_model, *args])
        assert res.exit_code == 2, (spec.command, args, res.output)
        assert words in res.output and "Traceback" not in res.output, (spec.command, args, res.output)
        assert res.output.strip().count("\n") == 0 or res.output.startswith("warning"), res.output


def test_analysis_options_are_checked_before_loading(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-model")
    for args, words in ((["sinks", missing, "--eps", "1.5"], "--eps must be (0, 1), got 1.5"),
                        (["sinks", missing, "--eps", "0"], "--eps must be (0, 1)"),
                        (["hubness", missing, "--layers", "5-3"], "runs backwards"),
                        (["depth-curse", missing, "--skip-layers", "x"], "malformed"),
                        (["report", missing, "--sinks-eps", "2"], "--sinks-eps must be"),
                        (["report", missing, "--only", "sinks,nope"], "Unknown analysis 'nope'")):
        res = runner.invoke(app, args)
        assert res.exit_code == 2 and words in res.output and "Traceback" not in res.output, (args, res.output)


def test_an_earlier_run_is_never_overwritten_unasked(llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "r"
    args = ["sinks", str(llama), *SMALL, "--out", str(out), "-q"]
    assert runner.invoke(app, args).exit_code == 0
    before = (out / "sinks.json").read_bytes()
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and "--force" in res.output and "earlier run" in res.output
    assert (out / "sinks.json").read_bytes() == before
    assert runner.invoke(app, [*args, "--force"]).exit_code == 0


def test_each_command_and_report_write_byte_identical_json(llama: Path, tmp_path: Path) -> None:
    rep = tmp_path / "report"
    fast = [f"--{n}-{a[2:]}" if i % 2 == 0 else a for n, args in FAST.items() for i, a in enumerate(args)]
    res = runner.invoke(app, ["report", str(llama), *SMALL, *fast, "--out", str(rep), "-q"])
    assert res.exit_code == 0, res.output
    index = (rep / "index.html").read_text()
    for name, spec in REGISTRY.items():
        one = tmp_path / name
        res = runner.invoke(app, [spec.command, str(llama), *SMALL, *FAST.get(name, []), "--out", str(one), "-q"])
        assert res.exit_code == 0, res.output
        assert (one / f"{name}.json").read_bytes() == (rep / f"{name}.json").read_bytes(), name
        assert f'href="{name}.html"' in index
        # every page says what text went in, sequence kinds included
        assert json.loads((one / f"{name}.json").read_text())["meta"]["text"]["categories"]
    losses = set(re.findall(r'<div class="value">([0-9.]+)</div><div class="label">loss', index))
    assert len(losses) <= 1, losses  # one text, one loss on every card


def test_compare_overlays_the_curves_of_every_analysis(llama: Path, llama2: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    fast = [f"--{n}-{a[2:]}" if i % 2 == 0 else a for n, args in FAST.items() for i, a in enumerate(args)]
    res = runner.invoke(app, ["compare", str(llama), str(llama2), *SMALL, *fast, "--out", str(out), "-q"])
    assert res.exit_code == 0, res.output
    page = (out / "compare.html").read_text()
    titles = re.findall(r"<h3>([^<]+)</h3>", page)
    for spec in REGISTRY.values():
        assert any(t.startswith(f"{spec.command}: ") for t in titles), (spec.command, titles)
    assert not [t for t in titles if re.search(r"\b[a-z]+\.[a-z0-9]+_[a-z0-9_]+\b", t)]  # words, not JSON paths
    assert "sinks: top-1 |h|, by layer" in titles and "headline deltas" in titles
    settings = page[page.index('<section class="settings">'):page.index("</section>")]
    assert "\u2014" not in settings  # no dashes in Settings
    assert (out / "index.html").exists() and 'href="compare.html"' in (out / "index.html").read_text()


# ---- layering ----------------------------------------------------------------------------------------
def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_no_analysis_imports_another_analysis() -> None:
    for pkg in (ROOT / "normscope" / "analyses").iterdir():
        if not pkg.is_dir() or pkg.name.startswith("_"):
            continue
        for py in pkg.glob("*.py"):
            for mod in _imports(py):
                m = re.match(r"normscope\.analyses\.(\w+)", mod)
                if m and m.group(1) not in (pkg.name, "base"):
                    raise AssertionError(f"{py.relative_to(ROOT)} imports {mod}")


def _modules_that_must_stay_light() -> list[str]:
    mods = ["normscope.cli", "normscope.core.options", "normscope.core.layers", "normscope.analyses"]
    for pkg in sorted((ROOT / "normscope" / "analyses").iterdir()):
        for stem in ("options", "metrics", "reducers", "summary", "interventions", "plan", "params", "losses",
                     "direct"):
            if (pkg / f"{stem}.py").exists():
                mods.append(f"normscope.analyses.{pkg.name}.{stem}")
    return mods


def test_math_and_cli_modules_never_import_plotly() -> None:
    mods = _modules_that_must_stay_light()
    code = ("import importlib, sys\n"
            f"for m in {mods!r}:\n    importlib.import_module(m)\n"
            "bad = [m for m in ('plotly',) if m in sys.modules]\nprint(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "", f"plotly imported by one of {mods}"


def test_help_imports_neither_torch_nor_transformers() -> None:
    code = ("import sys\nfrom normscope.cli import app\n"
            "print(','.join(m for m in ('torch', 'transformers', 'plotly', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == ""

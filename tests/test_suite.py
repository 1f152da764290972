"""`normscope report` (several analyses, one load, an index page) and `normscope compare`."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from normscope.analyses import REGISTRY, RunContext, suite
from normscope.analyses.base import parse_only
from normscope.cli import app
from normscope.core.errors import NormscopeError
from normscope.report import Result
from tests.tiny import save_tiny, tiny_gpt2, tiny_llama, tiny_tokenizer

runner = CliRunner()


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("suite")
    return {
        "llama2": save_tiny(tiny_llama(), tiny_tokenizer(), root / "llama2"),
        "llama3": save_tiny(tiny_llama(seed=1, n_layers=3), tiny_tokenizer(), root / "llama3"),
        "gpt2": save_tiny(tiny_gpt2(), tiny_tokenizer(), root / "gpt2"),
    }


def test_parse_only() -> None:
    assert parse_only(None) == list(REGISTRY)
    assert parse_only("depth, sinks,depth-curse") == ["depth", "sinks"]  # a command name works too
    with pytest.raises(NormscopeError, match="Unknown analysis"):
        parse_only("sinks,bogus")


def test_relative_depth() -> None:
    assert suite.relative_depth(pd.Series([0, 1, 2, 3])).tolist() == [0.0, 1 / 3, 2 / 3, 1.0]
    assert suite.relative_depth(pd.Series([5])).tolist() == [0.0]


def _result(values: list[float], analysis: str = "depth") -> Result:
    """A result shaped like depth's: a per-block table whose depth axis is declared, with a text column."""
    df = pd.DataFrame({"block": range(len(values)), "rel_update": values, "where": [f"b{i}" for i in
                                                                                   range(len(values))]})
    return Result(analysis=analysis, title="t", meta={}, payload={}, tables={"blocks": df}, headlines={"g": 1.0},
                  axes={"blocks": "block"}, labels={"rel_update": "relative update"})


def test_compare_results_same_and_different_depth() -> None:
    figs, df = suite.compare_results("depth", _result([1.0, 2.0]), _result([1.5, 2.5]), "A", "B")
    assert len(figs) == 1 and df["delta"].tolist() == [0.5, 0.5] and df["depth"].tolist() == [0, 1]
    assert df["relative_delta"].tolist() == [0.5, 0.25]
    assert figs[0].title == "depth-curse: relative update, by block (blocks)"  # words, not JSON paths
    assert figs[0].fig.layout.xaxis.title.text == "block"
    figs, df = suite.compare_results("depth", _result([1.0, 3.0]), _result([1.0, 2.0, 3.0]), "A", "B")
    x_b = figs[0].fig.data[1].x
    assert list(x_b) == [0.0, 0.5, 1.0]  # relative depth when the block counts differ
    assert len(df) == 1 and df["delta"].iloc[0] == pytest.approx(0.0)


def test_compare_ignores_tables_without_a_declared_axis() -> None:
    a, b = _result([1.0, 2.0]), _result([1.5, 2.5])
    a.axes, b.axes = {}, {}
    assert suite.compare_results("depth", a, b, "A", "B")[0] == []


def test_report_runs_several_analyses_with_one_load(dirs, tmp_path) -> None:
    out = tmp_path / "rep"
    res = runner.invoke(app, ["report", str(dirs["llama2"]), "--only", "sinks,depth", "--seq-len", "16",
                              "--max-tokens", "256", "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    index = (out / "index.html").read_text()
    assert 'href="sinks.html"' in index and 'href="depth.html"' in index
    assert (out / "sinks.json").exists() and (out / "depth.json").exists()
    assert 'href="index.html"' in (out / "sinks.html").read_text()  # pages link back to the index


def test_suite_skips_dla_for_encoders_with_a_reason() -> None:
    from normscope.core.text import sample_from_ids
    from tests.test_sinks import _rows, _tiny_lm
    from tests.tiny import tiny_bert

    lm = _tiny_lm(tiny_bert(), causal=False)
    runs = suite.run_suite(RunContext.build(lm, sample_from_ids(_rows(2, 8), ["x"] * 2)), ["sinks", "dla"])
    assert runs[0].result is not None and runs[0].error is None
    assert runs[1].result is None and "causal" in runs[1].error


def test_compare_different_depths(dirs, tmp_path) -> None:
    out = tmp_path / "cmp"
    res = runner.invoke(app, ["compare", str(dirs["llama2"]), str(dirs["llama3"]), "--only", "sinks",
                              "--seq-len", "16", "--max-tokens", "256", "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    data = json.loads((out / "compare.json").read_text())
    assert data["same_depth"] is False
    assert data["headline_deltas"] and data["layer_deltas"]
    assert all(r["depth"] is None for r in data["layer_deltas"])


def test_compare_and_index_render_in_chromium(dirs, tmp_path) -> None:
    from tests.browser import require_chromium, screenshot

    require_chromium()
    out = tmp_path / "cmp"
    res = runner.invoke(app, ["compare", str(dirs["llama2"]), str(dirs["gpt2"]), "--only", "sinks",
                              "--seq-len", "16", "--max-tokens", "128", "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    assert screenshot(out / "compare.html", tmp_path / "compare.png") == []
    rep = tmp_path / "rep"
    res = runner.invoke(app, ["report", str(dirs["gpt2"]), "--only", "sinks", "--seq-len", "16",
                              "--max-tokens", "128", "--out", str(rep), "--quiet"])
    assert res.exit_code == 0, res.output
    assert screenshot(rep / "index.html", tmp_path / "index.png") == []


def test_same_seed_gives_byte_identical_json(dirs, tmp_path) -> None:
    outs = []
    for i in range(2):
        out = tmp_path / f"run{i}"
        res = runner.invoke(app, ["sinks", str(dirs["gpt2"]), "--seq-len", "16", "--max-tokens", "256",
                                  "--seed", "7", "--out", str(out), "--quiet"])
        assert res.exit_code == 0, res.output
        outs.append((out / "sinks.json").read_bytes())
    assert outs[0] == outs[1]


def test_report_carries_each_analysis_options_under_its_name(dirs, tmp_path) -> None:
    out = tmp_path / "rep"
    res = runner.invoke(app, ["report", str(dirs["llama3"]), "--only", "depth", "--depth-skip-layers", "1",
                              "--seq-len", "16", "--max-tokens", "128", "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "depth.json").read_text())["skip_layers"] == [1]
    res = runner.invoke(app, ["report", str(dirs["llama3"]), "--only", "depth", "--depth-skip-layers", "0-x",
                              "--out", str(tmp_path / "bad")])
    assert res.exit_code == 2 and "Traceback" not in res.output and "--depth-skip-layers" in res.output
    assert not (tmp_path / "bad").exists()  # refused before loading anything

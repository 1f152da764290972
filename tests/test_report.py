"""Tests of the report writer: JSON determinism, atomic writes, CSV round trips, escaping, inlined plotly.js.

Browser tests use headless Chromium through tests/browser.py and skip when it is not installed.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
import os
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch
from plotly.offline import get_plotlyjs

from normscope.core import io as atomic_io
from normscope.report import (
    SCHEMA_VERSION,
    Figure,
    ReportPaths,
    Result,
    atomic_write_bytes,
    atomic_write_text,
    dumps_json,
    escape_figure_data,
    heatmap_layer_head,
    line_per_layer,
    make_meta,
    plot_text,
    render_html,
    to_jsonable,
    write_report,
)
from normscope.report import html as report_html

HOSTILE = "</script><script>alert(1)</script><img src=x onerror=alert(2)>"


# ------------------------------------------------------------------------------------------------------------
# helpers


class TagCounter(HTMLParser):
    """Counts start tags the way a browser tokenizer sees them (script bodies are raw text)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: dict[str, int] = {}
        self.script_src: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags[tag] = self.tags.get(tag, 0) + 1
        if tag == "script":
            self.script_src += [v or "" for k, v in attrs if k == "src"]


def count_tags(page: str) -> TagCounter:
    parser = TagCounter()
    parser.feed(page)
    parser.close()
    return parser


def make_result(text: str = "plain", n_figures: int = 2, timings: dict[str, float] | None = None) -> Result:
    """A result with every field filled, ``text`` injected into every user-facing string."""
    values = np.arange(12, dtype=float).reshape(4, 3) - 5.0  # [layer, head]
    layers = pd.DataFrame(
        {
            "layer": np.arange(4),
            "resid_norm": [2.7, 31.5, 250.25, float("nan")],
            "token": ["the", text, "a&b", "<b>x</b>"],
        }
    )
    figs = [
        Figure(
            f"Heads {text}",
            heatmap_layer_head(values, f"heat {text}", "score", diverging=True),
            f"Cap {text}.",
        ),
        Figure(f"Norms {text}", line_per_layer(layers, ys=["resid_norm"], title=text), f"Look {text}."),
    ][:n_figures]
    meta = {
        "model": {"name": f"model {text}", "revision": "abc123", "dtype": "float32", "device": "cpu"},
        "text": {"source": f"/data/{text}.txt", "n_tokens": 512, "seq_len": 128, "bos_prepended": False},
        "seed": 0,
        "versions": {"normscope": "0.1.0", "torch": "2.x", "transformers": "5.x"},
        "options": {"eps": 0.3, "note": text},
    }
    return Result(
        analysis="sinks",
        title=f"Attention sinks {text}",
        meta=meta,
        payload={
            "sink_rate": np.float32(0.75),
            "layers": [
                {"layer": np.int64(i), "value": float(v)} for i, v in enumerate([1.5, float("nan"), 3.0])
            ],
            "shape": (4, 3),
            "scores": torch.tensor([[1.0, float("inf")], [2.0, 3.0]]),
            "token": text,
        },
        tables={
            "layers": layers,
            "heads": pd.DataFrame({"name": [f"L0H{h}" for h in range(3)], "x": [0.1, 0.2, 0.3]}),
        },
        figures=figs,
        headlines={"sink_rate_pct": 75.0, f"label {text}": text, "n_heads": np.int64(12)},
        summary=[f"Paragraph one {text}.", "Paragraph two."],
        references=[f"Gu et al. 2024, When Attention Sink Emerges (arXiv:2410.10781) {text}"],
        timings=timings if timings is not None else {"forward": 1.25, f"step {text}": 0.5},
    )


def temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# ------------------------------------------------------------------------------------------------------------
# JSON


def test_to_jsonable_converts_numpy_torch_nan_and_containers() -> None:
    @dataclasses.dataclass
    class Point:
        x: float
        path: Path

    obj = {
        "np_float": np.float32(1.5),
        "np_int": np.int64(7),
        "np_bool": np.bool_(True),
        "np_nan": np.float64("nan"),
        "inf": float("inf"),
        "neg_inf": -math.inf,
        "tuple": (1, (2, 3)),
        "array": np.array([[1.0, np.nan], [np.inf, 2.0]]),
        "tensor": torch.tensor([1.0, float("nan")], dtype=torch.bfloat16),
        "scalar_tensor": torch.tensor(3),
        "set": {"b", "a"},
        "path": Path("reports/x.html"),
        "dataclass": Point(float("nan"), Path("a/b")),
        5: "int key",
        "series": pd.Series([1.0, None]),
        "na": pd.NA,
    }
    out = to_jsonable(obj)
    assert out == {
        "np_float": 1.5,
        "np_int": 7,
        "np_bool": True,
        "np_nan": None,
        "inf": None,
        "neg_inf": None,
        "tuple": [1, [2, 3]],
        "array": [[1.0, None], [None, 2.0]],
        "tensor": [1.0, None],
        "scalar_tensor": 3,
        "set": ["a", "b"],
        "path": "reports/x.html",
        "dataclass": {"x": None, "path": "a/b"},
        "5": "int key",
        "series": [1.0, None],
        "na": None,
    }
    assert type(out["np_float"]) is float and type(out["np_int"]) is int and type(out["np_bool"]) is bool
    json.dumps(out, allow_nan=False)  # strict JSON: no NaN tokens left
    with pytest.raises(TypeError):
        to_jsonable({"x": object()})


def test_result_json_layout_and_nan_to_null() -> None:
    d = make_result().to_json_dict()
    assert list(d)[:7] == ["schema_version", "analysis", "title", "meta", "headlines", "labels", "summary"]
    assert d["schema_version"] == SCHEMA_VERSION and d["analysis"] == "sinks"
    assert d["sink_rate"] == pytest.approx(0.75) and d["shape"] == [4, 3]
    assert d["layers"][1] == {"layer": 1, "value": None}
    assert d["scores"] == [[1.0, None], [2.0, 3.0]]
    assert d["headlines"]["n_heads"] == 12
    text = dumps_json(make_result())
    assert "NaN" not in text and "Infinity" not in text and '"value": null' in text
    with pytest.raises(ValueError, match="reserved"):
        dataclasses.replace(make_result(), payload={"meta": 1}).to_json_dict()


def test_json_is_byte_identical_and_free_of_timings_and_paths(tmp_path: Path) -> None:
    a = write_report(make_result(timings={"forward": 1.0}), tmp_path / "run_a")
    b = write_report(make_result(timings={"forward": 150.0, "extra": 3.0}), tmp_path / "run_b" / "deeper")
    ja, jb = a.json.read_bytes(), b.json.read_bytes()
    assert ja == jb
    assert dumps_json(make_result().to_json_dict()).encode() == ja
    text = ja.decode()
    assert str(tmp_path) not in text and "forward" not in text and "timings" not in text
    # ...while the HTML does show the timings
    assert "forward" in b.html.read_text() and "2 min 30 s" in b.html.read_text()


# ------------------------------------------------------------------------------------------------------------
# atomic writes


def test_atomic_write_creates_parents_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "out.json"
    atomic_write_text(target, "héllo\n")
    assert target.read_bytes() == "héllo\n".encode()
    atomic_write_bytes(target, b"second")
    assert target.read_bytes() == b"second"
    assert temp_files(target.parent) == [] and sorted(os.listdir(target.parent)) == ["out.json"]
    assert target.stat().st_mode & 0o044  # readable by others (mkstemp alone would give 0600)


def test_atomic_write_keeps_old_file_when_the_write_fails_midway(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "report.html"
    target.write_text("OLD CONTENT")
    real_fdopen = os.fdopen
    seen: list[str] = []

    class HalfWriter:
        """Writes half the data into the temp file, then fails like a full disk."""

        def __init__(self, fh) -> None:  # noqa: ANN001
            self.fh = fh

        def __enter__(self) -> HalfWriter:
            return self

        def __exit__(self, *exc: object) -> None:
            self.fh.close()

        def write(self, data: bytes) -> int:
            self.fh.write(data[: len(data) // 2])
            self.fh.flush()
            seen.extend(temp_files(tmp_path))  # the partial temp file exists at this point
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic_io.os, "fdopen", lambda fd, mode: HalfWriter(real_fdopen(fd, mode)))
    with pytest.raises(OSError, match="No space"):
        atomic_write_text(target, "NEW CONTENT " * 1000)
    assert len(seen) == 1 and seen[0].startswith(".report.html.")
    assert target.read_text() == "OLD CONTENT"
    assert temp_files(tmp_path) == []


@pytest.mark.parametrize("fail_at", ["fsync", "replace"])
def test_atomic_write_keeps_old_file_when_fsync_or_replace_fails(
    tmp_path: Path, monkeypatch, fail_at
) -> None:
    target = tmp_path / "data.csv"
    target.write_bytes(b"old")

    def boom(*args: object) -> None:
        raise OSError(f"simulated {fail_at} failure")

    monkeypatch.setattr(atomic_io.os, fail_at, boom)
    with pytest.raises(OSError, match="simulated"):
        atomic_write_bytes(target, b"new data")
    assert target.read_bytes() == b"old"
    assert temp_files(tmp_path) == []


def test_write_report_failure_while_rendering_touches_no_file(tmp_path: Path) -> None:
    good = write_report(make_result(), tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    bad = make_result()
    bad.payload["oops"] = object()  # not JSON-serialisable: fails before anything is written
    with pytest.raises(TypeError):
        write_report(bad, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert good.html.exists()


# ------------------------------------------------------------------------------------------------------------
# files and CSV


def test_write_report_files_and_csv_round_trip(tmp_path: Path) -> None:
    res = make_result(HOSTILE)
    indexed = pd.DataFrame(
        {"value": [1.0, 2.5e-7, -3.0]}, index=pd.Index(["ln1", "ln2", "ln_final"], name="site")
    )
    res.tables["sites"] = indexed
    paths = write_report(res, tmp_path / "out")
    assert isinstance(paths, ReportPaths)
    assert paths.html == tmp_path / "out" / "sinks.html" and paths.json == tmp_path / "out" / "sinks.json"
    assert [p.name for p in paths.csvs] == ["sinks_layers.csv", "sinks_heads.csv", "sinks_sites.csv"]
    assert sorted(os.listdir(tmp_path / "out")) == sorted(  # and the folder's index
        ["index.html", "sinks.html", "sinks.json", "sinks_layers.csv", "sinks_heads.csv", "sinks_sites.csv"]
    )
    back = pd.read_csv(paths.csvs[0], keep_default_na=False, na_values=[""])
    pd.testing.assert_frame_equal(back, res.tables["layers"], check_dtype=False)
    assert back["token"][1] == HOSTILE and math.isnan(back["resid_norm"][3])
    assert back["resid_norm"][2] == 250.25  # full precision, not the page's rounding
    pd.testing.assert_frame_equal(pd.read_csv(paths.csvs[1]), res.tables["heads"])
    pd.testing.assert_frame_equal(pd.read_csv(paths.csvs[2], index_col="site"), indexed)
    assert json.loads(paths.json.read_text())["token"] == HOSTILE  # JSON keeps raw strings
    html_text = paths.html.read_text()
    for name in ("sinks_layers.csv", "sinks_heads.csv", "sinks_sites.csv", "sinks.json"):
        assert f'href="{name}"' in html_text
    assert "full table in" in html_text and 'href="index.html"' in html_text


def test_table_names_must_be_safe_file_names(tmp_path: Path) -> None:
    res = make_result()
    res.tables = {"../escape": pd.DataFrame({"a": [1]})}
    with pytest.raises(ValueError, match="file name"):
        write_report(res, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_long_table_shows_first_rows_and_points_to_csv() -> None:
    res = make_result()
    res.tables = {"big": pd.DataFrame({"i": np.arange(120), "v": np.linspace(0, 1, 120)})}
    page = render_html(res)
    table = page[page.index('id="table-big"') :]
    table = table[: table.index("</table>")]
    assert table.count("<tr>") == 1 + report_html.MAX_TABLE_ROWS  # header + 50 rows
    assert f"First {report_html.MAX_TABLE_ROWS} of 120 rows; full table in" in page and "sinks_big.csv" in page


# ------------------------------------------------------------------------------------------------------------
# HTML: escaping, plotly inlined once, settings


def test_hostile_strings_are_escaped_everywhere() -> None:
    page = render_html(make_result(HOSTILE))
    benign = render_html(make_result("plain"))
    assert HOSTILE not in page and "<img" not in page and "alert(1)</script>" not in page
    escaped = html.escape(HOSTILE)
    for place in (
        f"<h1>Attention sinks {escaped}</h1>",  # title
        f"model {escaped}",  # meta: model name
        f"/data/{escaped}.txt",  # meta: text source
        f"<td>{escaped}</td>",  # meta: options.note (More settings) and table cell
        f"<h3>Heads {escaped}</h3>",  # figure title
        f"Cap {escaped}.",  # caption
        f"<p>Paragraph one {escaped}.</p>",  # summary
        f"(arXiv:2410.10781) {escaped}",  # reference
        f'<div class="value long">{escaped}</div>',  # headline value (long: small type)
        f"step {escaped}",  # timings key
    ):
        assert place in page, place
    tags, tags_benign = count_tags(page), count_tags(benign)
    assert tags.tags == tags_benign.tags  # nothing injected: the same elements as the benign page
    assert "img" not in tags.tags


def test_hostile_token_strings_in_figure_data_cannot_break_out() -> None:
    fig = go.Figure(go.Bar(x=[HOSTILE, "the"], y=[1.0, 2.0], text=[HOSTILE, "x"], name=HOSTILE))
    fig.update_layout(title="raw title")
    # plotly's own JSON encoder escapes < > / inside the script: the first line of defence
    raw = fig.to_html(full_html=False, include_plotlyjs=False)
    assert "</script><script>alert" not in raw and "\\u003c\\u002fscript\\u003e" in raw
    res = dataclasses.replace(make_result(), figures=[Figure("t", fig, "c")])
    page = render_html(res)
    assert HOSTILE not in page and page.count("<script") == count_tags(page).tags["script"]
    assert count_tags(page).tags["script"] == 3  # plotly config + plotly.js + one newPlot call
    # second line: data strings are HTML-escaped so plotly.js shows them as text, not as markup
    d = escape_figure_data(fig)
    assert d["data"][0]["x"][0] == plot_text(HOSTILE) and d["data"][0]["name"] == plot_text(HOSTILE)
    assert (
        d["data"][0]["text"][0]
        == "&lt;/script&gt;&lt;script&gt;alert(1)&lt;/script&gt;&lt;img src=x onerror=alert(2)&gt;"
    )
    assert fig.data[0].x[0] == HOSTILE  # the caller's figure is untouched


def test_escape_figure_data_leaves_author_markup_and_numbers() -> None:
    fig = heatmap_layer_head(np.ones((2, 2)), "t <b>", "z<br>unit")
    d = escape_figure_data(fig)
    tr = d["data"][0]
    assert tr["hovertemplate"] == fig.data[0].hovertemplate  # author markup kept (and pre-escaped by helper)
    assert "z&lt;br&gt;unit" in tr["hovertemplate"]
    assert list(tr["x"]) == [0, 1] and tr["y"] == ["H0", "H1"]


def test_plotly_js_inlined_exactly_once_and_no_cdn() -> None:
    page = render_html(make_result(n_figures=2))
    bundle = get_plotlyjs()
    assert page.count(bundle[:200]) == 1
    assert page.count("plotly.js v") == bundle.count("plotly.js v")
    tags = count_tags(page)
    assert tags.script_src == []  # no <script src=...> at all, CDN or otherwise
    assert page.count("cdn.plot.ly") == bundle.count("cdn.plot.ly")  # only the bundle's own default URL
    assert 'id="fig-0"' in page and 'id="fig-1"' in page
    assert tags.tags["script"] == 4  # config + plotly.js + two newPlot calls
    no_figs = render_html(make_result(n_figures=0))
    assert bundle[:200] not in no_figs and "<script" not in no_figs


def test_settings_block_and_headlines() -> None:
    page = render_html(make_result())
    for label, value in [
        ("Model", "model plain"),
        ("Revision", "abc123"),
        ("Dtype", "float32"),
        ("Device", "cpu"),
        ("Tokens", "512"),
        ("Seq len", "128"),
        ("BOS prepended", "no"),
        ("Seed", "0"),
        ("Versions", "normscope 0.1.0 · torch 2.x · transformers 5.x"),
    ]:
        assert f"<dt>{html.escape(label)}</dt><dd>{html.escape(value)}</dd>" in page, label
    assert "<title>Attention sinks plain — model plain — normscope</title>" in page
    assert '<div class="value">75.00</div>' not in page and '<div class="value">75</div>' in page
    assert "options.eps" in page  # extra settings are listed under "More settings"
    order = [page.index(f"<h2>{h}</h2>") for h in ("Settings", "Interpretation", "Figures", "Tables")]
    order += [page.index(f"<h2>{h}</h2>") for h in ("References", "Files", "Timings")]
    assert order == sorted(order)
    assert page.index('class="cards"') < page.index("<h2>Interpretation</h2>")


def test_settings_fallbacks_and_visible_whitespace() -> None:
    meta = {"model": "plain-model-name", "text": None, "settings": {"seed": 7, "eps": 0.3}}
    res = Result("sinks", "T", meta, {}, tables={"t": pd.DataFrame({"token": [" ", "\n", "a"]})})
    page = render_html(res)
    assert "<dt>Model</dt><dd>plain-model-name</dd>" in page and "<dt>Seed</dt><dd>7</dd>" in page
    assert "<dt>Revision</dt>" not in page  # a setting the page does not have gets no row, not a dash
    assert "<th>settings.eps</th>" in page and "settings.seed" not in page
    assert "<td>&#x27;\u2423&#x27;</td>" in page and "<td>&#x27;\\n&#x27;</td>" in page


def test_make_meta_takes_model_info_and_records_versions() -> None:
    from normscope.core.models import ModelInfo

    info = ModelInfo(
        "smollm2-135m",
        "SmolLM2",
        "smollm2-135m",
        "bundled",
        "llama",
        30,
        576,
        9,
        True,
        8192,
        "float32",
        "cpu",
    )
    meta = make_meta(
        info, {"source": "builtin", "n_tokens": 10, "seq_len": 10, "bos_prepended": False, "seed": 0}
    )
    assert meta["model"]["n_layers"] == 30 and meta["text"]["source"] == "builtin"
    assert (
        set(meta["versions"]) >= {"normscope", "torch", "transformers"}
        and meta["versions"]["torch"] == torch.__version__
    )
    assert "SmolLM2" in render_html(Result("depth", "Depth", meta, {}))


# ------------------------------------------------------------------------------------------------------------
# figure helpers


def test_heatmap_layer_head_layout_and_values() -> None:
    values = torch.arange(6, dtype=torch.float32).reshape(3, 2) - 2  # [layer=3, head=2]
    fig = heatmap_layer_head(values, "score", "alpha", diverging=True)
    tr = fig.data[0]
    z = np.asarray(tr.z)  # [head, layer]
    assert z.shape == (2, 3)
    for layer in range(3):
        for head in range(2):
            assert z[head, layer] == values[layer, head].item()
            assert tr.text[head][layer] == f"L{layer}H{head}"
    assert list(tr.x) == [0, 1, 2] and list(tr.y) == ["H0", "H1"]
    assert tr.zmid == 0 and tr.colorscale[0][1] == "rgb(103,0,31)"  # RdBu starts dark red
    assert fig.layout.xaxis.title.text == "layer" and fig.layout.yaxis.autorange == "reversed"
    plain = heatmap_layer_head(np.ones((3, 2)), "s", "z", layers=[5, 6, 7])
    assert (
        plain.data[0].zmid is None
        and list(plain.data[0].x) == [5, 6, 7]
        and plain.data[0].text[1][0] == "L5H1"
    )
    with pytest.raises(ValueError, match="2-D"):
        heatmap_layer_head(np.ones(3), "s", "z")


def test_line_per_layer() -> None:
    df = pd.DataFrame(
        {"layer": [0, 1, 2], "top1": [16.0, 250.0, 23500.0], "median": [0.7, 0.8, 1.0], "s": list("abc")}
    )
    fig = line_per_layer(df, ys=["top1", "median"], log_y=True, title="massive")
    assert [t.name for t in fig.data] == ["top1", "median"]
    assert list(fig.data[0].y) == [16.0, 250.0, 23500.0] and list(fig.data[1].x) == [0, 1, 2]
    assert fig.layout.yaxis.type == "log" and fig.layout.xaxis.title.text == "layer"
    auto = line_per_layer(df)
    assert [t.name for t in auto.data] == ["top1", "median"]  # numeric columns only
    with pytest.raises(ValueError):
        line_per_layer(df, ys=["missing"])


# ------------------------------------------------------------------------------------------------------------
# browser (headless Chromium)


def test_browser_renders_two_figures_without_console_errors(tmp_path: Path) -> None:
    from browser import require_chromium, screenshot

    require_chromium()
    paths = write_report(make_result(n_figures=2), tmp_path)
    png = tmp_path / "page.png"
    problems = screenshot(paths.html, png)
    assert problems == []
    assert png.stat().st_size > 20_000


def test_browser_shows_hostile_tokens_as_text(tmp_path: Path) -> None:
    from browser import open_page, require_chromium

    require_chromium()
    tokens = [HOSTILE, "<b>bold</b>", "a&amp;b", "the"]
    fig = go.Figure(go.Bar(x=tokens, y=[4.0, 3.0, 2.0, 1.0], hovertext=tokens, name=HOSTILE))
    res = dataclasses.replace(make_result(HOSTILE), figures=[Figure(HOSTILE, fig, HOSTILE)])
    paths = write_report(res, tmp_path)
    with open_page(paths.html) as (page, problems):
        ticks = page.locator("#fig-0 .xtick text").all_text_contents()
        imgs = page.evaluate("document.querySelectorAll('img').length")
        scripts = page.evaluate("document.querySelectorAll('script').length")
        h1 = page.locator("h1").inner_text()
    assert problems == []  # no alert dialog, no console error, no network
    assert ticks == tokens  # shown literally, not interpreted as markup
    assert imgs == 0 and scripts == 3  # plotly config + plotly.js + one newPlot call: nothing injected
    assert h1 == f"Attention sinks {HOSTILE}"


@pytest.mark.slow
def test_report_of_real_smollm2_massive_activation(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """End to end with the bundled model: dim 507 at position 0 survives table, JSON, CSV and the plot."""
    from browser import open_page, require_chromium

    try:  # the shared session fixture, when tests/conftest.py provides one
        lm = request.getfixturevalue("smollm2")
    except pytest.FixtureLookupError:
        from normscope.core.models import load_model

        lm = load_model("smollm2-135m")
    ids = lm.tokenizer(
        "The quick brown fox jumps over the lazy dog while the cat sleeps.", return_tensors="pt"
    )
    with torch.no_grad():
        hidden = lm.model(ids.input_ids, output_hidden_states=True).hidden_states[1:-1]  # block outputs 0..28
    df = pd.DataFrame(
        {
            "layer": np.arange(len(hidden)),
            "dim507_pos0": [h[0, 0, 507].abs().item() for h in hidden],
            "median_abs": [h[0].abs().median().item() for h in hidden],
        }
    )
    tokens = lm.tokenizer.convert_ids_to_tokens(ids.input_ids[0])
    res = Result(
        "depth",
        "Massive activation",
        make_meta(lm.info, {"source": "inline", "n_tokens": len(tokens), "seq_len": len(tokens)}),
        {"dim507": df["dim507_pos0"].tolist(), "tokens": tokens},
        tables={"layers": df},
        figures=[
            Figure("dim 507", line_per_layer(df, ys=["dim507_pos0", "median_abs"], log_y=True), "Jump.")
        ],
        headlines={"max_dim507": df["dim507_pos0"].max()},
    )
    paths = write_report(res, tmp_path)
    dim = np.array(json.loads(paths.json.read_text())["dim507"])
    assert 100 < dim[2] < 2000 and (dim[12:28] > 1e4).all()  # ~750 after layer 2, ~23,500 from layer 12
    assert (dim[12:28] / df["median_abs"][12:28] > 1000).all()  # Sun et al.: ~1000x the median
    pd.testing.assert_frame_equal(pd.read_csv(paths.csvs[0]), df)
    require_chromium()
    with open_page(paths.html) as (page, problems):
        plotted = page.evaluate("Array.from(document.getElementById('fig-0')._fullData[0].y)")
        log_axis = page.evaluate("document.getElementById('fig-0').layout.yaxis.type")
    assert problems == [] and log_axis == "log"
    np.testing.assert_allclose(plotted, df["dim507_pos0"].to_numpy(), rtol=1e-12)


def test_a_long_headline_value_is_set_in_small_type() -> None:
    r = make_result()
    r.headlines["export_kind"] = "a plain transformers checkpoint plus a BOS key/value prefix"
    page = render_html(r)
    assert '<div class="value long">a plain transformers checkpoint plus a BOS key/value prefix</div>' in page
    assert '<div class="value">75</div>' in page  # numbers keep the large type
    assert ".card .value.long{" in page

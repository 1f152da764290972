"""Report writer: one self-contained HTML page, a JSON file and one CSV per table for each analysis.

Every analysis ends by building a :class:`Result` and calling :func:`write_report`, which writes

* ``<out_dir>/<analysis>.html``: a page that opens with no network (plotly.js inlined once, never the CDN);
* ``<out_dir>/<analysis>.json``: ``{"schema_version", "analysis", "title", "meta", "headlines", "labels",
  "summary", **payload}``,
  byte-identical for identical inputs (no timestamps, durations or output paths in it; NaN/inf become null);
* ``<out_dir>/<analysis>_<table>.csv``: each table in full.

All files are written atomically (temporary file in the same folder, fsync, ``os.replace``).

Escaping contract. Every string that reaches the page through this module is HTML-escaped: titles,
meta, headlines, summary paragraphs, table cells, captions, references. Plotly serialises figures as JSON
and writes ``<``, ``>`` and ``/`` as ``\\u003c``, ``\\u003e`` and ``\\u002f``, so no data string can close
the ``<script>`` element. Plotly.js however renders a subset of HTML tags (``<b>``, ``<br>``, ``<a>``, ...)
inside labels, so :func:`render_html` also escapes, on a copy of each figure, the *data* strings of every
trace (``x``, ``y``, ``z``, ``text``, ``hovertext``, ``customdata``, ``labels``, ``name``, ...) and the
categorical axis fields (``ticktext``, ``tickvals``, ``categoryarray``): a token ``<b>`` shows as ``<b>``.
Analyses therefore put RAW strings into trace data, and escape with :func:`plot_text` any user, tokenizer
or model string they write into author-controlled markup (axis titles, annotations, hover templates).

Plot conventions and helpers live in :mod:`normscope.report.plots`.
"""

from __future__ import annotations

import html
import importlib.metadata
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from normscope.core.io import atomic_write_text
from normscope.report.jsonio import _torch_tensor_type, dumps_json
from normscope.report.plots import DEFAULT_FIG_HEIGHT, escape_figure_data
from normscope.report.result import Figure, ReportPaths, Result

MAX_TABLE_ROWS = 50  # rows of each table shown in the HTML; the CSV holds all of them
INDEX_HREF = "index.html"  # the index page of every report folder
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def render_html(result: Result) -> str:
    """The report page: one self-contained HTML document (plotly.js inlined once, no network needed)."""
    e = _esc
    model = _model_name(result.meta)
    version = _mget(result.meta, "versions", "normscope") or _safe_version("normscope")
    parts: list[str] = []
    parts.append(
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f'<meta name="generator" content="normscope {e(version)}">\n'
        f"<title>{e(result.title)} \u2014 {e(model)} \u2014 normscope</title>\n"
        f"<style>{_CSS}</style>\n</head>\n<body>\n"
    )
    parts.append(
        '<header class="top"><div class="wrap">\n'
        f'<nav><a href="{INDEX_HREF}">\u2190 All reports</a></nav>\n'
        f"<h1>{e(result.title)}</h1>\n"
        f'<p class="sub"><span class="model">{e(model)}</span>'
        f" \u00b7 analysis <code>{e(result.analysis)}</code>"
        f' \u00b7 normscope {e(version)}</p>\n</div></header>\n<main class="wrap">\n'
    )
    parts.append(_settings_html(result.meta))
    if result.headlines:
        parts.append(_headlines_html(result.headlines, result.labels))
    if result.summary:
        paras = "\n".join(f"<p>{e(p)}</p>" for p in result.summary)
        parts.append(f'<section class="summary"><h2>Interpretation</h2>\n{paras}\n</section>\n')
    if result.figures:
        parts.append("<section><h2>Figures</h2>\n")
        for i, f in enumerate(result.figures):
            parts.append(_figure_html(f, i, include_plotlyjs=(i == 0)))
        parts.append("</section>\n")
    if result.tables:
        parts.append("<section><h2>Tables</h2>\n")
        for name, df in result.tables.items():
            parts.append(_table_html(df, name, csv_name(result.analysis, name), result.label(name)))
        parts.append("</section>\n")
    if result.references:
        refs = "\n".join(f"<li>{e(r)}</li>" for r in result.references)
        parts.append(f'<section class="refs"><h2>References</h2>\n<ol>\n{refs}\n</ol>\n</section>\n')
    parts.append(_files_html(result))
    if result.timings:
        parts.append(_timings_html(result.timings))
    parts.append(
        '</main>\n<footer class="wrap">'
        f'<a href="{INDEX_HREF}">\u2190 All reports</a> \u00b7 written by normscope {e(version)}'
        "</footer>\n</body>\n</html>\n"
    )
    return "".join(parts)


def csv_name(analysis: str, table: str) -> str:
    """File name of a table's CSV: ``<analysis>_<table>.csv``."""
    return f"{analysis}_{table}.csv"


def write_report(result: Result, out_dir: Path) -> ReportPaths:
    """Write ``<analysis>.html``, ``<analysis>.json`` and ``<analysis>_<table>.csv`` into ``out_dir``.

    Everything is rendered in memory first, then each file is written atomically (CSV, JSON, HTML last),
    so a failure while building the report leaves earlier files untouched. The folder's ``index.html`` is
    then rewritten to list every page in it, so a page's "All reports" link always leads somewhere.
    """
    out_dir = Path(out_dir)
    _check_name(result.analysis, "analysis name")
    for name in result.tables:
        _check_name(name, "table name")
    csv_texts = {csv_name(result.analysis, n): table_to_csv(df) for n, df in result.tables.items()}
    json_text = dumps_json(result.to_json_dict())
    html_text = render_html(result)

    csvs = []
    for fname, text in csv_texts.items():
        atomic_write_text(out_dir / fname, text)
        csvs.append(out_dir / fname)
    json_path = out_dir / f"{result.analysis}.json"
    atomic_write_text(json_path, json_text)
    html_path = out_dir / f"{result.analysis}.html"
    atomic_write_text(html_path, html_text)
    from normscope.report.index import refresh_index  # index.py renders with this module's pieces

    refresh_index(out_dir)
    return ReportPaths(html=html_path, json=json_path, csvs=csvs)


def table_to_csv(df: pd.DataFrame) -> str:
    """CSV text of a table; the index is written only when it carries information (not 0..n-1)."""
    keep_index = not _is_default_index(df.index)
    return df.to_csv(index=keep_index, lineterminator="\n")


def _is_default_index(index: pd.Index) -> bool:
    return isinstance(index, pd.RangeIndex) and index.start == 0 and index.step == 1 and index.name is None


def _check_name(name: str, what: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"{what} {name!r} must be letters, digits, '_', '-' or '.' (it becomes a file name)")


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _mget(meta: Mapping[str, Any], *keys: str) -> Any:
    """``meta[k1][k2]...``, or None where the path does not exist."""
    return _mget_or(meta, keys, None)


def _model_name(meta: Mapping[str, Any]) -> str:
    m = meta.get("model")
    if isinstance(m, Mapping):
        return str(m.get("name") or m.get("spec") or "unknown model")
    return str(m) if m is not None else "unknown model"


def _safe_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def fmt_value(v: Any) -> str:
    """Human-readable text for a scalar in a card or table cell (not escaped)."""
    if v is None or v is pd.NA or v is pd.NaT:
        return "\u2014"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    if isinstance(v, (float, np.floating)):
        x = float(v)
        if math.isnan(x):
            return "\u2014"
        if math.isinf(x):
            return "\u221e" if x > 0 else "\u2212\u221e"
        ax = abs(x)
        if ax == 0:
            return "0"
        if ax >= 1e6 or ax < 1e-4:
            return f"{x:.3e}"
        if ax >= 100:
            return f"{x:,.1f}"
        return f"{x:.4g}"
    torch_tensor = _torch_tensor_type()
    if torch_tensor is not None and isinstance(v, torch_tensor) and v.numel() == 1:
        return fmt_value(v.item())
    if isinstance(v, (list, tuple)):
        return ", ".join(fmt_value(x) for x in v)
    if isinstance(v, str) and v and not v.strip():
        return repr(v).replace(" ", "\u2423")  # whitespace-only tokens (" ", "\n"): visible, spaces as ␣
    return str(v)


# Each settings row: a label and the meta paths it may come from, first found wins.
_SETTINGS_ROWS: tuple[tuple[str, tuple[tuple[str, ...], ...]], ...] = (
    ("Model", (("model", "name"), ("model", "spec"))),
    ("Revision", (("model", "revision"),)),
    ("Dtype", (("model", "dtype"),)),
    ("Device", (("model", "device"),)),
    ("Text source", (("text", "source"),)),
    ("Tokens", (("text", "n_tokens"),)),
    ("Seq len", (("text", "seq_len"),)),
    ("BOS prepended", (("text", "bos_prepended"),)),
    ("Seed", (("text", "seed"), ("seed",), ("settings", "seed"), ("options", "seed"))),
)
_MISSING = object()


def _settings_html(meta: Mapping[str, Any]) -> str:
    e = _esc
    used: set[tuple[str, ...]] = set()
    items = []
    for label, paths in _SETTINGS_ROWS:
        value: Any = _MISSING
        for keys in paths:
            v = _mget_or(meta, keys, _MISSING)
            if v is not _MISSING:
                value = v
                used.add(keys)
                break
        if value is _MISSING and label == "Model":
            value = _model_name(meta)
            used.add(("model",))  # a plain string
        if value is _MISSING or value is None:
            continue  # a setting this page does not have: no row rather than a dash
        items.append(f"<div><dt>{e(label)}</dt><dd>{e(fmt_value(value))}</dd></div>")
    cats = _mget(meta, "text", "categories")
    if isinstance(cats, Mapping) and cats:
        used.add(("text", "categories"))
        kinds = ", ".join(f"{k} {v}" for k, v in cats.items())
        items.append(f'<div class="wide"><dt>Sequences</dt><dd>{e(kinds)}</dd></div>')
    versions = meta.get("versions")
    if isinstance(versions, Mapping):
        shown_keys = [k for k in ("normscope", "torch", "transformers") if k in versions]
        used.update(("versions", k) for k in shown_keys)
        shown = [f"{k} {versions[k]}" for k in shown_keys]
        items.append(f'<div class="wide"><dt>Versions</dt><dd>{e(" · ".join(shown) or "—")}</dd></div>')
    rest = [(k, v) for k, v in _flatten(meta) if not any(k[: len(u)] == u for u in used)]
    more = ""
    if rest:
        rows = "\n".join(f"<tr><th>{e('.'.join(k))}</th><td>{e(fmt_value(v))}</td></tr>" for k, v in rest)
        more = (
            f"<details><summary>More settings ({len(rest)})</summary>\n"
            f'<table class="kv"><tbody>\n{rows}\n</tbody></table></details>\n'
        )
    return (
        '<section class="settings"><h2>Settings</h2>\n<dl class="grid">\n'
        + "\n".join(items)
        + "\n</dl>\n"
        + more
        + "</section>\n"
    )


def _mget_or(meta: Mapping[str, Any], keys: tuple[str, ...], default: Any) -> Any:
    """``meta[k1][k2]...``, or ``default`` where the path does not exist."""
    node: Any = meta
    for k in keys:
        if not isinstance(node, Mapping) or k not in node:
            return default
        node = node[k]
    return node


def _flatten(d: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> Iterable[tuple[tuple[str, ...], Any]]:
    for k, v in d.items():
        key = (*prefix, str(k))
        if isinstance(v, Mapping) and v:
            yield from _flatten(v, key)
        else:
            yield key, v


LONG_CARD = 16
"""Headline values longer than this many characters (a path, an export kind) are set in small type."""


def _headlines_html(headlines: Mapping[str, Any], labels: Mapping[str, str] | None = None) -> str:
    """The headline cards: the value, and the headline's words (its label, else the key with spaces)."""
    e = _esc
    labels = labels or {}
    def card(k: Any, v: Any) -> str:
        text = fmt_value(v)
        cls = "value long" if len(text) > LONG_CARD else "value"  # a sentence, not a number: small type
        return (f'<div class="card" title="{e(k)}"><div class="{cls}">{e(text)}</div>'
                f'<div class="label">{e(labels.get(str(k)) or str(k).replace("_", " "))}</div></div>')

    cards = "\n".join(card(k, v) for k, v in headlines.items())
    return f'<section class="cards" aria-label="Headline numbers">\n{cards}\n</section>\n'


def _figure_html(f: Figure, index: int, include_plotlyjs: bool) -> str:
    import plotly.io as pio

    d = escape_figure_data(f.fig)
    layout = d["layout"]
    if f.title:  # the page heading replaces the in-plot title, and its empty top margin (plotly: 100 px)
        layout.pop("title", None)
    if "title" not in layout:
        margin = dict(layout.get("margin") or {})
        margin["t"] = min(int(margin.get("t") or 100), 36)
        layout["margin"] = margin
    height = layout.get("height") or DEFAULT_FIG_HEIGHT
    div = pio.to_html(
        d,
        full_html=False,
        include_plotlyjs=bool(include_plotlyjs),  # True inlines plotly.js; never "cdn"
        include_mathjax=False,
        div_id=f"fig-{index}",
        default_width="100%",
        default_height=f"{int(height)}px",
        config={"displaylogo": False, "responsive": True},
        validate=True,
    )
    return (
        f'<figure class="plot" id="figure-{index}">\n<h3>{_esc(f.title)}</h3>\n'
        f'<figcaption>{_esc(f.caption)}</figcaption>\n<div class="plotbox">{div}</div>\n</figure>\n'
    )


def _table_html(df: pd.DataFrame, name: str, csv_file: str, title: str | None = None) -> str:
    e = _esc
    show_index = not _is_default_index(df.index)
    head = df.head(MAX_TABLE_ROWS)
    numeric = [
        pd.api.types.is_numeric_dtype(head[c]) and not pd.api.types.is_bool_dtype(head[c])
        for c in head.columns
    ]
    ths = []
    if show_index:
        ths.append(f"<th>{e(df.index.name or '')}</th>")
    num_cls = {True: " class=num", False: ""}
    ths += [f"<th{num_cls[num]}>{e(c)}</th>" for c, num in zip(head.columns, numeric, strict=True)]
    body = []
    for idx, row in zip(head.index, head.itertuples(index=False, name=None), strict=True):
        cells = [f"<th>{e(fmt_value(idx))}</th>"] if show_index else []
        cells += [f"<td{num_cls[num]}>{e(fmt_value(v))}</td>" for v, num in zip(row, numeric, strict=True)]
        body.append("<tr>" + "".join(cells) + "</tr>")
    n = len(df)
    link = f'<a href="{e(csv_file)}">{e(csv_file)}</a>'
    if n > MAX_TABLE_ROWS:
        note = f"First {MAX_TABLE_ROWS} of {n:,} rows; full table in {link}."
    else:
        note = f"{n:,} row{'s' if n != 1 else ''}; full table in {link}."
    return (
        f'<div class="table" id="table-{e(name)}"><h3>{e(title or name)}</h3>\n'
        f'<div class="scroll"><table class="data"><thead><tr>{"".join(ths)}</tr></thead>\n<tbody>\n'
        + "\n".join(body)
        + f'\n</tbody></table></div>\n<p class="note">{note}</p></div>\n'
    )


def _files_html(result: Result) -> str:
    e = _esc
    names = [f"{result.analysis}.json"] + [csv_name(result.analysis, n) for n in result.tables]
    links = " \u00b7 ".join(f'<a href="{e(n)}">{e(n)}</a>' for n in names)
    return f'<section class="files"><h2>Files</h2>\n<p>{links}</p>\n</section>\n'


def _timings_html(timings: Mapping[str, float]) -> str:
    e = _esc
    rows = "\n".join(
        f"<tr><th>{e(k)}</th><td class=num>{e(_fmt_seconds(v))}</td></tr>" for k, v in timings.items()
    )
    return (
        '<section class="timings"><h2>Timings</h2>\n'
        f'<table class="kv"><tbody>\n{rows}\n</tbody></table>\n</section>\n'
    )


def _fmt_seconds(v: Any) -> str:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return str(v)
    if not math.isfinite(x):
        return "\u2014"
    if x >= 120:
        return f"{int(x // 60)} min {x % 60:.0f} s"
    return f"{x:.2f} s"


_CSS = """
:root{--fg:#1f2328;--muted:#59636e;--line:#d8dee4;--bg:#ffffff;--soft:#f6f8fa;--accent:#0b5cad;
--card:#f3f6fa;--font:system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;
--mono:ui-monospace,SFMono-Regular,Menlo,Consolas,"Liberation Mono",monospace}
*{box-sizing:border-box}
html{-webkit-text-size-adjust:100%}
body{margin:0;color:var(--fg);background:var(--bg);font:15px/1.55 var(--font)}
.wrap{max-width:1200px;margin:0 auto;padding:0 24px}
header.top{background:var(--soft);border-bottom:1px solid var(--line);padding:14px 0 18px}
header.top nav a{font-size:13px}
h1{font-size:26px;line-height:1.25;margin:8px 0 4px;font-weight:650}
.sub{margin:0;color:var(--muted)}
.sub .model{color:var(--fg);font-weight:600}
h2{font-size:18px;margin:30px 0 12px;padding-bottom:6px;border-bottom:1px solid var(--line);font-weight:650}
h3{font-size:15px;margin:18px 0 4px;font-weight:650}
a{color:var(--accent);text-decoration:none}
a:hover{text-decoration:underline}
code{font-family:var(--mono);font-size:90%;background:var(--card);padding:1px 5px;border-radius:4px}
dl.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:8px 18px;margin:0}
dl.grid div{min-width:0}
dl.grid .wide{grid-column:span 2}
dl.grid dt{font-size:11.5px;text-transform:uppercase;letter-spacing:.04em;color:var(--muted)}
dl.grid dd{margin:0;font-family:var(--mono);font-size:13px;overflow-wrap:anywhere}
details{margin-top:10px}
summary{cursor:pointer;color:var(--muted);font-size:13px}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:26px 0 6px}
.card{flex:1 1 170px;max-width:280px;background:var(--card);border:1px solid var(--line);border-radius:8px;
padding:12px 14px}
.card .value{font-size:24px;font-weight:650;font-variant-numeric:tabular-nums;overflow-wrap:anywhere}
.card .value.long{font-size:14px;font-weight:500;line-height:1.35}
.card .label{color:var(--muted);font-size:13px}
.summary p{max-width:80ch}
figure.plot{margin:0 0 28px}
figcaption{color:var(--muted);margin:0 0 6px;max-width:90ch}
.plotbox{border:1px solid var(--line);border-radius:8px;padding:6px;background:#fff}
.scroll{display:inline-block;max-width:100%;overflow:auto;max-height:560px;border:1px solid var(--line);
border-radius:8px;vertical-align:top}
table{border-collapse:collapse;font-size:13px}
table.data{min-width:480px}
table.data th,table.data td{padding:4px 14px;border-bottom:1px solid var(--line);text-align:left;
white-space:nowrap}
table.data thead th{position:sticky;top:0;background:var(--soft);font-weight:600}
table.data tbody tr:nth-child(even){background:#fafbfc}
table.data tbody th{font-weight:500;color:var(--muted)}
.num{text-align:right !important;font-variant-numeric:tabular-nums;font-family:var(--mono)}
.note{color:var(--muted);font-size:13px;margin:6px 0 18px}
table.kv th{text-align:left;font-weight:500;color:var(--muted);padding:3px 18px 3px 0;vertical-align:top}
table.kv td{font-family:var(--mono);padding:3px 0;overflow-wrap:anywhere}
.refs li{margin:4px 0}
footer{color:var(--muted);font-size:13px;padding:30px 24px 40px}
"""


"""Report writer: one self-contained HTML page, a JSON file and one CSV per table for each analysis.

Every analysis ends by building a :class:`Result` and calling :func:`write_report`, which writes

* ``<out_dir>/<analysis>.html``: a page that opens with no network (plotly.js inlined once, never the CDN);
* ``<out_dir>/<analysis>.json``: ``{"schema_version", "analysis", "meta", "headlines", **payload}``,
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

Plot conventions of the field (TransformerLens / Neel Nanda style): layer on the x axis, heads labelled
``L{l}H{h}``, diverging ``RdBu`` colour scale centred at 0 for signed values; see :func:`heatmap_layer_head`
and :func:`line_per_layer`.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import enum
import html
import importlib.metadata
import json
import math
import os
import platform
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:  # plotly is imported lazily: `import normscope.report` stays cheap
    import plotly.graph_objects as go

SCHEMA_VERSION = 1
MAX_TABLE_ROWS = 50  # rows of each table shown in the HTML; the CSV holds all of them
INDEX_HREF = "index.html"  # the index page of a report folder (written by a later issue)
DEFAULT_FIG_HEIGHT = 460  # px, when a figure sets no layout.height
_RESERVED_JSON_KEYS = ("schema_version", "analysis", "meta", "headlines")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

# Keys whose string values plotly.js displays as labels; escaped on the page (see module docstring).
_TRACE_DATA_KEYS = frozenset(
    {
        "x",
        "y",
        "z",
        "text",
        "hovertext",
        "customdata",
        "labels",
        "parents",
        "ids",
        "name",
        "legendgroup",
        "values",
        "label",
        "ticktext",
        "tickvals",
        "categoryarray",
        "header",
        "cells",
    }
)
_LAYOUT_DATA_KEYS = frozenset({"x", "y", "ticktext", "tickvals", "categoryarray"})


# ----------------------------------------------------------------------------------------------------------
# Data classes


@dataclass
class Figure:
    """One plotly figure of a report, with the sentence that tells the reader what to look for."""

    title: str
    fig: go.Figure
    caption: str  # one sentence: what to look for in this figure


@dataclass
class Result:
    """Everything an analysis produced; :func:`write_report` serialises it and the Python API returns it.

    ``timings`` (seconds) are shown on the HTML page only, never in the JSON, so that the JSON is
    byte-identical across identical runs.
    """

    analysis: str  # "sinks", "depth", "grads", "hubness", "dla", "remove-ln"
    title: str  # "Attention and residual sinks"
    meta: dict[str, Any]  # {"model": {...}, "text": {...}, "versions": {...}, ...}: see make_meta
    payload: dict[str, Any]  # the analysis' own JSON fields (sink_rate, layers, heads, ...)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)  # each written as <analysis>_<name>.csv
    figures: list[Figure] = field(default_factory=list)
    headlines: dict[str, Any] = field(default_factory=dict)  # a few scalars for the terminal and summary card
    summary: list[str] = field(default_factory=list)  # interpretation paragraphs (plain text)
    references: list[str] = field(default_factory=list)  # "Gu et al. 2024, When Attention Sink Emerges (...)"
    timings: dict[str, float] = field(default_factory=dict)  # seconds; HTML only, never in the JSON

    def to_json_dict(self) -> dict[str, Any]:
        """``{"schema_version", "analysis", "meta", "headlines", **payload}``, through :func:`to_jsonable`.

        Raises ValueError when the payload reuses one of the four reserved keys (a programming error).
        """
        clash = [k for k in _RESERVED_JSON_KEYS if k in self.payload]
        if clash:
            raise ValueError(f"payload of {self.analysis!r} uses reserved key(s) {clash}")
        out: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "analysis": self.analysis,
            "meta": self.meta,
            "headlines": self.headlines,
        }
        out.update(self.payload)
        return to_jsonable(out)


@dataclass
class ReportPaths:
    """Where :func:`write_report` wrote a result."""

    html: Path
    json: Path
    csvs: list[Path]


# ----------------------------------------------------------------------------------------------------------
# JSON


def to_jsonable(obj: Any) -> Any:
    """Convert ``obj`` into plain JSON types, deterministically.

    numpy / torch scalars -> Python numbers; arrays and tensors -> nested lists; NaN, +-inf, ``pd.NA`` and
    ``NaT`` -> None; tuples -> lists; sets -> sorted lists; ``Path`` -> POSIX string; dataclasses -> dicts;
    enums -> their value; DataFrames -> list of row dicts; Series -> list; mapping keys -> ``str``.
    Anything else raises TypeError, so that a stray object is caught rather than stringified.
    """
    if isinstance(obj, np.generic):  # before the Python types: np.float64 subclasses float, np.str_ str
        if isinstance(obj, np.bool_):
            return bool(obj)
        if isinstance(obj, np.integer):
            return int(obj)
        if isinstance(obj, np.floating):
            return to_jsonable(float(obj))
        if isinstance(obj, (np.str_, np.bytes_)):
            return str(obj)
        if isinstance(obj, (np.datetime64, np.timedelta64)):
            return None if np.isnat(obj) else str(obj)
        return to_jsonable(obj.item())
    if obj is None or isinstance(obj, bool):
        return obj
    if isinstance(obj, str):
        return str(obj)
    if isinstance(obj, enum.Enum):
        return to_jsonable(obj.value)
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, Mapping):
        return {_json_key(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        items = [to_jsonable(v) for v in obj]
        return sorted(items, key=lambda v: json.dumps(v, sort_keys=True))
    if isinstance(obj, PurePath):
        return obj.as_posix()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable({f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)})
    if isinstance(obj, pd.DataFrame):
        return to_jsonable(obj.to_dict(orient="records"))
    if isinstance(obj, pd.Series):
        return to_jsonable(obj.tolist())
    if obj is pd.NA or obj is pd.NaT:
        return None
    if isinstance(obj, (pd.Timestamp, _dt.datetime, _dt.date)):
        return obj.isoformat()
    torch_tensor = _torch_tensor_type()
    if torch_tensor is not None and isinstance(obj, torch_tensor):
        t = obj.detach().cpu()
        return to_jsonable(t.item() if t.ndim == 0 else t.tolist())
    if hasattr(obj, "to_dict") and callable(obj.to_dict):  # ModelInfo, NormSite, ...
        return to_jsonable(obj.to_dict())
    raise TypeError(f"cannot convert {type(obj).__name__} to JSON")


def _json_key(key: Any) -> str:
    if isinstance(key, str):
        return key
    if isinstance(key, (bool, np.bool_)):
        return "true" if key else "false"
    if isinstance(key, (int, np.integer)):
        return str(int(key))
    if isinstance(key, enum.Enum):
        return str(key.value)
    if isinstance(key, (float, np.floating, PurePath)):
        return str(to_jsonable(key))
    raise TypeError(f"cannot use {type(key).__name__} as a JSON key")


def _torch_tensor_type() -> type | None:
    import sys

    torch = sys.modules.get("torch")  # no import: if torch was never imported there can be no tensor
    return getattr(torch, "Tensor", None)


def dumps_json(obj: Any) -> str:
    """Deterministic JSON text: :func:`to_jsonable`, key order as given, indent 2, UTF-8, final newline."""
    return json.dumps(to_jsonable(obj), indent=2, ensure_ascii=False, allow_nan=False) + "\n"


# ----------------------------------------------------------------------------------------------------------
# Atomic writes


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: a unique temp file in the same folder, fsync, ``os.replace``.

    Parent folders are created. On any failure the temp file is removed and an existing ``path`` is left
    untouched. The new file gets the mode of the file it replaces, or ``0o666 & ~umask``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = _target_mode(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8, newlines as given) to ``path`` atomically; see :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a new temporary folder beside ``target`` to fill; when the block ends without error it takes
    ``target``'s place (an existing ``target`` is moved aside first, then removed). On any error the temporary
    folder is removed and ``target`` is left as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists():  # os.replace cannot overwrite a non-empty folder
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        _fsync_dir(target.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _target_mode(path: Path) -> int:
    try:
        return os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0o022)
        os.umask(umask)
        return 0o666 & ~umask


def _fsync_dir(folder: Path) -> None:
    try:
        dfd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


# ----------------------------------------------------------------------------------------------------------
# Meta helpers


def collect_versions() -> dict[str, str]:
    """Versions that decide a report's numbers: python, normscope, torch, transformers, transformer-lens."""
    out = {"python": platform.python_version()}
    for dist in ("normscope", "torch", "transformers", "transformer-lens"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def make_meta(model: Any = None, text: Mapping[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """The ``meta`` dict of a :class:`Result`, in the layout :func:`render_html` reads.

    model: a ``ModelInfo`` (anything with ``to_dict()``) or a dict (``name``, ``revision``, ``dtype``, ...).
    text: ``{"source", "n_tokens", "seq_len", "bos_prepended", "seed", ...}``.
    extra: further settings (e.g. ``options={...}``), shown under "More settings".
    """
    if model is not None and not isinstance(model, Mapping):
        model = model.to_dict()
    meta: dict[str, Any] = {
        "model": dict(model or {}),
        "text": dict(text or {}),
        "versions": collect_versions(),
    }
    meta.update(extra)
    return meta


# ----------------------------------------------------------------------------------------------------------
# Figure helpers


def plot_text(s: Any) -> str:
    """Escape a string for plotly.js labels (titles, annotations, templates): ``&``, ``<``, ``>`` only.

    Plotly.js decodes ``&amp;``, ``&lt;`` and ``&gt;`` back for display but does not know ``&quot;``,
    so quotes are left as they are (the JSON encoding already keeps them inside the script).
    """
    return html.escape(str(s), quote=False)


def heatmap_layer_head(
    values: Any,
    title: str,
    zlabel: str,
    diverging: bool = False,
    *,
    layers: Sequence[int] | None = None,
) -> go.Figure:
    """Heatmap of a per-(layer, head) quantity: layer on the x axis, heads ``H{h}`` on the y axis.

    values: ``[n_layers, n_heads]`` (numpy, torch or nested lists; NaN shows as a gap).
    diverging: signed values, drawn with the RdBu scale centred at 0 (TransformerLens convention);
    otherwise Viridis. Hover shows ``L{l}H{h}`` and the value. ``layers`` relabels the rows of ``values``
    (default ``0..n_layers-1``).
    """
    import plotly.graph_objects as go

    arr = _as_2d_float(values)  # [n_layers, n_heads]
    n_layers, n_heads = arr.shape
    layer_ids = list(range(n_layers)) if layers is None else [int(v) for v in layers]
    if len(layer_ids) != n_layers:
        raise ValueError(f"{len(layer_ids)} layer labels for {n_layers} layers")
    heads = [f"H{h}" for h in range(n_heads)]
    hover = [[f"L{lay}H{h}" for lay in layer_ids] for h in range(n_heads)]  # [n_heads, n_layers]
    trace = go.Heatmap(
        z=arr.T,  # [n_heads, n_layers]: rows are y (heads), columns are x (layers)
        x=layer_ids,
        y=heads,
        text=hover,
        hovertemplate="%{text}<br>" + plot_text(zlabel) + ": %{z:,.4~r}<extra></extra>",
        colorscale="RdBu" if diverging else "Viridis",
        zmid=0.0 if diverging else None,
        colorbar={"title": {"text": plot_text(zlabel), "side": "right"}},
        hoverongaps=False,
    )
    fig = go.Figure(trace)
    fig.update_layout(
        title={"text": plot_text(title)},
        template="plotly_white",
        height=160 + n_heads * (28 if n_heads <= 16 else 16),
        margin={"l": 60, "r": 20, "t": 50, "b": 50},
    )
    fig.update_xaxes(title_text="layer", dtick=1 if n_layers <= 36 else None, showgrid=False)
    fig.update_yaxes(title_text="head", autorange="reversed", showgrid=False)
    return fig


def line_per_layer(
    df: pd.DataFrame,
    x: str = "layer",
    ys: Sequence[str] | None = None,
    log_y: bool = False,
    title: str = "",
    *,
    ylabel: str | None = None,
) -> go.Figure:
    """One line per column of ``df`` against the layer (x axis), markers on each layer.

    ys: the columns to draw (default: every numeric column except ``x``). ``log_y`` for quantities that span
    orders of magnitude (massive activations, residual norms); non-positive values are then not drawn.
    """
    import plotly.graph_objects as go

    if x not in df.columns:
        raise ValueError(f"column {x!r} not in the table (columns: {list(df.columns)})")
    if ys is None:
        ys = [c for c in df.columns if c != x and pd.api.types.is_numeric_dtype(df[c])]
    missing = [c for c in ys if c not in df.columns]
    if missing:
        raise ValueError(f"columns {missing} not in the table")
    fig = go.Figure()
    for col in ys:
        fig.add_trace(
            go.Scatter(
                x=df[x].to_numpy(),
                y=df[col].to_numpy(dtype=float),
                name=str(col),  # raw: render_html escapes trace names
                mode="lines+markers",
                marker={"size": 5},
                hovertemplate="%{y:,.4~r}",
            )
        )
    fig.update_layout(
        title={"text": plot_text(title)},
        template="plotly_white",
        height=DEFAULT_FIG_HEIGHT,
        hovermode="x unified",
        margin={"l": 70, "r": 20, "t": 50, "b": 50},
        showlegend=len(ys) > 1,
    )
    fig.update_xaxes(title_text=plot_text(x))
    fig.update_yaxes(
        title_text=plot_text(ylabel if ylabel is not None else (ys[0] if len(ys) == 1 else "")),
        type="log" if log_y else "linear",
    )
    return fig


def _as_2d_float(values: Any) -> np.ndarray:
    torch_tensor = _torch_tensor_type()
    if torch_tensor is not None and isinstance(values, torch_tensor):
        values = values.detach().float().cpu().numpy()
    arr = np.asarray(values, dtype=float)
    if arr.ndim != 2:
        raise ValueError(f"expected a 2-D [layer, head] array, got shape {arr.shape}")
    return arr


def escape_figure_data(fig: go.Figure | Mapping[str, Any]) -> dict[str, Any]:
    """A plotly figure dict whose displayed data strings are escaped with :func:`plot_text`.

    Trace data (x, y, z, text, hovertext, customdata, labels, parents, ids, name, ... at any depth) and the
    categorical axis fields of the layout are escaped; author markup (titles, annotation text, hover
    templates) is left as it is. The input figure is not modified.
    """
    d = fig.to_plotly_json() if hasattr(fig, "to_plotly_json") else dict(fig)
    data = [_escape_tree(dict(trace), _TRACE_DATA_KEYS) for trace in d.get("data", [])]
    layout = _escape_tree(dict(d.get("layout", {})), _LAYOUT_DATA_KEYS, skip=("template",))
    out = dict(d)
    out["data"] = data
    out["layout"] = layout
    return out


def _escape_tree(node: Any, keys: frozenset[str], skip: tuple[str, ...] = (), hit: bool = False) -> Any:
    if isinstance(node, Mapping):
        return {
            k: (v if k in skip else _escape_tree(v, keys, skip, hit or k in keys)) for k, v in node.items()
        }
    if isinstance(node, (list, tuple)):
        return [_escape_tree(v, keys, skip, hit) for v in node]
    if isinstance(node, np.ndarray):
        if hit and node.dtype.kind in "OUS":
            return [_escape_tree(v, keys, skip, hit) for v in node.tolist()]
        return node
    if hit and isinstance(node, (str, np.str_)):
        return plot_text(node)
    return node


# ----------------------------------------------------------------------------------------------------------
# HTML


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
        parts.append(_headlines_html(result.headlines))
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
            parts.append(_table_html(df, name, csv_name(result.analysis, name)))
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
    so a failure while building the report leaves earlier files untouched.
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
    node: Any = meta
    for k in keys:
        if not isinstance(node, Mapping) or k not in node:
            return None
        node = node[k]
    return node


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
        return repr(v)  # whitespace-only tokens (" ", "\n") would show as an empty cell
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
        items.append(
            f"<div><dt>{e(label)}</dt><dd>{e(fmt_value(None if value is _MISSING else value))}</dd></div>"
        )
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


def _headlines_html(headlines: Mapping[str, Any]) -> str:
    e = _esc
    cards = "\n".join(
        f'<div class="card" title="{e(k)}"><div class="value">{e(fmt_value(v))}</div>'
        f'<div class="label">{e(str(k).replace("_", " "))}</div></div>'
        for k, v in headlines.items()
    )
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


def _table_html(df: pd.DataFrame, name: str, csv_file: str) -> str:
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
        f'<div class="table" id="table-{e(name)}"><h3>{e(name)}</h3>\n'
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


# ----------------------------------------------------------------------------------------------------------
# The index page of a report folder


@dataclass
class IndexEntry:
    """One analysis on the index page: its headline numbers and a link to its page, or why it did not run."""

    analysis: str
    title: str
    href: str | None  # relative link to the analysis page; None when it did not run
    headlines: dict[str, Any] = field(default_factory=dict)
    summary: str = ""  # the first interpretation sentence
    seconds: float | None = None
    error: str | None = None  # one line: why this analysis was skipped or failed
    note: str = ""  # plain remark shown instead of headlines (e.g. for the model-load row)


def render_index(title: str, meta: dict[str, Any], entries: Sequence[IndexEntry]) -> str:
    """``index.html``: a summary card per analysis with its headline numbers and a link to its page."""
    e = _esc
    model = _model_name(meta)
    version = _mget(meta, "versions", "normscope") or _safe_version("normscope")
    cards = []
    for en in entries:
        head = f'<a href="{e(en.href)}">{e(en.title)}</a>' if en.href else e(en.title)
        body = (
            _headlines_html(en.headlines) + (f"<p>{e(en.summary)}</p>" if en.summary else "")
            if en.error is None
            else f'<p class="note">Not run: {e(en.error)}</p>'
        )
        if en.note and en.error is None:
            body = f'<p class="note">{e(en.note)}</p>' + body
        took = f' <span class="note">({e(_fmt_seconds(en.seconds))})</span>' if en.seconds is not None else ""
        cards.append(
            f'<section class="analysis" id="analysis-{e(en.analysis)}"><h2>{head}{took}</h2>\n{body}</section>'
        )
    timings = {en.analysis: en.seconds for en in entries if en.seconds is not None}
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{e(title)} \u2014 {e(model)} \u2014 normscope</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f'<header class="top"><div class="wrap">\n<h1>{e(title)}</h1>\n'
        f'<p class="sub"><span class="model">{e(model)}</span> \u00b7 normscope {e(version)}</p>\n'
        '</div></header>\n<main class="wrap">\n'
        + _settings_html(meta)
        + "\n".join(cards)
        + (_timings_html(timings) if timings else "")
        + f'</main>\n<footer class="wrap">written by normscope {e(version)}</footer>\n</body>\n</html>\n'
    )


def write_index(title: str, meta: dict[str, Any], entries: Sequence[IndexEntry], out_dir: Path) -> Path:
    """Write ``<out_dir>/index.html`` atomically and return its path."""
    path = Path(out_dir) / INDEX_HREF
    atomic_write_text(path, render_index(title, meta, entries))
    return path

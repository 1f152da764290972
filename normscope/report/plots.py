"""Plot helpers in the conventions of the field, and the escaping of figure data.

Conventions (TransformerLens / Neel Nanda style): layer on the x axis, heads labelled ``L{l}H{h}``, diverging
``RdBu`` colour scale centred at 0 for signed values; see :func:`heatmap_layer_head` and :func:`line_per_layer`.

Plotly.js renders a subset of HTML tags inside labels, so :func:`escape_figure_data` escapes, on a copy of each
figure, the *data* strings of every trace and the categorical axis fields (see the escaping contract in
:mod:`normscope.report.html`). Analyses put RAW strings into trace data, and escape with :func:`plot_text` any
user, tokenizer or model string they write into author-controlled markup (axis titles, annotations, hover
templates).
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from normscope.report.jsonio import _torch_tensor_type

DEFAULT_FIG_HEIGHT = 460  # px, when a figure sets no layout.height

if TYPE_CHECKING:  # plotly is imported lazily: `import normscope.report` stays cheap
    import plotly.graph_objects as go

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


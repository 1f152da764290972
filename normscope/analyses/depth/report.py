"""Figures of the depth page and the table printed on the terminal: the only depth module that imports plotly.

The sentences and labels are in ``summary.py``; the numbers they show come from ``analysis.py``. Figures follow
Sun, Yin, Li, Liu et al. 2025 (Curse of Depth, arXiv:2502.05795), Gromov et al. 2024 (arXiv:2403.17887) and
Sun, Chen, Kolter, Liu 2024 (Massive Activations, arXiv:2402.17762).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from normscope.analyses.depth.metrics import GrowthFit
from normscope.analyses.depth.summary import AXES, LABELS, quotable_line, skip_scope_phrase, summary
from normscope.report import Figure, plot_text

SYMLOG_LINEAR = 0.01  # nats/token: the skip-loss axis is linear inside +-this and logarithmic beyond
BAR_WIDTH = 0.8  # in blocks: one bar per block, whatever blocks --skip-layers picks
HURTS, HELPS = "#c0392b", "#2e8b57"  # skipping raises / lowers the loss

__all__ = ["AXES", "LABELS", "figures", "quotable_line", "summary", "symlog", "symlog_ticks", "terminal_table"]


def symlog(v: Any, c: float = SYMLOG_LINEAR) -> np.ndarray:
    """sign(v) log10(1 + |v| / c): a log scale for |v| >> c that keeps the sign and passes through 0."""
    x = np.asarray(v, dtype=float)
    return np.sign(x) * np.log10(1.0 + np.abs(x) / c)


def symlog_ticks(values: Any, c: float = SYMLOG_LINEAR) -> tuple[list[float], list[str]]:
    """Tick positions (on the :func:`symlog` scale) and labels (in data units) covering ``values``: 0 and the
    powers of ten from ``c`` up to the largest |value|, on each side that has values."""
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    top = float(np.abs(x).max()) if x.size else c
    powers = [c * 10.0**i for i in range(0, max(1, math.ceil(math.log10(max(top, c) / c))) + 1)]
    ticks = [0.0]
    if x.size and (x > 0).any():
        ticks += powers
    if x.size and (x < 0).any():
        ticks = [-p for p in reversed(powers)] + ticks
    return [float(symlog(t, c)) for t in ticks], [f"{t:+g}" if t else "0" for t in ticks]


def skip_figure(blocks: pd.DataFrame, n_blocks: int, base_loss: float | None,
                scope: dict[str, Any] | None = None) -> go.Figure:
    """Loss change per skipped block: bars one block wide at their block, on a sign-keeping log axis; the hover
    gives the standard error over the sequences measured (``scope``: which tokens, and their baseline)."""
    sk = blocks.dropna(subset=["skip_delta_loss"])
    y = sk["skip_delta_loss"].to_numpy(dtype=float)
    se = (sk["skip_delta_loss_se"] if "skip_delta_loss_se" in sk else pd.Series(np.nan, index=sk.index)).to_numpy(
        dtype=float)
    if scope is not None:
        base_loss = scope["baseline_loss"]
    fig = go.Figure(go.Bar(
        x=sk["block"], y=symlog(y), width=BAR_WIDTH, customdata=np.stack([y, se], axis=1), name="loss change",
        marker_color=[HURTS if v >= 0 else HELPS for v in y], text=[f"{v:+.3f}" for v in y],
        textposition="outside", cliponaxis=False,
        hovertemplate="block %{x} skipped: %{customdata[0]:+.4f} \u00b1 %{customdata[1]:.4f} nats/token"
                      "<extra></extra>"))
    tickvals, ticktext = symlog_ticks(y)
    base = f" (baseline {base_loss:.3f} nats/token)" if base_loss is not None else ""
    fig.update_layout(title=f"Loss change when one block is skipped{base}", template="plotly_white",
                      xaxis_title="block skipped",
                      yaxis_title=f"loss change, nats/token (log beyond \u00b1{SYMLOG_LINEAR:g})")
    fig.update_xaxes(range=[-0.5, n_blocks - 0.5], dtick=1 if n_blocks <= 32 else None)
    fig.update_yaxes(tickvals=tickvals, ticktext=ticktext, zeroline=True, zerolinewidth=2,
                     zerolinecolor="#444")
    return fig


def figures(layers: pd.DataFrame, blocks: pd.DataFrame, sites_df: pd.DataFrame, dist: np.ndarray,
            windows: pd.DataFrame, drop: dict[str, Any] | None, g: GrowthFit, has_lns: bool,
            base_loss: float | None, n_blocks: int, skip_scope: dict[str, Any] | None = None) -> list[Figure]:
    """Every figure of the depth page, in reading order. dist: ``[L+1, L+1]`` mean angular distances."""
    figs: list[Figure] = []
    x = layers["point"].to_numpy()
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=x, y=layers["norm_rest"], mode="lines+markers", name="ordinary positions"))
    fig.add_trace(go.Scatter(x=x, y=layers["norm_pos0"], mode="lines+markers", name="position 0"))
    ok = layers["norm_rest"] > 0
    a = float(np.mean(np.log(layers.loc[ok, "norm_rest"]) - g.exponent * np.log(x[ok.to_numpy()] + 1.0)))
    fig.add_trace(go.Scatter(x=x, y=np.exp(a) * (x + 1.0) ** g.exponent, mode="lines", name="power-law fit",
                             line={"dash": "dot", "color": "grey"}))
    if has_lns:
        fig.add_trace(go.Scatter(x=x, y=layers["lns_norm_rest"], mode="lines+markers", name="LNS what-if, ordinary",
                                 line={"dash": "dash"}))
        fig.add_trace(go.Scatter(x=x, y=layers["lns_norm_pos0"], mode="lines+markers", name="LNS what-if, position 0",
                                 line={"dash": "dash"}))
    fig.update_layout(title="Residual stream L2 norm per layer", xaxis_title="layer (0 = embeddings, l = after "
                      "block l-1)", yaxis_title="mean L2 norm (log)", yaxis_type="log", template="plotly_white")
    figs.append(Figure("Residual norm per layer", fig,
                       f"The norm grows like (l+1)^{g.exponent:.2f}; position 0 sits far above the other tokens."))
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=x, y=layers["var_rest"], mode="lines+markers", name="ordinary positions"))
    fig.add_trace(go.Scatter(x=x, y=layers["var_pos0"], mode="lines+markers", name="position 0"))
    later = "massive_rest" in layers and bool((layers["massive_rest"] > 0).any())
    if later:  # the few tokens that hold the mean of positions > 0 up (Sun, Chen, Kolter, Liu 2024)
        fig.add_trace(go.Scatter(x=x, y=layers["var_rest_typical"], mode="lines+markers",
                                 name="ordinary, without massive-activation tokens", line={"dash": "dot"}))
    if has_lns:
        fig.add_trace(go.Scatter(x=x, y=layers["lns_var_rest"], mode="lines+markers", name="LNS what-if, ordinary",
                                 line={"dash": "dash"}))
    fig.update_layout(title="Residual stream variance per layer (over hidden dims)", xaxis_title="layer",
                      yaxis_title="variance (log)", yaxis_type="log", template="plotly_white")
    caption = "The Curse of Depth: in Pre-LN models the output variance grows with depth."
    if later:
        caption += (" Where the ordinary curve stays flat, a few tokens at positions > 0 with massive activations "
                    "dominate its mean; the dotted curve leaves them out (see the interpretation above).")
    figs.append(Figure("Residual variance per layer", fig, caption))
    fig = go.Figure()
    bx = blocks["block"].to_numpy()
    fig.add_trace(go.Scatter(x=bx, y=blocks["rel_update"], mode="lines+markers", name="block (total)"))
    fig.add_trace(go.Scatter(x=bx, y=blocks["rel_update_attn"], mode="lines+markers", name="attention part"))
    fig.add_trace(go.Scatter(x=bx, y=blocks["rel_update_mlp"], mode="lines+markers", name="MLP part"))
    if has_lns:
        fig.add_trace(go.Scatter(x=bx, y=blocks["lns_rel_update"], mode="lines+markers", name="LNS what-if (total)",
                                 line={"dash": "dash"}))
    fig.update_layout(title="Relative update ||h_out - h_in|| / ||h_in|| per block (ordinary positions)",
                      xaxis_title="block", yaxis_title="relative update (log)", yaxis_type="log",
                      template="plotly_white")
    figs.append(Figure("Relative update per block", fig,
                       "Blocks near the bottom of this plot barely change the residual stream: they are "
                       "near-identity."))
    n_p = dist.shape[0]
    fig = go.Figure(go.Heatmap(z=dist, x=list(range(n_p)), y=list(range(n_p)), colorscale="Viridis",
                               colorbar={"title": {"text": "d / pi"}},
                               hovertemplate="h_%{y} vs h_%{x}: %{z:.3f}<extra></extra>"))
    fig.update_layout(title="Angular distance arccos(cos(h_l, h_m)) / pi on the last token", template="plotly_white",
                      height=620, width=680, xaxis_title="layer m", yaxis_title="layer l")
    fig.update_yaxes(autorange="reversed", scaleanchor="x")
    figs.append(Figure("Angular distance between layers", fig,
                       "Dark squares along the diagonal are runs of layers that barely turn the last token's "
                       "representation: candidates to drop (Gromov et al.)."))
    if "skip_delta_loss" in blocks and blocks["skip_delta_loss"].notna().any():
        figs.append(Figure("Skip-one-block loss change", skip_figure(blocks, n_blocks, base_loss, skip_scope),
                           f"Measured on {skip_scope_phrase(skip_scope)}, against the baseline loss of the same "
                           "tokens; the hover gives each change's standard error over those sequences. "
                           "Red bars above zero are blocks the model cannot do without; green bars below zero are "
                           "blocks whose skipping lowers the loss on this text. The axis is linear within "
                           f"\u00b1{SYMLOG_LINEAR:g} nats/token and logarithmic beyond, so small and negative changes "
                           "stay visible (hover for the exact value)."))
    fig = go.Figure(go.Scatter(x=windows["n"], y=windows["distance"], mode="lines+markers", name="min distance",
                               text=[f"blocks {s}-{e}" for s, e in zip(windows["start"], windows["end"], strict=True)],
                               hovertemplate="n=%{x}: %{text}, d=%{y:.3f}<extra></extra>"))
    if drop is not None:
        fig.add_trace(go.Scatter(x=[drop["n"]], y=[drop["distance"]], mode="markers+text", marker={"size": 12},
                                 text=[plot_text(f"dropped: {drop['delta_loss']:+.3f} nats")],
                                 textposition="top left", name="measured drop"))
    fig.update_layout(title="Cheapest window of n blocks to drop: min over l of d(h_l, h_l+n)",
                      xaxis_title="n (blocks dropped)", yaxis_title="angular distance / pi", template="plotly_white")
    figs.append(Figure("Cheapest window per size", fig,
                       "The lower the curve stays as n grows, the more consecutive blocks could go with little "
                       "change to the last token."))
    if len(sites_df):
        fig = go.Figure()
        for role, grp in sites_df.groupby("role", sort=False):
            fig.add_trace(go.Scatter(x=grp["layer"], y=grp["divisor_rest"], mode="lines+markers",
                                     name=f"{role} divisor"))
            fig.add_trace(go.Scatter(x=grp["layer"], y=grp["out_var_rest"], mode="lines+markers",
                                     name=f"{role} output variance", line={"dash": "dot"}))
        fig.update_layout(title="Norm sites: divisor (RMS or std) and output variance, ordinary positions",
                          xaxis_title="layer", yaxis_title="value (log)", yaxis_type="log", template="plotly_white")
        figs.append(Figure("Norm divisor and output variance per site", fig,
                           "The divisor tracks the growing residual norm, while the output variance stays set by "
                           "the gains."))
    if has_lns:
        fig = go.Figure()
        fig.add_trace(go.Scatter(x=bx, y=blocks["angular_to_next"], mode="lines+markers", name="as trained"))
        fig.add_trace(go.Scatter(x=bx, y=blocks["lns_angular_to_next"], mode="lines+markers",
                                 name="LNS what-if (not trained so)", line={"dash": "dash"}))
        fig.update_layout(title="Angular distance d(h_l, h_l+1) per block: as trained vs LayerNorm Scaling at "
                          "inference", xaxis_title="block", yaxis_title="angular distance / pi",
                          template="plotly_white")
        figs.append(Figure("LayerNorm Scaling what-if: per-block turn", fig,
                           "The model was not trained with LayerNorm Scaling, so read this as a sensitivity test, "
                           "not as the paper's trained result."))
    return figs


def terminal_table(result: Any) -> Any:
    """The rich table the CLI prints after the run."""
    from rich.table import Table

    r = result  # a normscope.report.Result
    t = Table(title=f"depth-curse: {r.payload['model']}", show_header=True)
    for col in ("block", "rel. update", "attn", "MLP", "norm after", "skip dloss"):
        t.add_column(col, justify="right")
    layers = {row["point"]: row for row in r.payload["layers"]}
    for row in r.payload["blocks"]:
        d, se = row.get("skip_delta_loss"), row.get("skip_delta_loss_se")
        cell = "" if d is None or d != d else f"{d:+.3f}" + ("" if se is None or se != se else f" \u00b1{se:.3f}")
        t.add_row(str(row["block"]), f"{100 * row['rel_update']:.1f}%", f"{100 * row['rel_update_attn']:.1f}%",
                  f"{100 * row['rel_update_mlp']:.1f}%", f"{layers[row['block'] + 1]['norm_rest']:.1f}", cell)
    return t


def residual_scale_figure(layers: pd.DataFrame, spec: str) -> Figure:
    """The ordinary-token residual norm per layer, as the model runs and with its residual branches scaled."""
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=layers["point"], y=layers["norm_rest"], mode="lines+markers", name="as trained"))
    fig.add_trace(go.Scatter(x=layers["point"], y=layers["rs_norm_rest"], mode="lines+markers",
                             name=f"branches scaled ({spec})", line={"dash": "dash"}))
    fig.update_layout(xaxis_title="layer (0 = embeddings, l = after block l-1)",
                      yaxis_title="mean L2 norm, positions > 0 (log)", yaxis_type="log")
    return Figure("Residual-branch scaling what-if", fig,
                  "Every block's attention and MLP outputs scaled at inference (no retraining): how much of the norm's "
                  "growth with depth the branch sizes carry.")

"""Figures and interpretation sentences of ``normscope sinks`` (the only module of the analysis that imports
plotly). Reference numbers quoted here: Gu et al. 2024 (arXiv:2410.10781) for sink rates, Sun et al. 2024
(arXiv:2402.17762) for massive activations."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import torch

from normscope.analyses.sinks.options import SinksOptions
from normscope.report import Figure, heatmap_layer_head

__all__ = ["figures", "massive_label_layers", "summary"]


def summary(sample: Any, opts: SinksOptions, overall: float, by_cat: dict[str, float], layers: pd.DataFrame,
            dims: list[int], massive: pd.DataFrame, sites_df: pd.DataFrame, ablations: list[dict[str, Any]],
            sink_tokens: pd.DataFrame, position0_arbitrary: bool, ln_free: dict[str, Any] | None = None) -> list[str]:
    """The interpretation paragraphs of the page, each with the published numbers to compare against."""
    out = []
    sr = layers["sink_rate"].dropna()
    third = max(len(sr) // 3, 1)
    out.append(
        f"{overall:.1f}% of (sequence, layer, head) triples give the first token an average attention above "
        f"{opts.eps} (Sink_1^{opts.eps} at T = {sample.seq_len}; Gu et al. report 92-99% for Llama-family models "
        f"and 77% for GPT2-XL on natural text at T = 64). Per layer it goes from {sr.iloc[:third].mean():.1f}% in "
        f"the first third of the layers to {sr.iloc[-third:].mean():.1f}% in the last third."
    )
    if by_cat:
        parts = ", ".join(f"{c} {v:.1f}%" for c, v in by_cat.items())
        out.append(f"By kind of text: {parts}. Gu et al. find the rate lower on random tokens and, for Llama "
                   "models, zero on one repeated token.")
    if dims:
        top = massive.loc[massive["abs"].idxmax()]
        first = int(layers.loc[layers["massive_dims"].map(len) > 0, "layer"].min())
        out.append(
            f"Massive activations (|h| > {opts.massive_threshold:g} and > {opts.massive_ratio:g}x the median, Sun et "
            f"al. 2024) appear from layer {first} on in hidden dim(s) {', '.join(map(str, dims[:5]))}; the largest is "
            f"{top['value']:.0f} at position {int(top['position'])} (layer {int(top['layer'])}), against a median "
            f"|h| of {layers['median_abs'].median():.3f}."
        )
    else:
        out.append("No activation passes the massive-activation test (Sun et al. 2024) on this text.")
    if len(sites_df) and ln_free:
        out.append(
            "This model is a remove-ln export: its norms divide every ordinary token by a fixed constant"
            + (" (up to a hard clamp, which normalises only the tokens above K times a site's scale)"
               if ln_free.get("clamp_shape") == "hard" else
               " (nearly: a soft clamp normalises only tokens far above a site's scale)"
               if ln_free.get("clamped") else "")
            + " and the BOS keeps its own divisor, so no outlier dim rescales the other dims of an ordinary token. "
            "The per-site outlier shares below describe the norms' inputs, not a rescaling."
        )
    elif len(sites_df):
        worst = sites_df.sort_values("top1_share_first", ascending=False).iloc[0]
        out.append(
            f"Outlier-driven rescaling: at {worst['site']} one dim carries {100 * worst['top1_share_first']:.1f}% of "
            f"the squared divisor at position 0 (vs {100 * worst['top1_share_rest']:.1f}% for other tokens), and "
            f"position 0's divisor is {worst['divisor_ratio_first_to_rest']:.1f}x that of ordinary tokens: the "
            "outlier inflates the RMS and shrinks every other component of that token."
        )
    if position0_arbitrary:
        n_first = int((sink_tokens["position"] == "first").sum()) if len(sink_tokens) else 0
        out.append(
            "No BOS was prepended, so position 0 of every sequence is an arbitrary token: the first of a document or "
            "one cut from its middle. The attention it gets is the first-position sink whatever the token is, so "
            f"the {n_first} 'first' row(s) of the sink-token table name the tokens that happened to open a window, "
            "not tokens that attract attention; only its 'later' rows say which tokens become sinks. Rerun with "
            "--bos yes to put one fixed BOS token at position 0."
        )
    for r in ablations:
        out.append(f"Causal check, {r['intervention']}: loss {r['baseline_loss']:.3f} -> {r['loss']:.3f} "
                   f"({r['delta_loss']:+.3f} nats/token).")
    return out


def massive_label_layers(top: pd.DataFrame) -> list[bool]:
    """Which rows of ``top`` (each layer's largest massive activation, by layer) get a text label on the plot:
    the first of every run of consecutive layers whose largest entry sits in the same dim. One label per run
    keeps the dims readable where dozens of layers share one (SmolLM2's d507 in layers 11-28); hovering any
    point still names its dim."""
    keep = []
    prev_layer, prev_dim = None, None
    for layer, dim in zip(top["layer"].tolist(), top["dim"].tolist(), strict=True):
        keep.append(prev_layer is None or layer != prev_layer + 1 or dim != prev_dim)
        prev_layer, prev_dim = layer, dim
    return keep


def _massive_figure(layers: pd.DataFrame, massive: pd.DataFrame) -> go.Figure:
    fig = go.Figure()
    for col, name in (("top1_abs", "top-1 |h|"), ("top2_abs", "top-2 |h|"), ("top3_abs", "top-3 |h|"),
                      ("median_abs", "median |h|")):
        fig.add_trace(go.Scatter(x=layers["layer"], y=layers[col], mode="lines+markers", name=name))
    if len(massive):
        top = massive.sort_values("abs", ascending=False).drop_duplicates("layer").sort_values("layer")
        labelled = massive_label_layers(top)
        custom = [[r.dim, r.position, repr(r.token), r.value] for r in top.itertuples()]
        fig.add_trace(go.Scatter(
            x=top["layer"], y=top["abs"], mode="markers+text", name="largest massive activation",
            text=[f"d{d}" if k else "" for d, k in zip(top["dim"], labelled, strict=True)],
            textposition="top right", marker={"symbol": "diamond-open", "size": 9, "color": "#444"},
            customdata=custom,
            hovertemplate="layer %{x}: dim %{customdata[0]} at position %{customdata[1]} (token %{customdata[2]})"
                          "<br>value %{customdata[3]:,.0f}<extra></extra>"))
    fig.update_layout(xaxis_title="layer", yaxis_title="|h| (log)", yaxis_type="log",
                      title="Residual stream magnitudes per layer (mean over sequences)")
    return fig


def figures(heads: pd.DataFrame, layers: pd.DataFrame, massive: pd.DataFrame, sites_df: pd.DataFrame,
            opts: SinksOptions, seq_len: int) -> list[Figure]:
    """The page's figures: alpha_1 per head, sink rate per layer, |h| per layer, outlier share per site."""
    figs: list[Figure] = []
    if len(heads):
        n_l, n_h = int(heads["layer"].max()) + 1, int(heads["head"].max()) + 1
        grid = torch.full((n_l, n_h), math.nan)  # [layer, head]
        for r in heads.itertuples():
            grid[r.layer, r.head] = r.alpha1
        figs.append(Figure(
            "Sink score alpha_1 per layer and head",
            heatmap_layer_head(grid.numpy(), "alpha_1 (mean attention to position 0)", zlabel="alpha_1"),
            f"Bright cells are sink heads: on average they put more than {opts.eps} of their attention on the "
            "first token.",
        ))
        fig = go.Figure()
        fig.add_trace(go.Scatter(x=layers["layer"], y=layers["sink_rate"], mode="lines+markers", name="all text"))
        fig.update_layout(xaxis_title="layer", yaxis_title=f"Sink_1^{opts.eps} (%)", yaxis_range=[0, 100],
                          title=f"Sink rate per layer (T = {seq_len})")
        figs.append(Figure("Sink rate per layer", fig,
                           "Look for the rise with depth: sinks form after the first few layers."))
    figs.append(Figure("Massive activations per layer", _massive_figure(layers, massive),
                       "A gap of three or more decades between the top-1 and the median marks a massive activation; "
                       "diamonds mark each layer's largest, labelled with its hidden dim where the dim changes "
                       "(hover for the others)."))
    if len(sites_df):
        fig = go.Figure()
        fig.add_trace(go.Bar(x=sites_df["site"], y=sites_df["top1_share_first"], name="position 0"))
        fig.add_trace(go.Bar(x=sites_df["site"], y=sites_df["top1_share_rest"], name="other positions"))
        fig.update_layout(barmode="group", xaxis_title="norm site", yaxis_title="share of divisor^2 in top-1 dim",
                          yaxis_range=[0, 1], title="Outlier share of the norm divisor per site")
        figs.append(Figure("Outlier share per norm site", fig,
                           "Where one dim carries most of the divisor, the norm shrinks every other dim of that "
                           "token (outlier-driven rescaling)."))
    return figs

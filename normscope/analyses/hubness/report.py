"""Labels, summary sentences and figures of the hubness page: the only hubness module that imports plotly.

The sentences follow Radovanovic et al. 2010 (JMLR 11), Feldbauer et al. 2018 (scikit-hubness), Nielsen,
Macocco, Baroni 2025 (arXiv:2502.10201) and Sun, Chen, Kolter, Liu 2024 (arXiv:2402.17762).
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from normscope.analyses.hubness.options import HubnessOptions
from normscope.analyses.hubness.plan import Point
from normscope.report import Figure, plot_text

AXES = {"points": "layer", "norm_effect": "layer"}  # each per-depth table: its depth column
LABELS = {
    "points": "per hook point", "norm_effect": "each norm's effect", "hubs": "the tokens that are hubs",
    "unembedding_hubs": "hubs of contexts against the unembedding", "skewness": "k-occurrence skewness",
    "robin_hood": "Robin Hood index", "antihub_share": "antihub share (N_k = 0)", "hub_occurrence": "hub occurrence",
    "gini": "Gini of N_k", "skewness_in": "skewness before the norm", "skewness_out": "skewness after the norm",
    "nonfinite_points": "hook points with inf/NaN",
}


def summary(pts: pd.DataFrame, effect: pd.DataFrame, hubs_df: pd.DataFrame, un: dict[str, Any],
            un_rows: list[dict[str, Any]], opts: HubnessOptions, n_tok: int, info: Any,
            groups: list[list[Point]], mem_mb: float) -> list[str]:
    """The interpretation paragraphs of the hubness page, in reading order."""
    out = []
    for metric in opts.metrics:
        sub = pts[(pts["metric"] == metric) & (pts["kind"] == "resid_post")].sort_values("layer")
        if len(sub):
            lo, hi = sub.iloc[0], sub.iloc[-1]
            worst = sub.loc[sub["skewness"].idxmax()]
            out.append(
                f"{metric.capitalize()} k-occurrence (k = {opts.k}, {n_tok} tokens, self excluded): the "
                f"k-skewness of the residual stream goes from {lo['skewness']:.2f} after block {int(lo['layer'])} "
                f"to {hi['skewness']:.2f} after block {int(hi['layer'])}, peaking at {worst['skewness']:.2f} "
                f"(block {int(worst['layer'])}); there {100 * worst['antihub_share']:.0f}% of tokens are antihubs "
                f"and hubs (N_k >= {opts.hub_size:g}k) take {100 * worst['hub_occurrence']:.0f}% of all "
                f"neighbour slots. Values above about 1 mean pronounced hubness (Radovanovic et al. 2010)."
            )
    if len(effect):
        parts = []
        for metric in opts.metrics:
            e = effect[effect["metric"] == metric]
            if len(e):
                up = int((e["skewness_change"] > 0).sum())
                parts.append(f"{metric}: median change {e['skewness_change'].median():+.2f}, skewness rises "
                             f"through {up} of {len(e)} norms")
        out.append("Through each norm (output minus input k-skewness) - " + "; ".join(parts) + ". Cosine "
                   "neighbours only change through a norm by its centring (LayerNorm) and its per-dimension gain, "
                   "since the per-token division does not change directions; Euclidean neighbours also change "
                   "with the per-token rescaling, which brings every token to a similar norm.")
    island = pts[(pts["kind"] == "resid_post") & pts["pos0_neighbours_pos0"].notna()]
    if len(island):
        late = island[island["layer"] >= island["layer"].max() // 3]
        if len(late):
            share = float(late["pos0_neighbours_pos0"].mean())
            why = (" Position 0 forms an island: a massive activation (Sun et al. 2024) sets the first tokens apart "
                   "from the text, so they are neighbours of each other rather than hubs." if share > 0.5 else "")
            out.append(
                f"In the block outputs from block {int(late['layer'].min())} on, on average {100 * share:.0f}% of "
                f"the neighbours of a first token are first tokens too (their mean N_k is "
                f"{late['pos0_mean_nk'].mean():.1f}).{why}"
            )
    if len(hubs_df):
        n, n0 = len(hubs_df), int((hubs_df["position"] == 0).sum())
        out.append(
            f"Of the {n} named hubs (top {opts.top_hubs} per point and metric), {n0} "
            f"sit at position 0 and {int((hubs_df['sink'] == 'sink token').sum())} are tokens that act as "
            f"attention sinks elsewhere in the text (as `normscope sinks` finds them); "
            f"{int(hubs_df['delimiter'].sum())} are delimiters or whitespace."
        )
    if un:
        top = ", ".join(repr(r["token"]) for r in un_rows[:5])
        out.append(
            f"Contexts against the unembedding (nearest = largest logit): k-skewness {un['skewness']:.2f} over "
            f"{un['vocab_size']} vocabulary items, {100 * un['antihub_share']:.1f}% of which are never among the "
            f"top-{opts.k} predictions. The biggest hubs are {top}; {un['top_hubs_in_text_top20']} of the top "
            f"{len(un_rows)} are among the 20 most frequent next tokens of this text. Nielsen, Macocco and Baroni "
            "(2025) find these prediction hubs to be frequent tokens and harmless, unlike token-token hubs."
        )
    out.append(
        f"Memory: {len(groups)} forward pass(es), at most {mem_mb:.0f} MB of float32 representation matrices at "
        f"once ({n_tok} tokens x {info.d_model} dims = "
        f"{n_tok * info.d_model * 4 / 2**20:.1f} MB per point); the k-NN search runs in blocks of "
        f"{opts.block_size} queries and never builds an N x N matrix."
    )
    return out


_KIND_STYLE = {"norm_in": "dot", "norm_out": "solid", "resid_post": "dash"}


def figures(pts: pd.DataFrame, effect: pd.DataFrame, hists: dict[str, dict[str, torch.Tensor]],
            unembed_df: pd.DataFrame, opts: HubnessOptions, layers: list[int]) -> list[Figure]:
    """Every figure of the hubness page. hists: point label -> metric -> its ``[n_tokens]`` N_k."""
    figs: list[Figure] = []
    if not len(pts):
        return figs
    metrics = list(opts.metrics)
    # 1. skewness per layer, before and after each norm role
    fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=[plot_text(m) for m in metrics],
                        horizontal_spacing=0.08)
    colors = {"pre_attn": "#1f77b4", "pre_mlp": "#ff7f0e", "final": "#2ca02c", "post_attn": "#9467bd",
              "post_mlp": "#8c564b", None: "#555555"}
    for ci, metric in enumerate(metrics):
        sub = pts[pts["metric"] == metric]
        for (kind, role), g in sub.groupby(["kind", sub["role"].fillna("resid")], sort=False):
            g = g.sort_values("layer")
            role_key = None if role == "resid" else role
            name = "residual stream (block output)" if kind == "resid_post" else (
                f"{role} norm {'input' if kind == 'norm_in' else 'output'}")
            fig.add_trace(go.Scatter(
                x=g["layer"], y=g["skewness"], mode="lines+markers", name=name, legendgroup=name,
                showlegend=ci == 0, line={"dash": _KIND_STYLE[kind], "color": colors.get(role_key, "#555555")},
                text=g["point"], hovertemplate="%{text}<br>k-skewness %{y:.3f}<extra></extra>"),
                row=1, col=ci + 1)
        fig.update_xaxes(title_text="layer", row=1, col=ci + 1)
        fig.update_yaxes(title_text=f"k-skewness (k = {opts.k})", row=1, col=ci + 1)
    fig.update_layout(template="plotly_white", height=480, title="k-skewness per layer before and after each norm")
    figs.append(Figure("k-skewness per layer, before and after each norm", fig,
                       "Dotted lines are norm inputs and solid lines of the same colour their outputs: the gap "
                       "between them is what the norm does to hubness."))
    # 2. side by side per site
    if len(effect):
        fig = make_subplots(rows=len(metrics), cols=1, subplot_titles=[plot_text(m) for m in metrics],
                            vertical_spacing=0.18)
        for ri, metric in enumerate(metrics):
            e = effect[effect["metric"] == metric]
            fig.add_trace(go.Bar(x=e["site"], y=e["skewness_in"], name="before the norm", marker_color="#9ecae1",
                                 legendgroup="in", showlegend=ri == 0), row=ri + 1, col=1)
            fig.add_trace(go.Bar(x=e["site"], y=e["skewness_out"], name="after the norm", marker_color="#08519c",
                                 legendgroup="out", showlegend=ri == 0), row=ri + 1, col=1)
            fig.update_yaxes(title_text="k-skewness", row=ri + 1, col=1)
        fig.update_layout(barmode="group", template="plotly_white", height=320 * len(metrics) + 80,
                          title="k-skewness of each norm's input and output")
        figs.append(Figure("Before versus after each norm", fig,
                           "Each pair of bars is one norm site: a taller dark bar means the norm makes hubs "
                           "stronger, a shorter one that it flattens them."))
    # 3. N_k histograms at a few layers
    resid = pts[(pts["kind"] == "resid_post") & (pts["metric"] == metrics[0])].sort_values("layer")
    if len(resid):
        n = len(resid)
        pick = sorted({0, n // 2, n - 1})[: max(opts.hist_points, 1)]
        fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=[plot_text(m) for m in metrics])
        for ci, metric in enumerate(metrics):
            for j in pick:
                label = resid.iloc[j]["point"]
                nk = hists.get(label, {}).get(metric)
                if nk is None:
                    continue
                counts = torch.bincount(nk)
                fig.add_trace(go.Scatter(x=list(range(counts.numel())), y=counts.tolist(), mode="lines",
                                         line={"shape": "hv"}, name=label, legendgroup=label,
                                         showlegend=ci == 0), row=1, col=ci + 1)
            fig.update_xaxes(title_text="N_k", row=1, col=ci + 1)
            fig.update_yaxes(title_text="number of tokens (log)", type="log", row=1, col=ci + 1)
        fig.update_layout(template="plotly_white", height=440, title="Distribution of N_k at chosen layers")
        figs.append(Figure("N_k histograms at chosen layers", fig,
                           f"Without hubness N_k clusters around k = {opts.k}; a long right tail means a few tokens "
                           "are neighbours of very many others."))
    # 4. context-unembedding hubs
    if len(unembed_df):
        fig = go.Figure(go.Bar(x=unembed_df["token"].map(repr), y=unembed_df["n_k"],
                               text=unembed_df["count_in_text"], hovertemplate="%{x}: N_k %{y}<br>"
                               "count in text %{text}<extra></extra>"))
        fig.update_layout(template="plotly_white", height=420, xaxis_title="vocabulary item",
                          yaxis_title=f"N_k (contexts with it in their top {opts.k} logits)",
                          title="Hubs of the contexts against the unembedding")
        figs.append(Figure("Context-unembedding hubs", fig,
                           "These are the tokens the model predicts almost everywhere; compare their N_k with how "
                           "often they occur in the text (hover)."))
    return figs

"""Figures and interpretation sentences of ``normscope dla`` (the only module of the analysis that imports
plotly). Reference numbers quoted here: Baroni et al. 2025 (arXiv:2507.02559) for NMAE and GPT-2 small's
entropy neuron 584; the definition of an entropy neuron: Stolfo et al. 2024 (arXiv:2406.16254)."""

from __future__ import annotations

import math

import pandas as pd
import plotly.graph_objects as go
import torch

from normscope.analyses.dla.metrics import ENTROPY_NEURON_MAX_CE_RATIO
from normscope.report import Figure, heatmap_layer_head

__all__ = ["figures", "neuron_note", "summary"]

# heads and MLP layers must read apart at a glance in the scatter: colour, symbol and size all differ, and the
# MLP diamonds are open so that the heads they sit on stay visible
HEAD_STYLE = {"color": "#1f77b4", "symbol": "circle", "size": 4, "opacity": 0.5}
MLP_STYLE = {"color": "#d62728", "symbol": "diamond-open", "size": 9, "opacity": 0.9, "line": {"width": 1.5}}


def neuron_note(neurons: pd.DataFrame) -> str | None:
    """The page's sentence on candidates that fail the entropy-neuron definition, or None when none fails."""
    if not len(neurons) or "fails_definition" not in neurons:
        return None
    bad = neurons[neurons["fails_definition"].astype(bool)]
    if not len(bad):
        return None
    parts = ", ".join(f"{r.label} ({r.ce_to_entropy_ratio:.2f})" for r in bad.itertuples())
    return (
        f"Not entropy neurons: {len(bad)} of {len(neurons)} candidates move the loss by at least "
        f"{ENTROPY_NEURON_MAX_CE_RATIO:g}x what they move the entropy (mean |d CE| / mean |d entropy|: {parts}). "
        "An entropy neuron changes the confidence of the prediction much more than the loss (Stolfo et al. 2024); "
        "these rank high by their weights alone, so the 'fails definition' column marks them and the headline "
        + ("names none of them." if len(bad) == len(neurons) else "names only a candidate that passes.")
    )


def summary(overall: dict[str, float], layers: pd.DataFrame, worst: pd.DataFrame, neurons: pd.DataFrame,
            backend: str, cross: dict[str, float], notes: list[str], n_predictions: int,
            mean_ce: float) -> list[str]:
    """The interpretation paragraphs of the page, each with the published numbers to compare against."""
    out = []
    last = layers.iloc[-max(1, len(layers) // 6):]
    out.append(
        f"Over {n_predictions} next-token predictions, direct logit attribution with the cached final-norm scale is "
        f"off from the true direct effect by NMAE = {overall['all']:.1f}% (heads {overall['heads']:.1f}%, MLP layers "
        f"{overall['mlp']:.1f}%); in the last layers the heads reach {last['nmae_heads'].mean():.1f}%. Baroni et "
        "al. (2025) report about 150% for the heads of GPT-2 small's layers 10-11 and about 0 for its LN-free "
        "version, whose final norm is a fixed scale: a value near 0 means the model is LN-free in effect."
    )
    if len(worst):
        w = worst.iloc[0]
        out.append(
            f"The frozen scale misleads most for {w['component']}: mean |DLA - DE| = {w['mean_abs_err']:.3f} logits "
            f"against a mean |DE| of {w['mean_abs_de']:.3f} (NMAE {w['nmae']:.0f}%). At position 0, where models "
            f"with attention sinks park a massive activation, NMAE is {overall['position_0']:.1f}% against "
            f"{overall['other_positions']:.1f}% elsewhere."
        )
    if backend == "bridge":
        rel = cross.get("max_abs_dla_diff", math.nan) / max(cross.get("max_abs_dla", 1.0), 1e-30)
        out.append(
            f"DLA comes from TransformerLens' TransformerBridge (stack_head_results, decompose_resid, logit_attrs "
            f"with the final norm's gain folded into W_U). normscope's independent computation from its own hooks "
            f"agrees to {cross.get('max_abs_dla_diff', math.nan):.2e} logits at most on the first batch "
            f"of {cross.get('tokens', 0)} predictions ({rel:.1e} of the largest |DLA|)."
        )
    else:
        out.append("DLA and DE come from normscope's own hooks (per-head outputs from the input of the attention "
                   "output projection times each head's slice of W_O).")
    out.extend(notes)
    if len(neurons) and "mean_abs_delta_entropy" in neurons:
        top = neurons.sort_values("mean_abs_delta_entropy", ascending=False).iloc[0]
        out.append(
            f"Entropy-neuron candidates of the last MLP (largest ||W_out|| / var cos(W_out, W_U)): mean-ablating "
            f"{top['label']} changes the output entropy by {top['mean_abs_delta_entropy']:.4f} nats on average "
            f"(median {top['median_abs_delta_entropy']:.4f}) and the loss by {top['mean_abs_delta_ce']:.4f} "
            f"(baseline CE {mean_ce:.3f}). Baroni et al. see a median |delta entropy| of about 0.05 for GPT-2 small's "
            "neuron 584, and about 0 once the final norm is a fixed scale."
        )
        note = neuron_note(neurons)
        if note:
            out.append(note)
    return out


def _scatter_figure(scatter: torch.Tensor, labels: list[str], n_heads: int) -> go.Figure:
    """DLA against DE for the sampled (component, token) pairs; scatter ``[n, 4]``: component, DLA, DE, position."""
    fig = go.Figure()
    comp = scatter[:, 0].long()  # [n]
    is_mlp = (comp % (n_heads + 1)) == n_heads  # components run layer by layer: H heads, then the MLP
    # the open MLP diamonds first, the small head dots over them: both stay visible where they overlap near 0
    for name, m, style in (("MLP layers", is_mlp, MLP_STYLE), ("attention heads", ~is_mlp, HEAD_STYLE)):
        if not m.any():
            continue
        marker = {k: v for k, v in style.items() if k != "opacity"}
        fig.add_trace(go.Scattergl(x=scatter[m, 2].tolist(), y=scatter[m, 1].tolist(), mode="markers",
                                   name=f"{name} ({int(m.sum())} points)", marker=marker, opacity=style["opacity"],
                                   text=[labels[int(c)] for c in comp[m]],
                                   hovertemplate="%{text}<br>DE %{x:.3f}<br>DLA %{y:.3f}<extra></extra>"))
    lo = float(scatter[:, 1:3].min())
    hi = float(scatter[:, 1:3].max())
    fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="DLA = DE",
                             line={"color": "#888", "dash": "dash"}))
    fig.update_layout(template="plotly_white", height=560, xaxis_title="direct effect DE (logits)",
                      yaxis_title="DLA with the cached scale (logits)", title="DLA against the direct effect",
                      legend={"itemsizing": "constant"})
    return fig


def figures(comps: pd.DataFrame, layers: pd.DataFrame, scatter: torch.Tensor, labels: list[str], n_layers: int,
            n_heads: int, neurons: pd.DataFrame) -> list[Figure]:
    """The page's figures: mean DLA and NMAE per head, DLA against DE, NMAE per layer, the neuron ablations."""
    figs: list[Figure] = []
    heads = comps[comps["type"] == "head"]
    grid = torch.tensor(heads["mean_dla"].to_numpy()).reshape(n_layers, n_heads)  # [layer, head]
    figs.append(Figure("Mean direct logit attribution per head",
                       heatmap_layer_head(grid.numpy(), "mean DLA to the next token (logits)", "mean DLA",
                                          diverging=True),
                       "Blue heads push the logit of the actual next token up on average, red ones push it down."))
    grid = torch.tensor(heads["nmae"].to_numpy()).reshape(n_layers, n_heads)  # [layer, head]
    figs.append(Figure("NMAE of DLA against the direct effect per head",
                       heatmap_layer_head(grid.numpy(), "NMAE per head (%)", "NMAE (%)"),
                       "Bright heads are those whose attribution the frozen final-norm scale gets most wrong."))
    if scatter.numel():
        figs.append(Figure("DLA against the direct effect", _scatter_figure(scatter, labels, n_heads),
                           "Points off the diagonal are attributions that the frozen final-norm scale misstates; a "
                           "LN-free model puts them all on it. Blue dots are attention heads, red open diamonds MLP "
                           "layers."))
    fig = go.Figure()
    for col, name in (("nmae_heads", "heads"), ("nmae_mlp", "MLP layer"), ("nmae_all", "all components")):
        fig.add_trace(go.Scatter(x=layers["layer"], y=layers[col], mode="lines+markers", name=name))
    fig.update_layout(template="plotly_white", height=440, xaxis_title="layer", yaxis_title="NMAE (%)",
                      title="NMAE per layer")
    figs.append(Figure("NMAE per layer", fig,
                       "Look for the rise in the last layers, whose outputs move the final norm's scale most."))
    if len(neurons) and "mean_abs_delta_entropy" in neurons:
        fails = neurons["fails_definition"].astype(bool) if "fails_definition" in neurons else \
            pd.Series(False, index=neurons.index)
        names = [f"{lab} (fails)" if bad else str(lab) for lab, bad in zip(neurons["label"], fails, strict=True)]
        fig = go.Figure()
        fig.add_trace(go.Bar(x=names, y=neurons["mean_abs_delta_entropy"], name="|d entropy|"))
        fig.add_trace(go.Bar(x=names, y=neurons["mean_abs_delta_ce"], name="|d CE|"))
        fig.update_layout(barmode="group", template="plotly_white", height=400, xaxis_title="neuron (by rank)",
                          yaxis_title="mean absolute change (nats)", title="Mean-ablating entropy-neuron candidates")
        caption = "An entropy neuron changes the entropy of the prediction much more than the loss."
        if fails.any():
            caption += (f" Candidates marked (fails) move the loss by at least {ENTROPY_NEURON_MAX_CE_RATIO:g}x "
                        "what they move the entropy: they are not entropy neurons.")
        figs.append(Figure("Entropy neurons: effect of mean ablation", fig, caption))
    return figs


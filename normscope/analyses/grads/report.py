"""Figures, interpretation sentences and the terminal table of ``normscope grads`` (the only module of the
analysis that imports plotly). Two models are drawn on one page by ``normscope compare A B --only grads``, which
overlays every per-depth table; this page shows one model. Reference: Li et al. 2024, Mix-LN (arXiv:2412.13795).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import plotly.graph_objects as go

from normscope.analyses.grads.metrics import thirds_ratio
from normscope.report import Figure

if TYPE_CHECKING:
    from normscope.analyses.grads.analysis import GradProfile

__all__ = ["figures", "summary", "terminal_table"]


def summary(p: GradProfile) -> list[str]:
    """The interpretation paragraphs of the page: the loss, how the gradient norm moves with depth, Mix-LN."""
    ratio = thirds_ratio(p.blocks["total"])
    trend = ("larger in the early blocks than in the deep ones" if ratio > 1.0
             else "smaller in the early blocks than in the deep ones")
    b = p.blocks
    lo, hi = b.loc[b["total"].idxmin()], b.loc[b["total"].idxmax()]
    r = p.residual["grad_rest"]
    dom = p.groups.groupby("group")["grad_norm"].apply(lambda s: math.sqrt(float((s ** 2).sum())))
    return [
        f"{p.model}: loss = {p.loss_name}, {p.loss:.4f} on average over {p.n_units} terms ({p.n_tokens} tokens). "
        f"The parameter-gradient norm per block is {trend}: the first third averages {ratio:.2f}x the last "
        f"third (smallest at block {int(lo['block'])}, {lo['total']:.3g}; largest at block {int(hi['block'])}, "
        f"{hi['total']:.3g}). On the residual stream, ||dL/dh|| per token goes from {r.iloc[0]:.3g} at the "
        f"embeddings to {r.iloc[-1]:.3g} after the last block ({r.iloc[0] / r.iloc[-1]:.2f}x). By group, the "
        f"largest gradient norm is in {dom.idxmax()} ({dom.max():.3g}).",
        "Mix-LN (Li et al. 2024) reports that Pre-LN models get small gradients in their deep layers and "
        "Post-LN models vanishing gradients in their early layers; compare the first/last-third ratio above "
        "(> 1: early blocks get more gradient, < 1: deep blocks do).",
    ]


def figures(p: GradProfile) -> list[Figure]:
    """The page's figures: parameter gradient per block (and group), ||dL/dh|| per residual point, and the
    gradient of the parameters outside the blocks."""
    figs: list[Figure] = []
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=p.blocks["block"], y=p.blocks["total"], mode="lines+markers", name="block total"))
    for g in ("attention", "mlp", "norm"):
        fig.add_trace(go.Scatter(x=p.blocks["block"], y=p.blocks[g], mode="lines+markers", name=g))
    fig.update_layout(title="Parameter-gradient L2 norm per block (Mix-LN's per-layer plot)", xaxis_title="block",
                      yaxis_title="||grad||_2 (log)", yaxis_type="log", template="plotly_white")
    figs.append(Figure("Parameter gradient per block", fig,
                       "A curve falling to the right means deep blocks learn slowly (Pre-LN); rising means early "
                       "blocks do (Post-LN)."))
    fig = go.Figure()
    x = p.residual["point"]
    fig.add_trace(go.Scatter(x=x, y=p.residual["grad_rest"], mode="lines+markers", name="ordinary tokens"))
    fig.add_trace(go.Scatter(x=x, y=p.residual["grad_pos0"], mode="lines+markers", name="position 0",
                             line={"dash": "dot"}))
    fig.update_layout(title="Gradient on the residual stream ||dL/dh_l|| per token",
                      xaxis_title="layer (0 = embeddings)", yaxis_title="||dL/dh|| (log)", yaxis_type="log",
                      template="plotly_white")
    figs.append(Figure("Residual-stream gradient per layer", fig,
                       "Vanishing gradients show as a curve that drops toward the embeddings (left)."))
    other = p.groups[p.groups["block"].isna()]
    if len(other):
        fig = go.Figure(go.Bar(x=other["group"], y=other["grad_norm"], name="grad norm"))
        fig.update_layout(title="Gradient norm of the parameters outside the blocks", yaxis_type="log",
                          yaxis_title="||grad||_2 (log)", template="plotly_white")
        figs.append(Figure("Embeddings, final norm and head", fig,
                           "Tied embeddings collect the gradient of both the input and the output side."))
    return figs


def terminal_table(result: Any) -> Any:
    """The rich table the CLI prints after the run: per block ||grad||, its attention, MLP and norm groups, and
    ||dL/dh|| after the block."""
    from rich.table import Table

    p = result.payload["profiles"][0]  # result: a normscope.report.Result of grads (one profile)
    t = Table(title=f"grads: {p['model']}", show_header=True)
    t.add_column("block", justify="right")
    t.add_column("||grad||", justify="right")
    for g in ("attention", "mlp", "norm"):
        t.add_column(g, justify="right")
    t.add_column("||dL/dh||", justify="right")
    for i in range(p["n_blocks"]):
        b, res = p["blocks"][i], p["residual"][i + 1]
        groups = [f"{b[g]:.3g}" if b[g] == b[g] else "" for g in ("attention", "mlp", "norm")]  # NaN: no such group
        t.add_row(str(i), f"{b['total']:.3g}", *groups, f"{res['grad_rest']:.3g}")
    return t

"""Figures, interpretation sentences and the terminal table of ``normscope grads`` (the only module of the
analysis that imports plotly). Two models are drawn on one page by ``normscope compare A B --only grads``, which
overlays every per-depth table; this page shows one model. Reference: Li et al. 2024, Mix-LN (arXiv:2412.13795).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

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
        *effective_summary(p),
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
    return figs + effective_figures(p)


CAVEAT = ("An effective learning rate means something only for a weight the model is invariant to the scale of "
          "(its output normalized): exact for the projections into qk-norms and sandwich post-norms, only joint for "
          "writers of the residual stream, which a norm reads as one sum (invariant when every writer scales "
          "together). A frozen-divisor site (remove-ln) divides by a constant and loses that invariance: there "
          "||dw||/||w|| is a raw relative change, not an effective learning rate.")


def effective_summary(p: GradProfile) -> list[str]:
    """The paragraphs on effective learning rates (Lyle et al. 2024): the spread of lr/||w||, the fine-tune's
    relative updates, and the caveat."""
    e = p.effective
    if e is None or not len(e.writers):
        return []
    w = e.writers
    lo, hi = w.loc[w["eff_lr_adam"].idxmin()], w.loc[w["eff_lr_adam"].idxmax()]
    inv = w["invariance"].value_counts()
    classes = ", ".join(f"{n} with {k}" for k, n in inv.items())
    spread_adam, spread_sgd = hi["eff_lr_adam"] / lo["eff_lr_adam"], w["eff_lr_sgd"].max() / w["eff_lr_sgd"].min()
    out = [f"Effective learning rates (Lyle et al. 2024) at lr = {e.lr:g} of the {len(w)} weights whose output a "
           f"norm normalizes ({classes} scale invariance): lr/||w|| (Adam) runs from {lo['eff_lr_adam']:.3g} "
           f"({lo['name']}, ||w|| = {lo['weight_norm']:.4g}) to {hi['eff_lr_adam']:.3g} ({hi['name']}, ||w|| = "
           f"{hi['weight_norm']:.4g}), {spread_adam:.3g}x; lr/||w||^2 (SGD) spreads {spread_sgd:.3g}x. "
           "A larger ||w|| learns slower at the same learning rate; NaP keeps ||w|| fixed to keep the step constant."]
    if e.steps:
        u = e.updates["rel_update"].to_numpy(dtype=float)
        first = w["update_first"] / w["lr_over_rms"]
        kept = e.steps - len(e.skipped)
        out.append(f"Over {e.steps} AdamW steps ({kept} kept; loss {e.losses[0]:.4f} -> {e.losses[-1]:.4f}), "
                   f"||dw||/||w|| per step had median {np.nanmedian(u):.3g} (range {np.nanmin(u):.3g} to "
                   f"{np.nanmax(u):.3g}); the first step moved each weight by {np.nanmedian(first):.3f}x "
                   "lr/rms(w) (median), the size of an Adam step whose every entry moves by lr. The weights were "
                   "put back afterwards.")
    out.append(CAVEAT)
    return out


def _x(df: Any) -> Any:
    """Block index, with the embeddings (outside the blocks) at -1."""
    return df["block"].fillna(-1)


def effective_figures(p: GradProfile) -> list[Figure]:
    """||w|| and the effective step sizes per block and kind of weight; with --steps the relative updates."""
    e = p.effective
    if e is None or not len(e.writers):
        return []
    w = e.writers
    figs: list[Figure] = []
    fig = make_subplots(rows=1, cols=3, subplot_titles=("||w||", "lr / ||w|| (Adam)", "lr / ||w||^2 (SGD)"))
    for j, kind in enumerate(dict.fromkeys(w["kind"])):
        sub = w[w["kind"] == kind]
        for c, col in enumerate(("weight_norm", "eff_lr_adam", "eff_lr_sgd")):
            fig.add_trace(go.Scatter(x=_x(sub), y=sub[col], mode="lines+markers", name=kind, legendgroup=kind,
                                     showlegend=c == 0, marker={"color": _COLORS[j % len(_COLORS)]},
                                     line={"color": _COLORS[j % len(_COLORS)]}, text=sub["name"]), row=1, col=c + 1)
    fig.update_yaxes(type="log")
    fig.update_xaxes(title_text="block (-1 = embeddings)")
    fig.update_layout(title=f"Effective learning rate of the weights a norm normalizes, lr = {e.lr:g}",
                      template="plotly_white", legend={"orientation": "h", "y": -0.25},
                      margin={"t": 110})  # subplot titles clear of the mode bar
    figs.append(Figure("Effective learning rate per block", fig,
                       "Where ||w|| grows with depth, the same learning rate turns those weights less (Lyle et al. "
                       "2024); meaningful only for scale-invariant weights (see the caveat above)."))
    if e.steps:
        fig = make_subplots(rows=1, cols=2, subplot_titles=("mean over the steps, per block",
                                                            "median over the blocks, per step"))
        u = e.updates
        for j, kind in enumerate(dict.fromkeys(w["kind"])):
            color = _COLORS[j % len(_COLORS)]
            sub = w[w["kind"] == kind]
            fig.add_trace(go.Scatter(x=_x(sub), y=sub["update_mean"], mode="lines+markers", name=kind,
                                     legendgroup=kind, line={"color": color}, text=sub["name"]), row=1, col=1)
            fig.add_trace(go.Scatter(x=_x(sub), y=sub["lr_over_rms"], mode="lines", name=f"{kind}: lr / rms(w)",
                                     legendgroup=kind, line={"color": color, "dash": "dot"}), row=1, col=1)
            per_step = u[u["kind"] == kind].groupby("step")["rel_update"].median()
            fig.add_trace(go.Scatter(x=per_step.index, y=per_step.to_numpy(), mode="lines+markers", name=kind,
                                     legendgroup=kind, showlegend=False, line={"color": color}), row=1, col=2)
        fig.update_yaxes(type="log", title_text="||dw|| / ||w||")
        fig.update_xaxes(title_text="block (-1 = embeddings)", row=1, col=1)
        fig.update_xaxes(title_text="AdamW step", row=1, col=2)
        fig.update_layout(title=f"Relative update ||dw||/||w|| over {e.steps} AdamW steps, lr = {e.lr:g}",
                          template="plotly_white", legend={"orientation": "h", "y": -0.25},
                          margin={"t": 110})  # subplot titles clear of the mode bar
        figs.append(Figure("Relative update per step", fig,
                           "Dotted: lr / rms(w), Adam's first step (every entry moves by about lr); later steps "
                           "fall below it as Adam's moments average the gradient's sign out."))
    return figs


_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


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

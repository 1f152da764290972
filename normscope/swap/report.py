"""The ``swap-<target>`` page: held-out CE against the control, the per-site error table, curves and the tail."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import pandas as pd
import plotly.graph_objects as go

from normscope.removal import evaluate as ev
from normscope.report import Figure, Result
from normscope.swap.pipeline import LABELS, REFERENCES, SwapOptions, ce_table, mean_rel, meta_for

ROLES = (("pre_attn", "pre-attention (ln1)"), ("pre_mlp", "pre-MLP (ln2)"), ("qk_norm", "qk-norm"),
         ("final", "final norm"), ("other", "other"))


def build_result(lm: Any, train_sample: Any, eval_sample: Any, opts: SwapOptions, target: str, res: Any,
                 ctrl_hist: list[Any], scored: dict[str, ev.TokenLosses], errors: pd.DataFrame,
                 trained: dict[str, dict[str, float]], train_seconds: float) -> Result:
    label = LABELS[target]
    ce = ce_table(scored, label)
    sites = errors.copy()
    for key in ("alpha", "shift", "beta_norm", "alpha_mean"):
        if any(key in v for v in trained.values()):
            sites[f"{key}_trained"] = [trained.get(s, {}).get(key) for s in sites["site"]]
    hist = pd.DataFrame([{k: v for k, v in asdict(h).items() if k != "events"} for h in res.history])
    if ctrl_hist and len(hist):
        ch = pd.DataFrame([{"step": h.step, "control_ce": h.ce} for h in ctrl_hist])
        hist = hist.merge(ch, on="step", how="left")
    row = {r["model"]: r for r in ce.to_dict("records")}
    sw, o, c = row[label], row["original"], row.get("control")
    un = row[f"{label}, untrained"]
    tokens = sum(h.tokens for h in res.history)
    headlines: dict[str, Any] = {
        "to": target,
        "ce_original": round(o["mean"], 4),
        "ce_control": round(c["mean"], 4) if c else None,
        "ce_swapped": round(sw["mean"], 4),
        "ce_swapped_untrained": round(un["mean"], 4),
        "gap_vs_control": round(sw["gap_vs_control"], 4) if c else None,
        "gap_vs_original": round(sw["gap_vs_original"], 4),
        "median_site_error": _round(mean_rel(sites, "rel_error")),
        "median_site_error_naive": _round(mean_rel(sites, "rel_error_naive")),
        "sites_swapped": f"{res.removal.n_removed()} / {len(res.removal.wrappers)}",
        "steps": len(res.history),
        "tokens_trained": tokens,
        "skipped_steps": res.skipped,
        "diverged_at_step": res.diverged_at,
    }
    summary = _summary(lm, eval_sample, opts, label, ce, sites, res, tokens, train_seconds)
    payload = {"model": lm.info.spec, "to": target, "train_text": train_sample.to_dict(),
               "eval_text": eval_sample.to_dict(), "data_note": opts.data_note, "ce": ce.to_dict("records"),
               "sites": sites.to_dict("records"), "schedule": res.schedule.to_dict(),
               "history": [asdict(h) for h in res.history], "control_history": [asdict(h) for h in ctrl_hist],
               "resumed_from_step": res.resumed_from, "train_seconds": round(train_seconds, 1)}
    tables = {"ce": ce, "sites": sites, "history": hist}
    return Result(analysis=f"swap-{target}", title=f"Every norm swapped for {label}, then distilled",
                  meta=meta_for(lm, train_sample, eval_sample, opts), payload=payload, tables=tables,
                  figures=_figures(label, res, ctrl_hist, scored, sites), headlines=headlines, summary=summary,
                  references=REFERENCES, axes={"sites": "layer"})


def _round(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(x, digits)


def _summary(lm: Any, eval_sample: Any, opts: SwapOptions, label: str, ce: pd.DataFrame, sites: pd.DataFrame,
             res: Any, tokens: int, train_seconds: float) -> list[str]:
    row = {r["model"]: r for r in ce.to_dict("records")}
    sw, o, c, un = row[label], row["original"], row.get("control"), row[f"{label}, untrained"]
    data = opts.data_note or "the training text"
    line = (f"{len(res.history)} steps ({tokens:,} training tokens from {data}, {train_seconds:.0f} s) with "
            f"{res.removal.n_removed()} of {len(res.removal.wrappers)} norm sites swapped for {label}. Held-out CE "
            f"({eval_sample.source}, {o['n_tokens']:,} tokens): original {o['mean']:.4f}, swapped before training "
            f"{un['mean']:.4f}")
    if c is not None:
        line += f", fine-tuned control {c['mean']:.4f}"
    line += f", swapped and fine-tuned {sw['mean']:.4f}"
    line += (f" ({sw['gap_vs_control']:+.4f} nats vs the control)." if c is not None
             else f" ({sw['gap_vs_original']:+.4f} vs the original; add --control for the fine-tuning-only reference).")
    out = [line]
    fitted, naive = mean_rel(sites, "rel_error"), mean_rel(sites, "rel_error_naive")
    if naive is not None and fitted is not None:
        out.append(f"Per site, before training (each site alone, its input from the original model, held-out "
                   f"tokens at positions >= 1): the median relative error of the fitted {label} is {fitted:.3f}, "
                   f"against {naive:.3f} for the naive transplant (alpha = 0.5, gamma = the norm's weight).")
    elif fitted is not None:
        out.append(f"Per site, before training: the median relative error of {label} at its initialisation "
                   f"(beta = 0: RMSNorm with the norm's gain) is {fitted:.2e}; the swapped model starts as the "
                   "original wherever the sites are RMSNorms.")
    if "input_rms_pos0" in sites and sites["input_rms_pos0"].notna().any():
        ratio = sites["input_rms_pos0"] / sites["input_rms"]
        i = int(ratio.idxmax())
        r = sites.loc[i]
        out.append(f"Position 0: at {r['site']} its input RMS is {r['input_rms_pos0']:.3g} against "
                   f"{r['input_rms']:.3g} for other tokens ({ratio[i]:.0f}x, the massive activation of Sun et al. "
                   "2024). A bounded "
                   f"function saturates there (tanh(alpha x) = +-1 in the massive dims), which keeps it finite but "
                   f"not equal to the norm: the relative error at position 0 is {r['rel_error_pos0']:.3f} at that "
                   "site (the fit includes it; --exact-bos keeps the norm there).")
    if res.diverged_at is not None:
        out.append(f"Training diverged: from step {res.diverged_at} every step overflowed; lower --lr or use "
                   "--ramp-steps.")
    elif res.skipped:
        out.append(f"{res.skipped} of {len(res.history)} steps were skipped (non-finite loss or gradient).")
    out.append("No published result converts a pretrained LLM to DyT, Derf or SeeDNorm (each paper trains from "
               "scratch); the weights stay in the run's checkpoints, since transformers has no such norm to export to.")
    return out


def _figures(label: str, res: Any, ctrl_hist: list[Any], scored: dict[str, ev.TokenLosses],
             sites: pd.DataFrame) -> list[Figure]:
    figs: list[Figure] = []
    h = res.history
    fig = go.Figure()
    steps = [x.step for x in h]
    fig.add_trace(go.Scatter(x=steps, y=[x.ce for x in h], name=f"{label}: CE", mode="lines+markers"))
    if any(x.kl for x in h):
        fig.add_trace(go.Scatter(x=steps, y=[x.kl for x in h], name=f"{label}: KL to original",
                                 mode="lines+markers"))
    if ctrl_hist:
        fig.add_trace(go.Scatter(x=[x.step for x in ctrl_hist], y=[x.ce for x in ctrl_hist], name="control: CE",
                                 mode="lines+markers", line={"dash": "dot"}))
    fig.update_layout(title="Training curves", xaxis_title="step", yaxis_title="nats per token",
                      template="plotly_white", legend={"orientation": "h", "y": -0.2})
    figs.append(Figure("Training curves", fig, f"How fast the {label} model's CE and KL come down towards the "
                                                "control's CE (dotted)."))
    n_blocks = int(sites["layer"].dropna().max()) + 1 if sites["layer"].notna().any() else 0
    fig = go.Figure()
    _role_traces(fig, sites, n_blocks, lambda d: d["rel_error"],
                 (lambda d: d["rel_error_naive"]) if "rel_error_naive" in sites else None, "naive", "x")
    log = bool(sites["rel_error"].gt(0).all())
    fig.update_layout(title="Relative error of each swapped site before training (positions >= 1)",
                      xaxis_title="layer (final norm after the last block)", yaxis_title="relative error",
                      yaxis_type="log" if log else "linear", template="plotly_white")
    figs.append(Figure("Per-site error before training", fig,
                       "Each site alone against the norm on held-out tokens; crosses are the naive transplant "
                       "(alpha 0.5, gamma = the norm's weight)."))
    if "alpha" in sites:
        fig = go.Figure()
        _role_traces(fig, sites, n_blocks, lambda d: d["alpha"] * d["input_rms"],
                     (lambda d: d["alpha_trained"] * d["input_rms"]) if "alpha_trained" in sites else None,
                     "after training", "diamond-open")
        fig.update_layout(title="alpha x typical input RMS per site", xaxis_title="layer",
                          yaxis_title="alpha * RMS (below 1: tanh nearly linear for ordinary tokens)",
                          yaxis_type="log", template="plotly_white")
        figs.append(Figure("Fitted alpha", fig, "alpha in units of the site's input scale: how far into "
                                                 "saturation an ordinary token sits."))
    fig = go.Figure()
    for name, tl in scored.items():
        x, y = ev.tail_curve(tl.losses)
        fig.add_trace(go.Scatter(x=x, y=y, name=name, mode="lines"))
    fig.update_layout(title="Per-token loss tail on held-out text", xaxis_title="per-token loss (nats)",
                      yaxis_title="share of tokens with at least this loss", yaxis_type="log",
                      template="plotly_white")
    figs.append(Figure("Per-token loss tail", fig, "Curves that separate only at the right edge mean a few rare "
                                                    "tokens got much worse."))
    return figs


def _role_traces(fig: go.Figure, sites: pd.DataFrame, n_blocks: int, fitted: Callable[[pd.DataFrame], Any],
                 other: Callable[[pd.DataFrame], Any] | None, other_name: str, symbol: str) -> None:
    """One line per norm role (the fitted value per layer; the final norm after the last block) and, when
    ``other`` is given, its markers beside it (the naive transplant, or the value after training)."""
    for role, rlabel in ROLES:
        d = sites[sites.role == role]
        if not len(d):
            continue
        xs = [n_blocks if pd.isna(x) else x for x in d["layer"]]
        fig.add_trace(go.Scatter(x=xs, y=fitted(d), mode="lines+markers", name=f"{rlabel}: fitted",
                                 text=list(d.site), hovertemplate="%{text}: %{y:.3g}<extra></extra>"))
        if other is not None:
            fig.add_trace(go.Scatter(x=xs, y=other(d), mode="markers", name=f"{rlabel}: {other_name}",
                                     marker={"symbol": symbol}, text=list(d.site),
                                     hovertemplate=f"%{{text}} ({other_name}): %{{y:.3g}}<extra></extra>"))

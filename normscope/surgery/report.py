"""Figures and interpretation of ``normscope rewrite`` (the only module of the rewrite that imports plotly).
Reference: Jiang et al. 2023, Pre-RMSNorm and Pre-CRMSNorm Transformers (arXiv:2305.14858)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import plotly.graph_objects as go

from normscope.report import Figure

if TYPE_CHECKING:
    from normscope.report import Result
    from normscope.surgery.rewrite import RewritePlan
    from normscope.surgery.verify import Verification

LABELS = {
    "passed": "logits match (within tolerance)",
    "max_rel_logit_diff": "max relative logit difference",
    "mean_rel_logit_diff": "mean relative logit difference",
    "max_abs_log_softmax_diff": "max |log-softmax difference|",
    "ce_original": "CE, original",
    "ce_rewritten": "CE, rewritten",
    "max_resid_mean_ratio": "max |mean|/rms at a norm input, rewritten",
    "original_max_resid_mean_ratio": "max |mean|/rms at a norm input, original",
    "norms_swapped": "LayerNorms replaced",
    "writers_centred": "writers centred",
    "crms_max_rel_logit_diff": "max relative logit difference, CRMSNorm",
    "ce_crms": "CE, CRMSNorm",
    "export": "exported to",
    "residual_mean": "residual |mean|/rms at each norm input",
    "logits_by_position": "relative logit difference by position",
    "point_index": "norm input (forward order)",
}
FLOOR = 1e-12  # exact zeros drawn here on the log axes


def _floor(values: Any) -> list[float]:
    return [max(float(v), FLOOR) if v == v else float("nan") for v in values]


def _n(k: int, word: str) -> str:
    return f"{k} {word}{'' if k == 1 else 's'}"


def _parallel(blocks: list[int]) -> str:
    if not blocks:
        return ""
    which = f"block {blocks[0]} runs" if len(blocks) == 1 else f"blocks {', '.join(map(str, blocks))} run"
    return f"; {which} attention and MLP in parallel on one input"


def figures(result: Result, ver: Verification) -> list[Figure]:
    """Residual mean ratio at each norm input (both models), and the logit difference by position."""
    r = result.tables["residual_mean"]
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=r["site"], y=_floor(r["original_mean"]), mode="lines+markers", name="original, mean"))
    fig.add_trace(go.Scatter(x=r["site"], y=_floor(r["original_max"]), mode="lines", name="original, max",
                             line={"dash": "dot"}))
    fig.add_trace(go.Scatter(x=r["site"], y=_floor(r["rewritten_mean"]), mode="lines+markers",
                             name="rewritten, mean"))
    fig.add_trace(go.Scatter(x=r["site"], y=_floor(r["rewritten_max"]), mode="lines", name="rewritten, max",
                             line={"dash": "dot"}))
    fig.update_layout(title="Residual stream |mean| / rms per token at every norm input",
                      xaxis_title="norm input (forward order)", yaxis_title="|mean_d h| / rms(h) (log)",
                      yaxis_type="log", yaxis_exponentformat="power", template="plotly_white")
    figs = [Figure("Residual mean at every norm input", fig,
                   "The rewritten curves should sit at float32 rounding (about 1e-7), orders of magnitude under the "
                   "original: there LN and RMSNorm agree exactly.")]
    p = result.tables["logits_by_position"]
    tol = float(result.payload["tolerance"])
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=p["position"], y=_floor(p["max_rel"]), mode="lines+markers", name="max"))
    fig.add_trace(go.Scatter(x=p["position"], y=_floor(p["mean_rel"]), mode="lines+markers", name="mean"))
    if "crms_max_rel" in p:
        fig.add_trace(go.Scatter(x=p["position"], y=_floor(p["crms_max_rel"]), mode="lines", name="CRMSNorm, max",
                                 line={"dash": "dot"}))
    fig.add_hline(y=tol, line={"color": "firebrick", "dash": "dash"}, annotation_text=f"tolerance {tol:g}")
    fig.update_layout(title="Relative logit difference ||z' - z|| / ||z|| by position",
                      xaxis_title="position", yaxis_title="relative difference (log)", yaxis_type="log",
                      yaxis_exponentformat="power", template="plotly_white")
    figs.append(Figure("Logit difference by position", fig,
                       "Every point should lie far below the dashed tolerance line; a rising curve would mean error "
                       "accumulating along the sequence."))
    return figs


def summary(result: Result, ver: Verification, plan: RewritePlan) -> list[str]:
    """The interpretation paragraphs: what changed, what the check found, the logit offset, the export."""
    h, pl = result.headlines, result.payload
    target = "CRMSNorm" if pl["to"] == "crmsnorm" else "RMSNorm"
    eps = sorted({n.eps for n in plan.norms})
    n_readers = sum(len(n.readers) for n in plan.norms)
    verdict = "PASSED" if h["passed"] else "FAILED: nothing was exported"
    lines = [
        f"{pl['model']}: {h['norms_swapped']} LayerNorms folded into the {n_readers} linears that read them and "
        f"replaced by {target} with the same eps ({', '.join(f'{e:g}' for e in eps)}); {h['writers_centred']} "
        f"writers of the residual stream centred ({_n(len(plan.embeddings), 'embedding')}, {len(plan.writers)} "
        f"attention and MLP output projections){'; the tied unembedding was untied first' if pl['untied'] else ''}"
        f"{_parallel(plan.parallel_blocks)}. "
        f"On {pl['tokens_checked']:,} tokens the logits differ by at most {h['max_rel_logit_diff']:.2e} relative "
        f"(mean {h['mean_rel_logit_diff']:.2e}; tolerance {pl['tolerance']:g}): {verdict}. Next-token CE "
        f"{h['ce_original']:.6f} original, {h['ce_rewritten']:.6f} rewritten.",
    ]
    factor = math.sqrt(max(1.0 - h["original_max_resid_mean_ratio"] ** 2, 0.0))
    lines.append(
        f"Residual mean: at every norm input the rewritten stream's |mean|/rms is at most "
        f"{h['max_resid_mean_ratio']:.1e} (float32 rounding), against up to {h['original_max_resid_mean_ratio']:.3g} "
        f"in the original, where an RMSNorm would divide by up to {1 / factor if factor else math.inf:.4g}x the "
        "LayerNorm's divisor (std = rms x sqrt(1 - r^2)). Centring the writers is what makes LN = RMSNorm hold.")
    lines.append(
        "The final LayerNorm's bias b folds into an unembedding bias W_U b (max |offset| "
        f"{pl['logit_offset_max']:.4g}, "
        f"spread {pl['logit_offset_spread']:.4g} over the vocabulary). It is the same at every position but not "
        "for every token, so it changes the softmax unless its spread is 0: it is kept as a bias, and the check "
        "compares raw logits (the log-softmax difference is reported too).")
    if pl["to"] == "crmsnorm" and ver.compressed is not None:
        lines.append(f"CRMSNorm: the stream keeps {plan.d_model - 1} of {plan.d_model} coordinates; its logits differ "
                     f"by at most {ver.compressed.max_rel:.2e} relative, CE {ver.ce_compressed:.6f}. The logit and "
                     "residual figures above are of the Pre-RMSNorm stage it is compressed from (a compressed "
                     "stream is zero-mean by construction), the CRMSNorm curve of its logits is drawn with them.")
    lines.append(f"Export: {pl['export_kind']} in {h['export']}. {pl['plain_transformers']}" if h.get("export")
                 else f"Export: none (give --export DIR). {pl['plain_transformers']}")
    return lines

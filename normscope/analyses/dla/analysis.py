"""``normscope dla``: direct logit attribution with the cached final-norm scale against the true direct effect,
and the confidence (entropy) neurons of the last MLP. This module runs the passes and assembles the Result.

For a component c (one attention head, one MLP layer) that writes ``c`` into the residual stream, with the final
residual ``r``, target token ``t``, the final norm's gain ``g`` and divisor ``s(x)`` (RMS, or std after centring
for LayerNorm), and the unembedding row ``W_U[t]``:

* DLA_c = (c / s(r)) . (g * W_U[t])   - the component's share of the logit with the norm's scale frozen at its
  cached value (TransformerLens' ``apply_ln_to_stack`` + ``logit_attrs``; c is centred first for LayerNorm);
* DE_c  = logit_t(r) - logit_t(r - c) - the true direct effect: the logit when the component's output is removed
  from the final residual and the final norm is recomputed on what is left (no other component changes).

Both come from the final residual and the component outputs of ONE forward pass, vectorised over components
(:func:`.metrics.dla_and_de`), through TransformerLens' bridge (:mod:`.bridge`) or normscope's own hooks
(:mod:`.direct`). The normalised mean absolute error NMAE = mean|DLA - DE| / mean|DE| x 100 says how far the
frozen-scale reading is from the truth: ~150% for the heads of GPT-2 small's last layers, ~0 for a model whose
final norm is a fixed scale (Heimersheim 2024, "You can remove GPT2's LayerNorm by fine-tuning"; Baroni et al.
2025, "Transformers Don't Need LayerNorm at Inference Time", code ``submarat/removing-layer-norm``).

Confidence (entropy) neurons (Stolfo et al. 2024, "Confidence Regulation Neurons in Language Models"; Gurnee et
al. 2024, "Universal Neurons in GPT2 Language Models"): last-layer MLP neurons with a large output weight that
writes almost nothing onto the unembedding, ranked by ||W_out|| / var_vocab cos(W_out, W_U); they act on the
output entropy through the final norm's scale. Each of the top ones is mean-ablated and |delta CE| and
|delta entropy| are measured on the text; a candidate that moves the loss about as much as the entropy is
flagged as failing the definition (:func:`.metrics.entropy_neuron_verdict`).

Logits here are raw (the unembedding is not centred over the vocabulary), so DLA and DE are in the units of the
target token's logit.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F

from normscope.analyses.base import RunContext
from normscope.analyses.dla.bridge import auto_skips_bridge, boot_bridge, run_bridge
from normscope.analyses.dla.direct import run_direct
from normscope.analyses.dla.metrics import (
    entropy,
    entropy_neuron_scores,
    entropy_neuron_verdict,
    final_logits,
    next_token_targets,
)
from normscope.analyses.dla.options import REFERENCES, DlaOptions
from normscope.analyses.dla.plan import Plan, input_hooks, plan_model, projection_matrix
from normscope.analyses.dla.reducers import AttributionStats, Stash, Totals
from normscope.analyses.dla.report import figures, summary
from normscope.core.capture import BatchContext, Capture
from normscope.core.errors import NormscopeError
from normscope.core.models import available_memory_bytes
from normscope.core.nonfinite import flag_nonfinite
from normscope.core.placement import is_placed, resident
from normscope.core.progress import progress_task as _task
from normscope.report import Result
from normscope.report.result import build_meta

AXES = {"layers": "layer"}  # each per-depth table: its depth column
LABELS = {
    "layers": "per layer", "nmae_heads": "NMAE of the heads (%)", "nmae_mlp": "NMAE of the MLP (%)",
    "nmae_all": "NMAE of all components (%)", "nonfinite_points": "hook points with inf/NaN",
}


def run(ctx: RunContext, opts: DlaOptions) -> Result:
    """DLA against the direct effect for every head and MLP layer, and the entropy neurons of the last MLP.

    ``ctx`` carries the loaded model, its layout and norm sites (probed once) and the text sample; ``ctx.progress``
    is the CLI's progress bar or None (silent).
    """
    lm, sample, progress = ctx.lm, ctx.sample, ctx.progress
    plan = plan_model(lm, ctx.layout, ctx.sites)
    n_layers, n_heads = plan.layout.n_layers, plan.n_heads
    timings: dict[str, float] = {}
    notes: list[str] = []

    neuron_rows: list[dict[str, Any]] = []
    top: list[int] = []
    if opts.neurons and plan.mlp_out is not None:
        t0 = time.perf_counter()
        w_out = projection_matrix(plan.mlp_out).T.float().cpu()  # [d, n_neurons]
        norm, var = entropy_neuron_scores(w_out, plan.w_u.float().cpu(), plan.gain.cpu(), plan.final.centered)
        score = norm / var.clamp_min(1e-30)
        top = torch.argsort(score, descending=True)[: opts.neurons].tolist()
        neuron_rows = [{"rank": i + 1, "neuron": n, "label": f"L{n_layers - 1}N{n}", "w_out_norm": float(norm[n]),
                        "var_cos_vocab": float(var[n]), "score": float(score[n])} for i, n in enumerate(top)]
        timings["entropy-neuron ranking"] = time.perf_counter() - t0
    elif opts.neurons:
        notes.append("The last MLP has no separable output projection, so entropy neurons were not measured.")

    n_pred = sum(int(next_token_targets(b.input_ids, b.attention_mask)[0].sum()) for b in sample.iter_batches())
    stats = AttributionStats(n_layers * (n_heads + 1), opts.scatter_points, n_pred, sample.seed)
    totals = Totals(len(top))
    bridge = None
    if opts.backend in ("auto", "bridge") and is_placed(lm.model):  # the bridge wraps a deep copy of the model
        if opts.backend == "bridge":
            raise NormscopeError("TransformerLens' bridge wraps its own copy of the model, which a model spread with "
                                 "--device-map cannot give; rerun with --backend direct.")
        notes.append("The model is spread with --device-map, so the numbers come from normscope's own hooks (the "
                     "TransformerLens bridge needs its own copy of the model).")
    elif opts.backend == "auto" and (why := auto_skips_bridge(lm.model, available_memory_bytes(lm.info.device))):
        notes.append(f"The numbers come from normscope's own hooks: {why}.")
    elif opts.backend in ("auto", "bridge"):
        t0 = time.perf_counter()
        try:
            bridge = boot_bridge(lm)
        except Exception as exc:  # an architecture the bridge does not support, or TransformerLens missing
            if opts.backend == "bridge":
                raise NormscopeError(f"TransformerLens' TransformerBridge cannot wrap {lm.info.name} "
                                     f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); rerun with "
                                     "--backend direct.") from exc
            notes.append(f"TransformerLens' TransformerBridge does not support this model ({type(exc).__name__}); "
                         "the numbers come from normscope's own hooks.")
        timings["booting the TransformerLens bridge"] = time.perf_counter() - t0
    cross: dict[str, float] = {}
    passes = 1 + (1 if top else 0)
    nonfinite: dict[str, dict[str, Any]] = {}  # inf/NaN in the bridge's cache, by TransformerLens hook name
    with _task(progress, "dla", sample.n_tokens * passes) as advance:
        t0 = time.perf_counter()
        accepted = False
        if bridge is not None:
            cross, accepted = run_bridge(bridge, lm, plan, sample, stats, totals, top, opts, advance, nonfinite)
            del bridge
            if accepted:
                timings["attributions (TransformerLens bridge)"] = time.perf_counter() - t0
                if cross and not cross["agrees"]:
                    notes.append(f"Warning: TransformerLens' bridge disagrees with the model (largest logit difference "
                                 f"{cross['max_abs_logit_diff']:.3g}); --backend direct gives the model's numbers.")
                if top and not totals.act_n:  # the bridge exposed no MLP hidden activations: one more pass
                    run_direct(lm, plan, sample, None, totals, top, None)
            else:
                notes.append(
                    f"TransformerLens' bridge disagreed with the model on the first batch (largest logit difference "
                    f"{cross['max_abs_logit_diff']:.3g}, largest DLA difference {cross['max_abs_dla_diff']:.3g}; "
                    "it reads norm eps values from the config, not from the modules), so the numbers come from "
                    "normscope's own hooks.")
        if not accepted:
            t0 = time.perf_counter()
            nonfinite = {r["point"]: r for r in run_direct(lm, plan, sample, stats, totals, top, advance)}
            timings["attributions (normscope hooks)"] = time.perf_counter() - t0
        if top:
            t0 = time.perf_counter()
            means = totals.act_sum / max(totals.act_n, 1)
            abl = ablate_neurons(lm, plan, sample, top, means.float(), advance)
            for row, m, res in zip(neuron_rows, means.tolist(), abl, strict=True):
                row["mean_activation"] = m
                row.update(res)
                ratio, fails = entropy_neuron_verdict(res["mean_abs_delta_ce"], res["mean_abs_delta_entropy"])
                row["ce_to_entropy_ratio"] = ratio
                row["fails_definition"] = fails  # moves the loss about as much as the entropy: not an entropy neuron
            timings["entropy-neuron ablations"] = time.perf_counter() - t0
    backend = "bridge" if "attributions (TransformerLens bridge)" in timings else "direct"
    result = _build_result(lm, sample, opts, plan, stats, backend, cross, neuron_rows, totals, notes, timings)
    flag_nonfinite(result, list(nonfinite.values()))
    return result


def ablate_neurons(lm: Any, plan: Plan, sample: Any, neurons: list[int], means: torch.Tensor,
                    advance: Any) -> list[dict[str, float]]:
    """Mean-ablate each neuron of the last MLP in turn; |delta CE| and |delta entropy| per predicted token.

    Replacing neuron n's activation a by its mean m changes only the final residual, by (m - a) W_out[:, n], so
    the ablated logits are unembed(final_norm(r + (m - a) W_out[:, n])): exact, and one forward pass in total.
    Both logits come from :func:`.metrics.final_logits` in float32: in a bfloat16 model the change would
    otherwise be smaller than the rounding of the logits themselves.
    """
    assert plan.mlp_out is not None
    w_out = projection_matrix(plan.mlp_out).float()  # [n_neurons, d]
    cap = Capture(lm.model, plan.layout, plan.sites)
    resid = cap.add(f"{plan.final.name}.hook_in", Stash())
    store: dict[int, torch.Tensor] = {}
    d_ce: list[list[torch.Tensor]] = [[] for _ in neurons]
    d_h: list[list[torch.Tensor]] = [[] for _ in neurons]
    d_ce_signed = torch.zeros(len(neurons), dtype=torch.float64)
    final = plan.final
    logits_of = functools.partial(final_logits, gain=plan.gain, w_u=plan.w_u, centered=final.centered, eps=final.eps,
                                  bias=resident(final.module, "bias"), u_bias=resident(plan.layout.unembed, "bias"))
    with cap, input_hooks([plan.mlp_out], store):
        def on_out(out: Any, ctx: BatchContext) -> None:
            sel, tgt = next_token_targets(ctx.input_ids, ctx.attention_mask)
            r = resid.x[sel.to(resid.x.device)].float()  # [N, d]; float32, whatever the model's dtype
            acts = store[0].to(r.device)[sel.to(r.device)][:, neurons].float()  # [N, n_top]
            tgt = tgt.to(r.device)
            with torch.no_grad():
                base = logits_of(r)  # [N, vocab] float32
                ce0 = F.cross_entropy(base, tgt, reduction="none")
                h0 = entropy(base)
                for j, n in enumerate(neurons):
                    delta = (means[j].to(r.device) - acts[:, j])[:, None] * w_out[n].to(r.device)[None]
                    logits = logits_of(r + delta)
                    dce = F.cross_entropy(logits, tgt, reduction="none") - ce0
                    d_ce[j].append(dce.abs().cpu())
                    d_ce_signed[j] += float(dce.double().sum())
                    d_h[j].append((entropy(logits) - h0).abs().cpu())

        cap.run(sample.iter_batches(), on_output=on_out, progress=advance)
    out = []
    for j in range(len(neurons)):
        ce_abs, h_abs = torch.cat(d_ce[j]), torch.cat(d_h[j])
        out.append({"mean_abs_delta_ce": float(ce_abs.double().mean()),
                    "mean_delta_ce": float(d_ce_signed[j]) / max(ce_abs.numel(), 1),
                    "mean_abs_delta_entropy": float(h_abs.double().mean()),
                    "median_abs_delta_entropy": float(h_abs.median())})
    return out


# ---- result --------------------------------------------------------------------------------------------
def _component_frame(stats: AttributionStats, n_layers: int, n_heads: int) -> pd.DataFrame:
    t = stats.table()
    rows = []
    for i in range(n_layers):
        for h in range(n_heads + 1):
            c = i * (n_heads + 1) + h
            is_mlp = h == n_heads
            row = {"component": f"L{i}MLP" if is_mlp else f"L{i}H{h}", "layer": i, "head": None if is_mlp else h,
                   "type": "mlp" if is_mlp else "head"}
            row.update({k: float(v[c]) for k, v in t.items()})
            rows.append(row)
    return pd.DataFrame(rows)


def _layer_frame(stats: AttributionStats, n_layers: int, n_heads: int) -> pd.DataFrame:
    s = stats.sums.sum(1)  # [stat, component]
    rows = []
    for i in range(n_layers):
        base = i * (n_heads + 1)
        heads, mlp = slice(base, base + n_heads), base + n_heads
        err_h, de_h = float(s[4, heads].sum()), float(s[3, heads].sum())
        err_m, de_m = float(s[4, mlp]), float(s[3, mlp])
        rows.append({"layer": i, "nmae_heads": 100 * err_h / de_h if de_h else math.nan,
                     "nmae_mlp": 100 * err_m / de_m if de_m else math.nan,
                     "nmae_all": 100 * (err_h + err_m) / (de_h + de_m) if de_h + de_m else math.nan})
    return pd.DataFrame(rows)


def _overall(stats: AttributionStats, sl: slice | list[int] | None = None) -> float:
    s = stats.sums.sum(1)
    idx = slice(None) if sl is None else sl
    den = float(s[3, idx].sum())
    return 100 * float(s[4, idx].sum()) / den if den else math.nan


def entropy_headlines(neurons: pd.DataFrame) -> dict[str, Any]:
    """The entropy-neuron headlines: the candidate that moves the entropy most among those that meet the
    definition (``fails_definition`` False), and its median |delta entropy|; "none of N candidates" when every
    one fails; nothing when no candidate was ablated."""
    if not len(neurons) or "median_abs_delta_entropy" not in neurons:
        return {}
    passing = neurons[~neurons["fails_definition"].astype(bool)]
    if not len(passing):
        return {"top entropy neuron": f"none of {len(neurons)} candidates"}
    top = passing.sort_values("mean_abs_delta_entropy", ascending=False).iloc[0]
    return {"top entropy neuron": top["label"],
            "its median |d entropy|": round(float(top["median_abs_delta_entropy"]), 4)}


def _build_result(lm: Any, sample: Any, opts: DlaOptions, plan: Plan, main: AttributionStats, backend: str,
                  cross: dict[str, float], neuron_rows: list[dict[str, Any]], totals: Totals, notes: list[str],
                  timings: dict[str, float]) -> Result:
    info = lm.info
    n_layers, n_heads = plan.layout.n_layers, plan.n_heads
    comps = _component_frame(main, n_layers, n_heads)
    layers = _layer_frame(main, n_layers, n_heads)
    head_idx = [i * (n_heads + 1) + h for i in range(n_layers) for h in range(n_heads)]
    mlp_idx = [i * (n_heads + 1) + n_heads for i in range(n_layers)]
    overall = {"all": _overall(main), "heads": _overall(main, head_idx), "mlp": _overall(main, mlp_idx)}
    first, rest = main.sums[:, 0].sum(1), main.sums[:, 1].sum(1)
    overall["position_0"] = 100 * float(first[4] / first[3]) if float(first[3]) else math.nan
    overall["other_positions"] = 100 * float(rest[4] / rest[3]) if float(rest[3]) else math.nan
    worst = comps.sort_values("mean_abs_err", ascending=False).head(opts.top_components).reset_index(drop=True)
    neurons = pd.DataFrame(neuron_rows)
    if "fails_definition" in neurons:  # the verdict next to the neuron's name, where the table's reader looks
        lead = ["rank", "neuron", "label", "fails_definition", "ce_to_entropy_ratio"]
        neurons = neurons[lead + [c for c in neurons.columns if c not in lead]]
    mean_ce = totals.ce / max(totals.n, 1)
    mean_ent = totals.ent / max(totals.n, 1)

    headlines: dict[str, Any] = {
        "NMAE, all components (%)": round(overall["all"], 3),
        "NMAE, heads (%)": round(overall["heads"], 3),
        "NMAE, MLPs (%)": round(overall["mlp"], 3),
        "most misleading component": worst.iloc[0]["component"] if len(worst) else None,
        "backend": "TL bridge" if backend == "bridge" else "own hooks",
        "CE (nats/token)": round(mean_ce, 4),
    }
    if cross:
        headlines["bridge vs own max |dDLA|"] = float(f"{cross['max_abs_dla_diff']:.3g}")
    headlines.update(entropy_headlines(neurons))

    scatter = torch.cat(main.samples) if main.samples else torch.zeros(0, 4, dtype=torch.float64)
    labels = comps["component"].tolist()
    payload: dict[str, Any] = {
        "model": info.spec,
        "backend": backend,
        "n_predictions": int(main.count.sum()),
        "nmae": overall,
        "crosscheck": cross or None,
        "ce": mean_ce,
        "entropy": mean_ent,
        "layers": layers.to_dict("records"),
        "components": comps.to_dict("records"),
        "entropy_neurons": neuron_rows,
        "notes": notes,
        "final_norm": plan.final.to_dict(),
    }
    text = summary(overall, layers, worst, neurons, backend, cross, notes, int(main.count.sum()), mean_ce)
    figs = figures(comps, layers, scatter, labels, n_layers, n_heads, neurons)
    tables = {"layers": layers, "components": comps, "most_misleading": worst}
    if len(neurons):
        tables["entropy_neurons"] = neurons
    return Result(
        analysis="dla",
        title="Direct logit attribution against the direct effect",
        meta=build_meta(lm, sample, **dict(opts.__dict__)),
        payload=payload,
        tables=tables,
        axes=AXES,
        labels=LABELS,
        figures=figs,
        headlines=headlines,
        summary=text,
        references=REFERENCES,
        timings=timings,
    )

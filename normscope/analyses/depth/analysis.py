"""The curse of depth: variance growth, layer effectiveness and a LayerNorm Scaling what-if, per layer.

Metrics and where they come from:

* growth of the residual stream's norm and variance with depth, and of each norm's divisor and output
  variance: Sun et al. 2025, "The Curse of Depth in Large Language Models" (arXiv:2502.05795), code
  ``lmsdss/LayerNorm-Scaling``; position 0 is reported apart because of its massive activation (Sun, Chen,
  Kolter, Liu 2024, arXiv:2402.17762);
* the relative update ||h_{l+1} - h_l|| / ||h_l|| of each block, split into its attention and MLP parts
  (the near-identity deep blocks of the Curse of Depth);
* angular distance arccos(cos(h_l, h_{l+n})) / pi on the last token, the n-layer window that is cheapest to
  drop and the loss once it is dropped: Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper
  Layers" (arXiv:2403.17887);
* the loss change when one block is skipped (identity), per block (layer effectiveness), measured by default
  on ``--skip-tokens`` (512) tokens of whole sequences spread over the sample, against the baseline loss of the
  same sequences, with a standard error over those sequences;
* LayerNorm Scaling (Sun et al. 2025): each pre-norm output multiplied by 1/sqrt(l), l = layer index + 1,
  applied here at inference to a model that was NOT trained that way.

Cost: every statistic of a configuration (norms, variances, divisors, relative updates, angular distances,
loss) comes from ONE forward pass per batch. Skipping blocks costs one more forward pass per skipped block
over the skip subset (by default 512 tokens: a quarter of a pass over 2,048), the LayerNorm Scaling what-if
one more full pass, the dropped window one more.

The modules: ``metrics.py`` (pure functions), ``reducers.py`` (hooks that fold per batch), ``interventions.py``
(hooks that change the pass), this module (the passes and the Result), ``summary.py`` (labels and sentences)
and ``report.py`` (figures).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import pandas as pd
import torch

from normscope.analyses.base import RunContext
from normscope.analyses.depth.interventions import (
    PRE_NORM_ROLES,
    lns_interventions,
    residual_scale_interventions,
    skip_interventions,
)
from normscope.analyses.depth.metrics import best_windows, fit_growth, paired_loss_delta, spread_subset
from normscope.analyses.depth.options import REFERENCES, DepthOptions, residual_scale_factors
from normscope.analyses.depth.reducers import PassStats, end_of_batch, register_stats
from normscope.analyses.depth.report import AXES, LABELS, figures, residual_scale_figure, summary, terminal_table
from normscope.core.capture import Capture
from normscope.core.errors import NormscopeError
from normscope.core.layers import parse_layers
from normscope.core.losses import SequenceLossMeter
from normscope.core.nonfinite import flag_nonfinite, nonfinite_warning
from normscope.core.progress import note
from normscope.core.progress import progress_task as _task
from normscope.core.prompts import CONTROL_CATEGORIES
from normscope.core.text import TokenBatch
from normscope.core.tokens import token_text
from normscope.report import Result
from normscope.report.result import build_meta

__all__ = ["AXES", "LABELS", "run", "terminal_table"]


# ---- running -------------------------------------------------------------------------------------------
def _stats_pass(model: Any, layout: Any, sites: list[Any], batches: list[TokenBatch], label: str, causal: bool,
                progress: Any, task: str, lns: bool = False, branch_scale: list[float] | None = None) -> PassStats:
    cap = Capture(model, layout, sites)
    stats = register_stats(cap, layout, sites, label, causal)
    if lns:
        stats.extra["scaled_sites"] = lns_interventions(cap, sites)
    if branch_scale is not None:
        stats.extra["scaled_branches"] = residual_scale_interventions(cap, layout, branch_scale)
    n_tok = sum(int(b.attention_mask.sum()) for b in batches)
    t0 = time.perf_counter()
    with _task(progress, task, n_tok) as adv, cap:
        cap.run(batches, on_output=end_of_batch(stats), progress=adv)
    stats.seconds = time.perf_counter() - t0
    stats.extra["nonfinite"] = cap.nonfinite_report()
    return stats


def _loss_pass(model: Any, layout: Any, sites: list[Any], batches: list[TokenBatch], skip: list[int],
               advance: Callable[[float], None] | None = None) -> SequenceLossMeter:
    cap = Capture(model, layout, sites)
    skip_interventions(cap, skip)
    meter = SequenceLossMeter()
    with cap:
        cap.run(batches, on_output=meter, progress=advance)
    return meter


def skip_subset(batches: list[TokenBatch], n_tokens: int, batch_size: int) -> tuple[list[TokenBatch], list[int]]:
    """The sequences the skip-one-block losses are measured on: enough whole sequences for ``n_tokens`` tokens
    (0: all), spread evenly over the sample so that every kind of text keeps its share, rebatched in
    ``batch_size``. Returns the batches and the sequences' indices in the sample (batch order)."""
    rows = [(b, r) for b in batches for r in range(len(b))]
    per_seq = max(1, int(batches[0].attention_mask[0].sum())) if batches else 1
    take = len(rows) if n_tokens <= 0 else min(len(rows), max(1, math.ceil(n_tokens / per_seq)))
    keep = spread_subset(len(rows), take)
    if len(keep) == len(rows):
        return batches, keep
    out = []
    for s in range(0, len(keep), batch_size):
        chunk = [rows[i] for i in keep[s:s + batch_size]]
        out.append(TokenBatch(torch.stack([b.input_ids[r] for b, r in chunk]),  # [batch, seq_len]
                              torch.stack([b.attention_mask[r] for b, r in chunk]),
                              [b.categories[r] for b, r in chunk]))
    return out, keep


def run(ctx: RunContext, opts: DepthOptions) -> Result:
    """Variance growth, layer effectiveness and the LayerNorm Scaling what-if (see the module docstring).

    ``ctx`` carries the loaded model, its layout and norm sites (probed once) and the text sample; ``ctx.progress``
    is the CLI's progress bar or None (silent).
    """
    lm, sample, progress = ctx.lm, ctx.sample, ctx.progress
    model = lm.model
    layout = ctx.layout
    if not layout.blocks:
        raise NormscopeError(f"{type(model).__name__} has no transformer blocks normscope recognises.")
    sites = ctx.sites
    causal = bool(layout.is_causal and layout.unembed is not None)  # next-token loss needs logits
    n_blocks = layout.n_layers
    pre_norm = [s for s in sites if s.role in PRE_NORM_ROLES]

    if opts.skip and not causal:
        raise NormscopeError("--skip measures next-token loss, so it needs a causal LM; drop --skip for encoders.")
    if opts.window and not causal:
        raise NormscopeError("--window measures next-token loss, so it needs a causal LM; drop it for encoders.")
    if opts.lns and not pre_norm:
        raise NormscopeError("--lns scales pre-norm outputs, and this model has no pre-norm sites (post-LN); "
                             "drop --lns.")
    if opts.window is not None and not 0 <= opts.window <= n_blocks:
        raise NormscopeError(f"--window {opts.window} is outside 0-{n_blocks}, the number of blocks of this model.")
    chosen = parse_layers(opts.skip_layers, n_blocks, "--skip-layers")
    if chosen and opts.skip is None and not causal:
        raise NormscopeError("--skip-layers chooses blocks to skip, which measures next-token loss and needs a causal "
                             "LM; drop --skip-layers for encoders.")
    do_skip = (causal or bool(chosen)) if opts.skip is None else opts.skip
    if chosen == []:  # --skip-layers none: no skip passes
        do_skip = False
    do_lns = bool(pre_norm) if opts.lns is None else opts.lns
    window = (max(1, n_blocks // 4) if causal else 0) if opts.window is None else opts.window
    skip_layers = list(chosen) if chosen is not None else list(range(n_blocks))
    batches = list(sample.iter_batches())
    n_tok = sum(int(b.attention_mask.sum()) for b in batches)
    n_skip = len(skip_layers) if do_skip else 0
    skip_batches, skip_rows = skip_subset(batches, opts.skip_tokens, sample.batch_size) if n_skip else ([], [])
    n_skip_tok = sum(int(b.attention_mask.sum()) for b in skip_batches)
    factors = residual_scale_factors(opts.residual_scale, n_blocks)
    full = 1 + int(do_lns) + int(bool(window and causal)) + int(factors is not None)
    n_seq = sum(len(b) for b in batches)
    if n_skip and n_skip_tok < n_tok:
        skip_part = (f", skip-one-block {n_skip} over {n_skip_tok:,} of the tokens ({len(skip_rows)} of {n_seq} "
                     "sequences spread over the text; every token: --skip-tokens 0, fewer blocks: --skip-layers)")
    else:
        skip_part = f", skip-one-block {n_skip} (fewer: --skip-layers)" if n_skip else ""
    cost = full + n_skip * n_skip_tok / max(n_tok, 1)
    work = f", the work of {cost:.3g} over" if n_skip and n_skip_tok < n_tok else " over"
    note(progress, f"depth-curse: {full + n_skip} forward passes{work} {n_tok:,} tokens: statistics 1" + skip_part
         + (", LayerNorm Scaling 1" if do_lns else "") + (f", {window}-block window 1" if window and causal else "")
         + (", residual-branch scaling 1" if factors is not None else "")
         + ".")

    timings: dict[str, float] = {}
    base = _stats_pass(model, layout, sites, batches, "baseline", causal, progress, "depth statistics")
    timings["statistics pass (one forward per batch)"] = base.seconds
    lns = None
    if do_lns:
        lns = _stats_pass(model, layout, sites, batches, "LayerNorm Scaling", causal, progress,
                          "LayerNorm Scaling what-if", lns=True)
        timings["LayerNorm Scaling pass"] = lns.seconds
    scaled = None
    if factors is not None:
        scaled = _stats_pass(model, layout, sites, batches, "residual-branch scaling", causal, progress,
                             "residual-branch scaling what-if", branch_scale=factors)
        timings["residual-branch scaling pass"] = scaled.seconds

    skip_loss: dict[int, tuple[float, float, float]] = {}  # block -> (loss, loss change, its standard error)
    skip_scope: dict[str, Any] | None = None
    if do_skip:
        assert base.loss is not None
        b_sum = [base.loss.seq_sum[r] for r in skip_rows]  # the baseline of the same sequences, from the stats pass
        b_n = [base.loss.seq_n[r] for r in skip_rows]
        skip_scope = {"tokens": n_skip_tok, "sequences": len(skip_rows), "of_tokens": n_tok, "of_sequences": n_seq,
                      "sequence_indices": skip_rows, "baseline_loss": sum(b_sum) / max(sum(b_n), 1)}
        t0 = time.perf_counter()
        with _task(progress, f"skip-one-block ({len(skip_layers)} blocks x {n_skip_tok:,} tokens)",
                   len(skip_layers)) as adv:
            for i in skip_layers:
                m = _loss_pass(model, layout, sites, skip_batches, [layout.blocks[i].index])
                delta, se = paired_loss_delta(b_sum, m.seq_sum, m.seq_n)
                skip_loss[i] = (m.mean, delta, se)
                if adv is not None:
                    adv(1)
        timings[f"skip-one-block ({len(skip_layers)} forward passes over {n_skip_tok:,} tokens)"] = \
            time.perf_counter() - t0

    dist = base.angular.mean().numpy()
    windows = best_windows(dist)
    drop: dict[str, Any] | None = None
    if window and causal and (windows["n"] == window).any():
        row = windows.loc[windows["n"] == window].iloc[0]
        blocks = list(range(int(row["start"]), int(row["end"]) + 1))
        t0 = time.perf_counter()
        with _task(progress, f"drop {window} blocks", n_tok) as adv:
            loss = _loss_pass(model, layout, sites, batches, [layout.blocks[k].index for k in blocks], adv).mean
        timings[f"drop-window pass (n = {window})"] = time.perf_counter() - t0
        assert base.loss is not None
        drop = {"n": window, "start": int(row["start"]), "end": int(row["end"]), "distance": float(row["distance"]),
                "loss": loss, "delta_loss": loss - base.loss.mean}

    result = _build_result(lm, sample, opts, layout, sites, base, lns, skip_loss, skip_scope, windows, drop,
                           batches, n_tok, timings)
    if scaled is not None and factors is not None:
        _add_residual_scale(result, scaled, factors, opts.residual_scale)
    return result


def _add_residual_scale(result: Result, scaled: PassStats, factors: list[float], spec: str) -> None:
    """The residual-branch scaling what-if beside the model's own numbers: per-layer norm and variance, the
    growth fit, the loss change, a figure and a sentence with the caveat."""
    layers = result.tables["layers"]
    sl = pd.DataFrame(_layer_rows(scaled))
    for c in ("norm_rest", "norm_pos0", "var_rest"):
        layers[f"rs_{c}"] = sl[c]
    result.payload["layers"] = layers.to_dict("records")
    g = fit_growth(layers["point"], layers["rs_norm_rest"])
    growth = result.tables["growth"]
    growth.loc[len(growth)] = {"quantity": f"residual L2 norm, residual-branch scaling {spec}", **g.to_dict()}
    result.payload["growth"] = growth.to_dict("records")
    base_loss = result.payload.get("loss")
    loss = scaled.loss.mean if scaled.loss is not None else None
    delta = loss - base_loss if loss is not None and base_loss is not None else None
    if delta is not None:
        result.headlines["residual_scale_delta_loss"] = round(delta, 4)
        result.labels["residual_scale_delta_loss"] = f"residual scaling {spec}: loss change (nats/token)"
    result.payload["residual_scale"] = {
        "spec": spec, "factors": factors, "loss": loss, "scaled_branches": scaled.extra.get("scaled_branches", 0),
        "growth_exponent": g.exponent,
        "note": "applied at inference to a model that was not trained with scaled residual branches",
    }
    first, last = float(layers["rs_norm_rest"].iloc[0]), float(layers["rs_norm_rest"].iloc[-2])
    result.summary.append(
        f"Residual-branch scaling what-if ({spec}: attention and MLP outputs times "
        f"{factors[0]:.3g}{'' if len(set(factors)) == 1 else f' .. {factors[-1]:.3g}'}): the ordinary-token norm "
        f"goes from {first:.3g} to {last:.3g} before the last block, growth exponent {g.exponent:.2f} against "
        f"{result.payload['growth'][0]['exponent']:.2f}"
        + (f"; the loss changes by {delta:+.3f} nats/token" if delta is not None else "")
        + ". The model was not trained that way, so this says how far its depth growth comes from the branch "
          "sizes, not what a model trained with scaled branches would do.")
    result.figures.append(residual_scale_figure(layers, spec))
    bad = scaled.extra.get("nonfinite", [])
    result.payload["nonfinite_residual_scale"] = bad
    if bad:
        result.summary.append("Residual-branch scaling what-if: " + nonfinite_warning(
            bad, "the scaled model overflows there").replace("; rerun with --dtype float32.", "."))


# ---- result --------------------------------------------------------------------------------------------
def _layer_rows(stats: PassStats) -> list[dict[str, Any]]:
    rows = []
    mass = stats.massive
    for r in stats.residual:
        p = r.point
        rows.append({"point": p, "where": "embeddings" if p == 0 else f"after block {p - 1}",
                     "norm_rest": r.norm.mean("rest"), "norm_pos0": r.norm.mean("pos0"),
                     "norm_rest_std": math.sqrt(r.norm.var("rest")) if r.norm.n["rest"] else float("nan"),
                     "var_rest": r.var.mean("rest"), "var_pos0": r.var.mean("pos0"),
                     # massive activations (Sun, Chen, Kolter, Liu 2024): why var_rest can stay flat
                     "n_rest": int(r.norm.n["rest"]), "massive_pos0": int(mass.n_pos0[p]),
                     "massive_rest": int(mass.n_rest[p]), "max_abs_rest": float(mass.max_abs_rest[p]),
                     "max_abs_rest_dim": int(mass.max_dim_rest[p]), "norm_rest_typical": mass.typical_mean(p, "norm"),
                     "var_rest_typical": mass.typical_mean(p, "var")})
    return rows


def _massive_rows(stats: PassStats, tokenizer: Any) -> list[dict[str, Any]]:
    """The tokens at positions > 0 that carry a massive activation, largest first, named readably."""
    return [{"sequence": o.sequence, "position": o.position, "token": token_text(tokenizer, o.token_id),
             "token_id": o.token_id, "dim": o.dim, "max_abs": o.max_abs, "first_point": o.first_point,
             "last_point": o.last_point} for o in stats.massive.top_occurrences()]


def _block_rows(stats: PassStats) -> list[dict[str, Any]]:
    return [{"block": i, "rel_update": b.total.mean("rest"), "rel_update_attn": b.attn.mean("rest"),
             "rel_update_mlp": b.mlp.mean("rest"), "rel_update_pos0": b.total.mean("pos0"),
             "split": "parallel" if b.parallel else b.mode} for i, b in sorted(stats.blocks.items())]


def _site_rows(stats: PassStats) -> list[dict[str, Any]]:
    return [{"site": n, "layer": s.site.layer, "role": s.site.role, "kind": s.site.kind,
             "divisor_rest": s.divisor.mean("rest"), "divisor_pos0": s.divisor.mean("pos0"),
             "out_var_rest": s.out_var.mean("rest"), "out_var_pos0": s.out_var.mean("pos0")}
            for n, s in stats.sites.items()]


def _build_result(lm: Any, sample: Any, opts: DepthOptions, layout: Any, sites: list[Any], base: PassStats,
                  lns: PassStats | None, skip_loss: dict[int, tuple[float, float, float]],
                  skip_scope: dict[str, Any] | None, windows: pd.DataFrame,
                  drop: dict[str, Any] | None, batches: list[TokenBatch], n_tok: int,
                  timings: dict[str, float]) -> Result:
    info = lm.info
    n_blocks = layout.n_layers
    layers = pd.DataFrame(_layer_rows(base))
    blocks = pd.DataFrame(_block_rows(base))
    sites_df = pd.DataFrame(_site_rows(base))
    base_loss = base.loss.mean if base.loss is not None else None
    if skip_loss:
        for j, col in enumerate(("skip_loss", "skip_delta_loss", "skip_delta_loss_se")):
            blocks[col] = blocks["block"].map({i: v[j] for i, v in skip_loss.items()})
    if lns is not None:
        ll = pd.DataFrame(_layer_rows(lns))
        for c in ("norm_rest", "norm_pos0", "var_rest", "var_pos0"):
            layers[f"lns_{c}"] = ll[c]
        lb = pd.DataFrame(_block_rows(lns))
        for c in ("rel_update", "rel_update_attn", "rel_update_mlp"):
            blocks[f"lns_{c}"] = lb[c]
        ls = pd.DataFrame(_site_rows(lns))
        sites_df["lns_out_var_rest"] = ls["out_var_rest"]
    dist = base.angular.mean().numpy()  # [L+1, L+1]
    adjacent = [float(dist[i, i + 1]) for i in range(n_blocks)]
    blocks["angular_to_next"] = adjacent
    if lns is not None:
        dl = lns.angular.mean().numpy()
        blocks["lns_angular_to_next"] = [float(dl[i, i + 1]) for i in range(n_blocks)]
    growth_rest = fit_growth(layers["point"], layers["norm_rest"])
    growth_var = fit_growth(layers["point"], layers["var_rest"])
    growth = pd.DataFrame([{"quantity": "residual L2 norm (ordinary positions)", **growth_rest.to_dict()},
                           {"quantity": "residual variance (ordinary positions)", **growth_var.to_dict()}])
    growth_lns = fit_growth(layers["point"], layers["lns_norm_rest"]) if lns is not None else None
    if growth_lns is not None:
        growth.loc[len(growth)] = {"quantity": "residual L2 norm, LayerNorm Scaling what-if", **growth_lns.to_dict()}
    massive = pd.DataFrame(_massive_rows(base, lm.tokenizer),
                           columns=["sequence", "position", "token", "token_id", "dim", "max_abs", "first_point",
                                    "last_point"])
    angular_df = pd.DataFrame([{"from": i, "to": j, "n": j - i, "distance": float(dist[i, j])}
                               for i in range(n_blocks + 1) for j in range(i + 1, n_blocks + 1)])

    headlines: dict[str, Any] = {
        "norm_embeddings": round(float(layers["norm_rest"].iloc[0]), 3),
        "norm_before_last_block": round(float(layers["norm_rest"].iloc[-2]), 2),
        "norm_last": round(float(layers["norm_rest"].iloc[-1]), 2),
        "pos0_to_rest_norm_ratio_max": round(float((layers["norm_pos0"] / layers["norm_rest"]).max()), 1),
        "growth_exponent": round(growth_rest.exponent, 3),
        "growth_better_fit": growth_rest.better,
    }
    if base_loss is not None:
        headlines["loss"] = round(base_loss, 4)
    if skip_loss and blocks["skip_delta_loss"].notna().any():  # all NaN when the loss overflowed
        worst = blocks.loc[blocks["skip_delta_loss"].idxmax()]
        least = blocks.loc[blocks["skip_delta_loss"].idxmin()]
        headlines["costliest_block_to_skip"] = f"{int(worst['block'])} ({worst['skip_delta_loss']:+.3f})"
        headlines["cheapest_block_to_skip"] = f"{int(least['block'])} ({least['skip_delta_loss']:+.3f})"
        if skip_scope is not None:
            headlines["skip_measured_on"] = f"{skip_scope['tokens']:,} of {skip_scope['of_tokens']:,} tokens"
    if drop is not None:
        headlines[f"drop_{drop['n']}_blocks"] = f"{drop['start']}-{drop['end']} ({drop['delta_loss']:+.3f})"
    if lns is not None and lns.loss is not None and base_loss is not None:
        headlines["lns_delta_loss"] = round(lns.loss.mean - base_loss, 4)

    payload: dict[str, Any] = {
        "model": info.spec,
        "n_blocks": n_blocks,
        "seq_len": sample.seq_len,
        "n_tokens": n_tok,
        "n_sequences": sum(len(b) for b in batches),
        "controls_included": any(c in CONTROL_CATEGORIES for c in sample.categories),
        "loss": base_loss,
        "layers": layers.to_dict("records"),
        "blocks": blocks.to_dict("records"),
        "sites": sites_df.to_dict("records"),
        "angular_distance": dist.tolist(),
        "windows": windows.to_dict("records"),
        "drop_window": drop,
        "growth": growth.to_dict("records"),
        "skip_layers": sorted(skip_loss),
        "skip_scope": skip_scope,  # which tokens the skip losses were measured on, and their own baseline
        "lns": None if lns is None else {
            "loss": lns.loss.mean if lns.loss is not None else None,
            "scaled_sites": lns.extra.get("scaled_sites", []),
            "angular_distance": lns.angular.mean().tolist(),
            "note": "applied at inference to a model that was not trained with LayerNorm Scaling",
        },
        "massive_rest_tokens": massive.to_dict("records"),
    }
    post_ln = not any(s.role in PRE_NORM_ROLES for s in sites)
    dropped = sample.n_sequences - sum(len(b) for b in batches)
    lns_loss = lns.loss.mean if lns is not None and lns.loss is not None else None
    lines = summary(layers, blocks, growth_rest, base_loss, lns_loss, lns is not None, drop, n_blocks, dropped,
                    post_ln, massive, skip_scope)
    figs = figures(layers, blocks, sites_df, dist, windows, drop, growth_rest, lns is not None, base_loss, n_blocks,
                   skip_scope)
    tables = {"layers": layers, "blocks": blocks, "sites": sites_df, "growth": growth, "windows": windows,
              "angular": angular_df}
    if len(massive):
        tables["massive"] = massive
    labels = dict(LABELS)
    if drop is not None:
        labels[f"drop_{drop['n']}_blocks"] = f"cheapest {drop['n']} consecutive blocks to drop (loss change)"
    settings = {k: v for k, v in opts.__dict__.items()}
    result = Result(
        analysis="depth",
        title="Curse of depth: variance growth and layer effectiveness",
        meta=build_meta(lm, sample, **settings),
        payload=payload,
        tables=tables,
        axes=AXES,
        labels=labels,
        figures=figs,
        headlines=headlines,
        summary=lines,
        references=REFERENCES,
        timings=timings,
    )
    flag_nonfinite(result, base.extra.get("nonfinite", []))
    lns_bad = lns.extra.get("nonfinite", []) if lns is not None else []
    result.payload["nonfinite_lns"] = lns_bad  # the what-if's own overflow, not the model's
    if lns_bad:
        result.summary.append("LayerNorm Scaling what-if: " + nonfinite_warning(
            lns_bad, "the scaled model overflows there, so its curves stop being meaningful from that point"
        ).replace("; rerun with --dtype float32.", "."))
    return result


"""``normscope sinks``: the capture (one forward pass per batch, plus three for ``--ablate``) and the Result.

Attention sinks (alpha_k, Sink_1^eps: Gu et al. 2024, "When Attention Sink Emerges in Language Models: An
Empirical View", arXiv:2410.10781), massive activations (Sun et al. 2024, "Massive Activations in Large
Language Models", arXiv:2402.17762), residual sinks and outlier-driven rescaling of the RMS/std divisor (Qiu et
al. 2026, "A Unified View of Attention and Residual Sinks", arXiv:2601.22966), and the causal test that a sink
matters (Xiao et al. 2023, "Efficient Streaming Language Models with Attention Sinks", arXiv:2309.17453, and
Sun et al.'s zero-versus-mean intervention). The formulas are in :mod:`.metrics`, the per-batch folding in
:mod:`.reducers`, figures and sentences in :mod:`.report`.
"""

from __future__ import annotations

import functools
import operator
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pandas as pd
import torch

from normscope.analyses.base import RunContext
from normscope.analyses.sinks.metrics import massive_mask
from normscope.analyses.sinks.options import REFERENCES, SinksOptions
from normscope.analyses.sinks.reducers import AttentionSinkReducer, OutlierReducer, ResidualReducer
from normscope.analyses.sinks.report import figures, summary
from normscope.core.capture import BatchContext, Capture
from normscope.core.errors import NormscopeError
from normscope.core.losses import LossMeter
from normscope.core.nonfinite import flag_nonfinite
from normscope.core.progress import progress_task as _task
from normscope.core.tokens import token_text
from normscope.report import Result
from normscope.report.result import build_meta

AXES = {"layers": "layer", "sites": "layer"}  # each per-depth table: its depth column
INTERVENTIONS = ("massive dims zeroed", "massive dims set to their mean", "attention to position 0 removed")
LABELS = {  # words for table, column and headline names on pages, in the terminal and in compare
    "layers": "per layer",
    "sites": "per norm site",
    "layer": "layer",
    "sink_rate": "sink rate Sink_1^0.3 (%)",
    "alpha1_mean": "mean alpha_1 (attention on position 0)",
    "top1_abs": "top-1 |h|",
    "top2_abs": "top-2 |h|",
    "top3_abs": "top-3 |h|",
    "median_abs": "median |h|",
    "top1_to_median": "top-1 / median |h|",
    "top1_frequency": "share of sequences with the top-1 at its usual place",
    "divisor_first": "divisor at position 0",
    "divisor_rest": "divisor at positions > 0",
    "top1_share_first": "top-1 dim's share of ||x||^2 at position 0",
    "top1_share_rest": "top-1 dim's share of ||x||^2 at positions > 0",
    "shrink_first": "shrink of the other dims, position 0",
    "shrink_rest": "shrink of the other dims, positions > 0",
    "divisor_ratio_first_to_rest": "divisor ratio, position 0 / rest",
    "sink_rate_pct": "sink rate (%)",
    "nonfinite_points": "hook points with inf/NaN",
    "sink_tokens": "sink tokens",
    # headlines (their keys stay as they are in the JSON)
    "sink_rate_percent": "sink rate Sink_1^0.3 (%)",
    "top_sink_head": "top sink head",
    "massive_dims": "massive-activation dims",
    "max_massive_value": "largest massive activation",
    "loss": "loss (nats/token)",
    **{f"delta_loss: {name}": f"loss change, {name}" for name in INTERVENTIONS},
}
NO_BOS_SINK_TOKENS = ("sink tokens (no BOS: position 0 is whatever token opens each window, so the 'first' rows name "
                      "no sink token)")


def position0_is_arbitrary(sample: Any, causal: bool) -> bool:
    """True when position 0 of every sequence is an arbitrary text token: a causal LM's windows without BOS, each
    opening on the first token of a document or on one cut from its middle. Then the sink at position 0 says
    nothing about which tokens become sinks (Xiao et al. 2023 find that the initial positions act as sinks
    whatever their tokens, by position). Encoders start every window with [CLS]."""
    return bool(causal and not sample.bos_prepended)


def attention_sentence(path: str, reason: str, sample: Any, n_heads: int) -> str:
    """The page's line saying how alpha_k was computed, and why that way."""
    batch = max((b.input_ids.shape[0] for b in sample.batches), default=0)
    size = batch * n_heads * sample.seq_len ** 2 * 4  # one layer's fp32 eager pattern, one batch
    per_layer = f"{size / 2**20:,.1f} MiB" if size < 2**30 else f"{size / 2**30:,.1f} GiB"
    if path == "chunked":
        return (f"Attention path: chunked (SDPA forward; each key's attention summed over queries in chunks computed "
                f"from the queries and keys, no T x T pattern kept, where eager attention would hold {per_layer} per "
                f"layer and batch), because {reason}.")
    return f"Attention path: eager (whole T x T patterns, {per_layer} per layer and batch), because {reason}."


# ---- interventions for the causal checks --------------------------------------------------------------
def _set_massive(dims: list[int], value: dict[int, float] | None, threshold: float,
                 ratio: float) -> Callable[[torch.Tensor, BatchContext], torch.Tensor]:
    """Intervention: set massive entries of ``dims`` to zero (value None) or to their mean value."""
    idx = torch.tensor(dims, dtype=torch.long)

    def fn(h: torch.Tensor, ctx: BatchContext) -> torch.Tensor:
        mask = massive_mask(h, threshold, ratio)[..., idx]  # [batch, pos, n_dims]
        if not mask.any():
            return h
        h = h.clone()
        sub = h[..., idx]
        repl = torch.zeros_like(sub) if value is None else torch.tensor(
            [value.get(d, 0.0) for d in dims], dtype=h.dtype, device=h.device
        ).expand_as(sub)
        h[..., idx] = torch.where(mask, repl, sub)
        return h

    return fn


@contextmanager
def no_attention_to_first(layout: Any) -> Iterator[None]:
    """Forbid every query after position 0 from attending to key 0 (StreamingLLM's test, applied to one sink).

    Edits the additive attention mask that the attention modules receive. Where they receive none (SDPA and
    flash kernels are told ``is_causal`` instead), a causal mask is built first: an explicit mask turns the
    kernel's own causal masking off, and a zero mask would let every query see the future.
    """

    def pre(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        h = kwargs.get("hidden_states", args[0] if args else None)
        assert isinstance(h, torch.Tensor)
        mask = kwargs.get("attention_mask")
        b, t = h.shape[0], h.shape[1]
        if mask is None or mask.ndim != 4:
            future = torch.ones(t, t, dtype=torch.bool, device=h.device).triu(1)  # [query, key]
            mask = torch.zeros(b, 1, t, t, dtype=h.dtype, device=h.device).masked_fill(future, torch.finfo(h.dtype).min)
        mask = mask.clone()
        mask[:, :, 1:, 0] = torch.finfo(mask.dtype).min
        return args, {**kwargs, "attention_mask": mask}

    handles = [b.attn.register_forward_pre_hook(pre, with_kwargs=True) for b in layout.blocks if b.attn is not None]
    try:
        yield
    finally:
        for hd in handles:
            hd.remove()


# ---- the analysis -------------------------------------------------------------------------------------
def run(ctx: RunContext, opts: SinksOptions) -> Result:
    """Attention sinks, massive activations and outlier rescaling in one forward pass per batch.

    ``ctx`` carries the loaded model, its layout and norm sites (probed once) and the text sample; ``ctx.progress``
    is the CLI's progress bar or None (silent).
    """
    lm, sample, progress = ctx.lm, ctx.sample, ctx.progress
    model, info = lm.model, lm.info
    layout = ctx.layout
    sites = ctx.sites
    causal = info.is_causal
    if opts.ablate and not causal:
        raise NormscopeError("--ablate measures next-token loss, so it needs a causal LM; drop --ablate for encoders.")
    cap = Capture(model, layout, sites, attention=opts.attention)
    attn = {b.index: cap.add(f"blocks.{b.index}.attn.hook_col_sum",
                             AttentionSinkReducer(b.index, opts.eps, causal, opts.min_queries))
            for b in layout.blocks if b.attn is not None}
    resid = {b.index: cap.add(f"blocks.{b.index}.hook_resid_post",
                              ResidualReducer(b.index, opts.massive_threshold, opts.massive_ratio))
             for b in layout.blocks}
    outl = {s.name: cap.add(f"{s.name}.hook_in", OutlierReducer(s, opts.top_k)) for s in sites}
    loss = LossMeter() if opts.ablate else None  # the ablations' baseline; otherwise no logits are needed
    n_passes = 1 + (3 if opts.ablate else 0)
    total = sample.n_tokens * n_passes
    with _task(progress, "sinks", total) as advance, cap:
        cap.run(sample.iter_batches(), on_output=loss, progress=advance, logits=loss is not None)
        nonfinite = cap.nonfinite_report()  # of the measuring pass only, not of the ablations' edited passes
        path: dict[str, Any] = {"path": cap.attention_path, "reason": cap.attention_reason}
        cap.remove()
        cap.clear()
        ablations = _ablate(cap, layout, resid, sample, opts, loss, advance) if opts.ablate else []

    result = _build_result(lm, sample, opts, layout, attn, resid, outl, loss, ablations)
    result.payload["attention_path"] = path
    if path["path"] is not None:
        result.summary.append(attention_sentence(path["path"], path["reason"], sample, info.n_heads))
    flag_nonfinite(result, nonfinite)
    return result


def _ablate(cap: Capture, layout: Any, resid: dict[int, ResidualReducer], sample: Any, opts: SinksOptions,
            base: LossMeter | None, advance: Any) -> list[dict[str, Any]]:
    """Loss change with the massive dims zeroed, set to their mean, and with attention to position 0 removed."""
    assert base is not None
    rows: list[dict[str, Any]] = []
    dims = sorted({d for r in resid.values() for d in r.massive_dims()})
    if dims:
        for label, use_mean in (("massive dims zeroed", False), ("massive dims set to their mean", True)):
            for i, r in resid.items():
                if not r.massive_count:
                    continue
                value = {d: r.massive_value_sum[d] / r.massive_count[d] for d in r.massive_count} if use_mean else None
                cap.intervene(f"blocks.{i}.hook_resid_post",
                              _set_massive(dims, value, opts.massive_threshold, opts.massive_ratio))
            meter = LossMeter()
            with cap:
                cap.run(sample.iter_batches(), on_output=meter, progress=advance)
            cap.clear()
            rows.append({"intervention": label, "dims": ",".join(map(str, dims)), "loss": meter.mean,
                         "baseline_loss": base.mean, "delta_loss": meter.mean - base.mean})
    else:
        rows.append({"intervention": "massive dims zeroed", "dims": "", "loss": base.mean,
                     "baseline_loss": base.mean, "delta_loss": 0.0})
    meter = LossMeter()
    with no_attention_to_first(layout):
        cap.run(sample.iter_batches(), on_output=meter, progress=advance)
    cap.remove()
    rows.append({"intervention": "attention to position 0 removed", "dims": "", "loss": meter.mean,
                 "baseline_loss": base.mean, "delta_loss": meter.mean - base.mean})
    return rows


def _head_rows(attn: dict[int, AttentionSinkReducer]) -> list[dict[str, Any]]:
    """One row per (layer, head): mean alpha_1, the head's sink rate and its strongest later sink position."""
    rows = []
    for layer, r in sorted(attn.items()):
        am = r.alpha_mean()  # [head, key]
        assert r.above is not None
        for h in range(am.shape[0]):
            top_k = int(am[h, 1:].argmax()) + 1 if am.shape[1] > 1 else 0
            rows.append({"layer": layer, "head": h, "label": f"L{layer}H{h}", "alpha1": float(am[h, 0]),
                         "sink_rate": 100.0 * float(r.above[h]) / max(r.n_seq, 1),
                         "strongest_later_position": top_k, "alpha_later_max": float(am[h, top_k])})
    return rows


def _layer_rows(layout: Any, attn: dict[int, AttentionSinkReducer],
                resid: dict[int, ResidualReducer]) -> list[dict[str, Any]]:
    """One row per block: its sink rate and mean alpha_1 (blocks without attention: None), its |h| statistics."""
    rows = []
    for b in layout.blocks:
        i = b.index
        a, rr = attn.get(i), resid[i]
        sr = 100.0 * float(a.above.sum()) / max(a.n_seq * a.above.numel(), 1) if a and a.above is not None else None
        t_dim, t_pos, t_freq = rr.top1_location()
        rows.append({"layer": i, "sink_rate": sr,
                     "alpha1_mean": float(a.alpha_mean()[:, 0].mean()) if a and a.alpha_sum is not None else None,
                     "top1_abs": rr.top[0], "top2_abs": rr.top[1], "top3_abs": rr.top[2],
                     "median_abs": rr.median, "top1_to_median": rr.top[0] / max(rr.median, 1e-30),
                     "top1_dim": t_dim, "top1_position": t_pos, "top1_frequency": t_freq,
                     "massive_dims": rr.massive_dims()[:8]})
    return rows


def _massive_rows(resid: dict[int, ResidualReducer], tok: Any) -> list[dict[str, Any]]:
    """Per layer, the ten largest massive activations, one per (dim, position), with the token at the largest."""
    rows = []
    for i, rr in sorted(resid.items()):
        for (dim, pos), (count, mx, val, tid) in sorted(rr.massive.items(), key=lambda kv: -kv[1][1])[:10]:
            rows.append({"layer": i, "dim": dim, "position": pos, "token": token_text(tok, tid), "value": val,
                         "abs": mx, "count": count})
    return rows


def _residual_dims(resid: dict[int, ResidualReducer]) -> pd.DataFrame:
    """Residual-sink dims: the ten largest mean |h_j| over tokens and layers, and their ratio to the median dim."""
    abs_tot = functools.reduce(operator.add, [rr.abs_sum for rr in resid.values() if rr.abs_sum is not None])
    n_tok = sum(rr.n_tok for rr in resid.values())
    h_avg = abs_tot / max(n_tok, 1)  # [d_model]
    order = torch.argsort(h_avg, descending=True)[:10].tolist()
    med = float(h_avg.median())
    return pd.DataFrame([{"dim": d, "mean_abs": float(h_avg[d]), "ratio_to_median_dim": float(h_avg[d]) / med}
                         for d in order])


def _sink_token_rows(attn: dict[int, AttentionSinkReducer], tok: Any) -> list[dict[str, Any]]:
    """The 25 (position class, token) pairs that are sinks most often, over every layer and head."""
    tcount: Counter[tuple[str, int]] = Counter()
    for a in attn.values():
        tcount.update(a.tokens.counts)
    total_hits = sum(tcount.values()) or 1
    return [{"position": pc, "token": token_text(tok, tid), "token_id": tid, "count": c, "share": c / total_hits}
            for (pc, tid), c in tcount.most_common(25)]


def _build_result(lm: Any, sample: Any, opts: SinksOptions, layout: Any, attn: dict[int, AttentionSinkReducer],
                  resid: dict[int, ResidualReducer], outl: dict[str, OutlierReducer], loss: LossMeter | None,
                  ablations: list[dict[str, Any]]) -> Result:
    info, tok = lm.info, lm.tokenizer
    head_rows = _head_rows(attn)
    heads = pd.DataFrame(head_rows)
    layer_rows = _layer_rows(layout, attn, resid)
    layers = pd.DataFrame(layer_rows)
    n_cells = sum(a.n_seq * (a.above.numel() if a.above is not None else 0) for a in attn.values())
    overall = 100.0 * sum(float(a.above.sum()) for a in attn.values() if a.above is not None) / max(n_cells, 1)
    cats: Counter[str] = Counter()
    cats_above: Counter[str] = Counter()
    for a in attn.values():
        cats.update(a.cat_n)
        cats_above.update(a.cat_above)
    by_category = {c: 100.0 * cats_above[c] / cats[c] for c in sorted(cats)}
    mrows = _massive_rows(resid, tok)
    massive = pd.DataFrame(mrows, columns=["layer", "dim", "position", "token", "value", "abs", "count"])
    dims_df = _residual_dims(resid)
    tok_rows = _sink_token_rows(attn, tok)
    sink_tokens = pd.DataFrame(tok_rows, columns=["position", "token", "token_id", "count", "share"])
    sites_df = pd.DataFrame([r.row() for r in outl.values()])
    abl_df = pd.DataFrame(ablations)
    arbitrary0 = position0_is_arbitrary(sample, info.is_causal)

    all_massive_dims = sorted({d for rr in resid.values() for d in rr.massive_count},
                              key=lambda d: -sum(rr.massive_count[d] for rr in resid.values()))
    top_heads = heads.sort_values("alpha1", ascending=False).head(5) if len(heads) else heads
    max_row = massive.loc[massive["abs"].idxmax()] if len(massive) else None
    headlines: dict[str, Any] = {
        "sink_rate_percent": round(overall, 2),
        "top_sink_head": top_heads.iloc[0]["label"] if len(top_heads) else None,
        "massive_dims": all_massive_dims[:5],
        "max_massive_value": float(max_row["value"]) if max_row is not None else None,
    }
    if loss is not None:
        headlines["loss"] = round(loss.mean, 4)
    for r in ablations:
        headlines[f"delta_loss: {r['intervention']}"] = round(r["delta_loss"], 4)

    payload: dict[str, Any] = {
        "model": info.spec,
        "seq_len": sample.seq_len,
        "n_tokens": sample.n_tokens,
        "n_sequences": sample.n_sequences,
        "bos_prepended": sample.bos_prepended,
        "position0_arbitrary_token": arbitrary0,  # no BOS: position 0 opens each window on any text token
        "eps": opts.eps,
        "sink_rate": overall,
        "sink_rate_by_category": by_category,
        "layers": layer_rows,
        "heads": [{k: r[k] for k in ("layer", "head", "alpha1", "sink_rate")} for r in head_rows],
        "massive_activations": mrows,
        "massive_dims": all_massive_dims,
        "residual_dims": dims_df.to_dict("records"),
        "sink_tokens": tok_rows,
        "sites": sites_df.to_dict("records"),
        "ablations": ablations,
        "loss": loss.mean if loss is not None else None,
    }
    tables = {"layers": layers, "heads": heads, "massive_activations": massive, "residual_dims": dims_df,
              "sink_tokens": sink_tokens, "sites": sites_df}
    if len(abl_df):
        tables["ablations"] = abl_df
    rate = f"sink rate Sink_1^{opts.eps:g} (%)"  # the labels name the threshold this run used
    labels = {**LABELS, "sink_rate": rate, "sink_rate_percent": rate}
    if arbitrary0:
        labels["sink_tokens"] = NO_BOS_SINK_TOKENS
    return Result(
        analysis="sinks",
        title="Attention and residual sinks",
        meta=build_meta(lm, sample, **{k: v for k, v in opts.__dict__.items()}),
        payload=payload,
        tables=tables,
        axes=AXES,
        labels=labels,
        figures=figures(heads, layers, massive, sites_df, opts, sample.seq_len),
        headlines=headlines,
        summary=summary(sample, opts, overall, by_category, layers, all_massive_dims, massive, sites_df, ablations,
                        sink_tokens, arbitrary0, ln_free=lm.extra.get("ln_free_export")),
        references=REFERENCES,
    )

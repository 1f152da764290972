"""Hubness of token representations in the residual stream, before and after each norm, and against W_U.

A *hub* is a point that turns up in the k-nearest-neighbour lists of many other points. The k-occurrence
N_k(x) counts those lists (self excluded); hubness is the skewness of the N_k distribution.

Metrics and where they come from:

* k-occurrence and k-skewness (biased, as ``scipy.stats.skew``): Radovanovic, Nanopoulos, Ivanovic 2010,
  "Hubs in Space: Popular Nearest Neighbors in High-Dimensional Data" (JMLR 11);
* Robin Hood index, antihub occurrence, hub occurrence (N_k >= 2k), Gini and Atkinson (eps 0.5) indices,
  with the conventions of scikit-hubness (Feldbauer, Leodolter, Plant, Flexer 2018, "Fast approximate
  hubness reduction for large high-dimensional data"; code ``VarIr/scikit-hubness``);
* hubs in language models, and the split between harmless context-to-unembedding hubs (frequent tokens) and
  nuisance token-to-token hubs: Nielsen, Macocco, Baroni 2025, "Prediction hubs are context-informed frequent
  tokens in LLMs".

Memory. This is the one analysis that holds representation matrices: for every hook point analysed in a
pass it keeps an ``[n_tokens, d_model]`` float32 matrix (20,000 tokens x 576 dims = 46 MB). Points are
grouped so that one pass holds at most ``HubnessOptions.memory_mb`` of them; a sample that needs more runs
more forward passes. The exact k-NN search works in blocks of ``block_size`` query rows (a
``[block_size, n_tokens]`` distance block at a time), never an N x N matrix.

The modules: ``metrics.py`` (pure functions), ``reducers.py`` (the matrix collector), ``plan.py`` (points, passes,
token bookkeeping), this module (the passes and the Result) and ``report.py`` (labels, sentences, figures).
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import pandas as pd
import torch

from normscope.analyses.base import RunContext
from normscope.analyses.hubness.metrics import (
    hubness_scores,
    is_delimiter,
    k_occurrence,
    knn_indices,
    norm_effect_table,
    position0_stats,
)
from normscope.analyses.hubness.options import REFERENCES, HubnessOptions
from normscope.analyses.hubness.plan import Point, TokenMeta, default_layers, group_points, plan_points, token_meta
from normscope.analyses.hubness.reducers import MatrixCollector, SinkColumns
from normscope.analyses.hubness.report import AXES, LABELS, figures, summary
from normscope.core.attention import SinkTokens
from normscope.core.capture import Capture
from normscope.core.errors import NormscopeError
from normscope.core.layers import parse_layers
from normscope.core.nonfinite import flag_nonfinite, merge_nonfinite, watch_residual
from normscope.core.placement import resident
from normscope.core.progress import note
from normscope.core.progress import progress_task as _task
from normscope.core.tokens import token_text
from normscope.report import Result
from normscope.report.result import build_meta

__all__ = ["AXES", "LABELS", "parse_layers", "run"]


def run(ctx: RunContext, opts: HubnessOptions) -> Result:
    """k-occurrence hubness of the residual stream and of every norm site's input and output.

    ``ctx`` carries the loaded model, its layout and norm sites (probed once) and the text sample; ``ctx.progress``
    is the CLI's progress bar or None (silent).
    """
    lm, sample, progress = ctx.lm, ctx.sample, ctx.progress
    model, tok, info = lm.model, lm.tokenizer, lm.info
    meta = token_meta(sample)
    n_tok = int(meta.ids.numel())  # tokens analysed
    _check_options(opts, n_tok)
    layout = ctx.layout
    sites = ctx.sites
    layers = parse_layers(opts.layers, layout.n_layers, "--layers")
    if layers is None:
        layers = default_layers(layout.n_layers)
    if not layers:
        raise NormscopeError("--layers none leaves nothing to analyse; name some blocks, e.g. --layers 0,12,-1.")
    points = plan_points(layout, sites, layers, opts.sites)
    bytes_per_point = n_tok * layout.d_model * 4
    groups = group_points(points, bytes_per_point, opts.memory_mb)
    with_unembed = opts.unembed and info.is_causal and layout.unembed is not None and layout.final_norm is not None
    timings: dict[str, float] = {"forward passes": 0.0, "k-NN search": 0.0}
    results: list[dict[str, Any]] = []
    hubs: list[dict[str, Any]] = []
    hists: dict[str, dict[str, torch.Tensor]] = {}
    unembed_rows: list[dict[str, Any]] = []
    unembed_scores: dict[str, Any] = {}
    n_knn = len(points) * len(opts.metrics)
    note(progress, f"hubness: {n_knn} exact k-NN searches ({len(points)} points x {len(opts.metrics)} metric(s)) over "
         f"{n_tok:,} tokens, after {len(groups)} forward pass(es); fewer with --layers, --no-sites or --metric.")
    total = sample.n_tokens * len(groups) + n_knn + (1 if with_unembed else 0)
    sink_tokens = SinkTokens(info.is_causal)
    nonfinite: list[list[dict[str, Any]]] = []  # one inf/NaN report per pass
    n_searched = 0  # k-NN searches run (identical matrices share one)
    with _task(progress, "hubness", total) as advance:
        for gi, group in enumerate(groups):
            cap = Capture(model, layout, sites)
            collectors = {p.hook: cap.add(p.hook, MatrixCollector(n_tok)) for p in group}
            final_col = None
            if gi == 0:
                watch_residual(cap, layout)  # every block's output checked for inf/NaN once
                for b in layout.blocks:
                    if b.attn is not None:
                        cap.add(f"blocks.{b.index}.attn.hook_col_sum", SinkColumns(sink_tokens))
                if with_unembed and layout.final_norm is not None:
                    hook = f"{layout.final_norm.name}.hook_out"
                    final_col = collectors.get(hook) or cap.add(hook, MatrixCollector(n_tok))
            t0 = time.perf_counter()
            with cap:
                cap.run(sample.iter_batches(), progress=advance, logits=False)  # no logits read
            timings["forward passes"] += time.perf_counter() - t0
            nonfinite.append(cap.nonfinite_report())
            if gi == 0:
                meta.sink_ids = sink_tokens.later_ids()
                if final_col is not None:
                    t0 = time.perf_counter()
                    h = final_col.matrix[: final_col.n] if final_col.matrix is not None else None
                    assert h is not None
                    unembed_scores, unembed_rows = context_unembed_hubness(h, layout.unembed, meta, tok, opts)
                    timings["context-unembedding search"] = time.perf_counter() - t0
                    if advance:
                        advance(1)
            done: list[tuple[torch.Tensor, dict[str, Any]]] = []  # identical matrices share results
            for p in group:
                x = collectors[p.hook].take()  # [n_tokens, d]
                nks = next((r for m, r in done if m.shape == x.shape and m.device == x.device and torch.equal(m, x)),
                           None)
                if nks is None:
                    nks = {}
                    for metric in opts.metrics:
                        t0 = time.perf_counter()
                        idx = knn_indices(x, opts.k, metric, block_size=opts.block_size)
                        timings["k-NN search"] += time.perf_counter() - t0
                        n_searched += 1
                        nks[metric] = (k_occurrence(idx, x.shape[0]), position0_stats(idx, meta.pos))
                        if advance:
                            advance(1)
                    done.append((x, nks))
                elif advance:
                    advance(len(opts.metrics))
                for metric, (nk, p0) in nks.items():
                    row = {"point": p.label, "layer": p.layer, "kind": p.kind, "site": p.site, "role": p.role,
                           "order": p.order, "metric": metric, "k": opts.k, "n_tokens": int(nk.numel())}
                    row.update(hubness_scores(nk, opts.k, opts.hub_size))
                    row["pos0_mean_nk"] = float(nk[meta.pos == 0].double().mean()) if (meta.pos == 0).any() else None
                    row["pos0_neighbours_pos0"] = p0
                    top = top_hub_rows(nk, meta, tok, opts.top_hubs)
                    row["top_hubs_pos0"] = sum(r["position"] == 0 for r in top)
                    row["top_hubs_sink"] = sum(r["sink"] != "" for r in top)
                    row["top_hub"] = top[0]["token"] if top else None
                    results.append(row)
                    for rank, r in enumerate(top):
                        hubs.append({"point": p.label, "layer": p.layer, "metric": metric, "rank": rank + 1, **r})
                    hists.setdefault(p.label, {})[metric] = nk
            del done
    if n_searched:
        timings[f"k-NN search, per point and metric (mean of {n_searched})"] = timings["k-NN search"] / n_searched
    result = _build_result(lm, sample, opts, layers, points, groups, results, hubs, hists,
                           unembed_scores, unembed_rows, meta, timings, bytes_per_point)
    flag_nonfinite(result, merge_nonfinite(nonfinite, Capture(model, layout, sites).points()))
    return result


def _check_options(opts: HubnessOptions, n_tokens: int) -> None:
    if opts.k >= n_tokens:
        raise NormscopeError(
            f"--k {opts.k} needs more than {opts.k} tokens, but the text gave {n_tokens}; lower --k or give more "
            "text (--text, --max-tokens)."
        )



def top_hub_rows(nk: torch.Tensor, meta: TokenMeta, tok: Any, n_top: int) -> list[dict[str, Any]]:
    """The ``n_top`` items with the largest N_k (ties: earlier token first), named by token and position."""
    n_top = min(n_top, nk.numel())
    order = torch.argsort(-nk, stable=True)[:n_top]
    rows = []
    for i in order.tolist():
        tid, pos = int(meta.ids[i]), int(meta.pos[i])
        text = token_text(tok, tid)
        sink = "position 0" if pos == 0 else ("sink token" if tid in meta.sink_ids else "")
        rows.append({"token": text, "token_id": tid, "position": pos, "sequence": int(meta.seq[i]),
                     "n_k": int(nk[i]), "sink": sink, "delimiter": is_delimiter(text)})
    return rows


def context_unembed_hubness(h: torch.Tensor, unembed: Any, meta: TokenMeta, tok: Any,
                            opts: HubnessOptions) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Hubness of contexts against the unembedding: N_k of each vocabulary item = how many final states have it
    among their k largest logits (dot product with the W_U row plus the bias: the model's own similarity).

    h: ``[n_tokens, d]`` final states after the final norm. Returns (scores, top vocabulary hubs).
    """
    w_u = resident(unembed)  # [vocab, d]; read from the offload under --device-map
    assert w_u is not None
    w = w_u.float()  # on W_U's device: the search runs there, as the model's own logits would
    bias = resident(unembed, "bias")
    b = bias.float().to(w.device) if bias is not None else None
    vocab = w.shape[0]
    k = min(opts.k, vocab)
    idx = torch.empty(h.shape[0], k, dtype=torch.long)
    step = max(1, min(opts.block_size, int(2**26 // max(vocab, 1))))  # ~256 MB of logits per block
    for s in range(0, h.shape[0], step):
        logits = h[s:s + step].to(w.device) @ w.T  # [b, vocab]
        if b is not None:
            logits += b
        idx[s:s + step] = logits.topk(k, dim=1).indices.cpu()
    nk = k_occurrence(idx, vocab)
    scores = hubness_scores(nk, k, opts.hub_size)
    freq = Counter(int(t) for t in meta.next_ids.tolist() if t >= 0)
    rank = {t: r + 1 for r, (t, _) in enumerate(freq.most_common())}
    order = torch.argsort(-nk, stable=True)[: opts.top_hubs]
    rows: list[dict[str, Any]] = [
        {"rank": i + 1, "token": token_text(tok, int(v)), "token_id": int(v), "n_k": int(nk[v]),
         "share_of_contexts": float(nk[v]) / h.shape[0], "count_in_text": freq.get(int(v), 0),
         "frequency_rank_in_text": rank.get(int(v))} for i, v in enumerate(order.tolist())]
    scores["vocab_size"] = vocab
    scores["top_hubs_in_text_top20"] = sum(1 for r in rows if (rank.get(r["token_id"]) or 21) <= 20)
    return scores, rows


def _build_result(lm: Any, sample: Any, opts: HubnessOptions, layers: list[int],
                  points: list[Point], groups: list[list[Point]], results: list[dict[str, Any]],
                  hubs: list[dict[str, Any]], hists: dict[str, dict[str, torch.Tensor]],
                  unembed_scores: dict[str, Any], unembed_rows: list[dict[str, Any]], meta: TokenMeta,
                  timings: dict[str, float], bytes_per_point: int) -> Result:
    info = lm.info
    pts = pd.DataFrame(results)
    hubs_df = pd.DataFrame(hubs)
    effect = norm_effect_table(pts)
    unembed_df = pd.DataFrame(unembed_rows)
    mem_mb = bytes_per_point * max(len(g) for g in groups) / 2**20 if groups else 0.0

    headlines: dict[str, Any] = {}
    for metric in opts.metrics:
        sub = pts[pts["metric"] == metric]
        if len(sub):
            worst = sub.loc[sub["skewness"].idxmax()]
            headlines[f"max k-skewness ({metric})"] = round(float(worst["skewness"]), 3)
            headlines[f"most hubby point ({metric})"] = worst["point"]
    if len(effect):
        for metric in opts.metrics:
            e = effect[effect["metric"] == metric]
            if len(e):
                headlines[f"median skewness change through a norm ({metric})"] = round(
                    float(e["skewness_change"].median()), 3)
    if len(hubs_df):
        headlines["top hubs at position 0"] = f"{100 * float((hubs_df['position'] == 0).mean()):.1f}%"
        headlines["top hubs at sink positions"] = f"{100 * float((hubs_df['sink'] != '').mean()):.1f}%"
    if unembed_scores:
        headlines["context-unembedding k-skewness"] = round(unembed_scores["skewness"], 3)
    headlines["tokens"] = int(meta.ids.numel())
    headlines["forward passes"] = len(groups)

    payload: dict[str, Any] = {
        "model": info.spec,
        "k": opts.k,
        "metrics": list(opts.metrics),
        "layers": layers,
        "n_tokens": int(meta.ids.numel()),
        "n_tokens_read": sample.n_tokens,
        "n_points": len(points),
        "n_passes": len(groups),
        "matrix_mb_per_point": bytes_per_point / 2**20,
        "peak_matrix_mb": mem_mb,
        "points": results,
        "norm_effect": effect.to_dict("records"),
        "hubs": hubs,
        "sink_token_ids": sorted(meta.sink_ids),
        "context_unembedding": {"metric": "logit (dot product with W_U rows plus bias)", **unembed_scores,
                                "hubs": unembed_rows} if unembed_scores else None,
    }
    lines = summary(pts, effect, hubs_df, unembed_scores, unembed_rows, opts, int(meta.ids.numel()), info,
                       groups, mem_mb)
    figs = figures(pts, effect, hists, unembed_df, opts, layers)
    tables = {"points": pts, "norm_effect": effect, "hubs": hubs_df}
    if len(unembed_df):
        tables["unembedding_hubs"] = unembed_df
    settings = {k: v for k, v in opts.__dict__.items()}
    settings["metrics"] = list(opts.metrics)
    settings["layers"] = layers
    return Result(
        analysis="hubness",
        title="Hubness of token representations",
        meta=build_meta(lm, sample, **settings),
        payload=payload,
        tables=tables,
        axes=AXES,
        labels=LABELS,
        figures=figs,
        headlines=headlines,
        summary=lines,
        references=REFERENCES,
        timings=timings,
    )



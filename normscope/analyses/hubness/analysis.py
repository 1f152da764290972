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
"""

from __future__ import annotations

import math
import time
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from normscope.analyses.base import RunContext
from normscope.analyses.hubness.options import REFERENCES, HubnessOptions
from normscope.core.attention import SinkTokens
from normscope.core.capture import BatchContext, Capture
from normscope.core.errors import NormscopeError
from normscope.core.layers import parse_layers
from normscope.core.nonfinite import flag_nonfinite, merge_nonfinite, watch_residual
from normscope.core.progress import progress_task as _task
from normscope.report import Figure, Result, plot_text
from normscope.report.result import build_meta

AXES = {"points": "layer", "norm_effect": "layer"}  # each per-depth table: its depth column
LABELS = {
    "points": "per hook point", "norm_effect": "each norm's effect", "skewness": "k-occurrence skewness",
    "robin_hood": "Robin Hood index", "antihub_share": "antihub share (N_k = 0)", "hub_occurrence": "hub occurrence",
    "gini": "Gini of N_k", "skewness_in": "skewness before the norm", "skewness_out": "skewness after the norm",
    "nonfinite_points": "hook points with inf/NaN",
}


# ---- pure metric functions -----------------------------------------------------------------------------
def knn_indices(
    x: torch.Tensor,
    k: int,
    metric: str = "euclidean",
    *,
    gallery: torch.Tensor | None = None,
    block_size: int = 1024,
) -> torch.Tensor:
    """Exact k nearest neighbours of every row of ``x``, computed in blocks of query rows.

    x: ``[n, d]`` queries. gallery: ``[m, d]`` items to search (None: ``x`` itself, self excluded, as in
    scikit-hubness). metric: ``euclidean``, ``cosine`` or ``dot`` (largest inner product, e.g. logits).
    Returns ``[n, k]`` gallery indices, nearest first. Memory: one ``[block_size, m]`` block at a time.
    Computes in the dtype of ``x`` (float32 or float64); Euclidean points are centred first, which leaves
    distances unchanged and keeps the ``|q|^2 + |g|^2 - 2 q.g`` expansion accurate.
    """
    if metric not in ("euclidean", "cosine", "dot"):
        raise ValueError(f"unknown metric {metric!r}")
    self_search = gallery is None
    q = x if x.is_floating_point() else x.float()
    g = q if gallery is None else gallery.to(q.dtype)
    n, m = q.shape[0], g.shape[0]
    if k < 1 or k > m - (1 if self_search else 0):
        raise ValueError(f"k={k} needs at least {k + (1 if self_search else 0)} items, got {m}")
    if metric == "euclidean":
        center = g.mean(dim=0, keepdim=True)  # [1, d]
        q = q - center
        g = q if self_search else g - center
        g_sq = g.pow(2).sum(dim=1)  # [m]
    elif metric == "cosine":
        q = q / q.norm(dim=1, keepdim=True).clamp_min(1e-30)
        g = q if self_search else g / g.norm(dim=1, keepdim=True).clamp_min(1e-30)
    gen = torch.Generator().manual_seed(0)
    out = torch.empty(n, k, dtype=torch.long)
    for start in range(0, n, block_size):
        qb = q[start:start + block_size]  # [b, d]
        sim = qb @ g.T  # [b, m]
        if metric == "euclidean":
            # minus the squared distance up to |q|^2 (constant per row): larger is nearer for every metric
            sim.mul_(2).sub_(g_sq[None, :])
        if self_search:
            rows = torch.arange(qb.shape[0])
            sim[rows, rows + start] = -math.inf
        out[start:start + qb.shape[0]] = _topk_random_ties(sim, k, gen).cpu()
    return out


def _topk_random_ties(sim: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Indices of the k largest entries per row; where ties straddle the cut (identical vectors, e.g. repeated
    tokens in the embeddings) the tied items are drawn at random, as scikit-hubness' ``shuffle_equal`` does,
    so that ties create no artificial hubs. sim: ``[b, m]``; returns ``[b, k]``."""
    vals, idx = sim.topk(k, dim=1)
    kth = vals[:, -1:]  # [b, 1]
    # equal up to rounding (identical vectors can differ in the last bits of a blocked matmul)
    tol = 8 * torch.finfo(sim.dtype).eps * (kth.abs() + 1)  # [b, 1]
    amb = ((sim >= kth - tol).sum(dim=1) > k).nonzero().flatten()  # more than k items reach the cut
    if amb.numel():
        s, t, lo = sim[amb], tol[amb], kth[amb]
        noise = torch.rand(s.shape, generator=gen).to(s.device)
        key = torch.where(s > lo + t, 2.0, torch.where(s >= lo - t, noise, -1.0))
        idx[amb] = key.topk(k, dim=1).indices
    return idx


def k_occurrence(indices: torch.Tensor, n_items: int) -> torch.Tensor:
    """N_k: how many k-NN lists contain each item. indices: ``[n_queries, k]``; returns ``[n_items]`` long."""
    return torch.bincount(indices.reshape(-1), minlength=n_items)


def skewness(nk: torch.Tensor) -> float:
    """Biased sample skewness m3 / m2^1.5, as ``scipy.stats.skew`` (Radovanovic et al. 2010).

    nk: ``[n]``. A distribution with zero variance has no asymmetry: returns 0.0 (scipy returns NaN).
    """
    x = nk.double()
    d = x - x.mean()
    m2 = d.pow(2).mean()
    if float(m2) <= 1e-24 * max(float(x.abs().max()), 1.0) ** 2:
        return 0.0
    return float(d.pow(3).mean() / m2.pow(1.5))


def robin_hood(nk: torch.Tensor) -> float:
    """Robin Hood (Hoover) index 0.5 * sum|N_k - mean| / sum N_k: the share of occurrences that would have to
    move for every item to be a neighbour equally often (Feldbauer et al. 2018)."""
    x = nk.double()
    total = float(x.sum())
    return 0.5 * float((x - x.mean()).abs().sum()) / total if total else 0.0


def gini(nk: torch.Tensor) -> float:
    """Gini index sum_ij |N_i - N_j| / (2 n sum N), via the sorted form sum_i (2i - n - 1) N_(i) / (n sum N)."""
    x = nk.double().sort().values
    n, total = x.numel(), float(x.sum())
    if not n or not total:
        return 0.0
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return float(((2 * i - n - 1) * x).sum()) / (n * total)


def atkinson(nk: torch.Tensor, eps: float = 0.5) -> float:
    """Atkinson index 1 - mean(N^(1-eps))^(1/(1-eps)) / mean(N) (scikit-hubness, eps 0.5)."""
    x = nk.double()
    mean = float(x.mean())
    if not mean:
        return 0.0
    if eps == 1:
        return 1.0 - float(torch.exp(torch.log(x).mean())) / mean
    return 1.0 - float(x.pow(1 - eps).mean().pow(1 / (1 - eps))) / mean


def hubness_scores(nk: torch.Tensor, k: int, hub_size: float = 2.0) -> dict[str, float]:
    """All hubness measures of one k-occurrence vector ``[n]`` (scikit-hubness conventions).

    ``antihub_share``: items with N_k = 0; ``hub_occurrence``: share of all occurrences that go to hubs
    (N_k >= hub_size * k); ``n_hubs``: how many hubs; ``max_nk``: the largest N_k.
    """
    x = nk.double()
    total = float(x.sum())
    hubs = x >= hub_size * k
    return {
        "skewness": skewness(nk),
        "robin_hood": robin_hood(nk),
        "antihub_share": float((x == 0).double().mean()),
        "hub_occurrence": float(x[hubs].sum()) / total if total else 0.0,
        "gini": gini(nk),
        "atkinson": atkinson(nk),
        "n_hubs": int(hubs.sum()),
        "max_nk": int(x.max()) if x.numel() else 0,
    }


def position0_stats(indices: torch.Tensor, pos: torch.Tensor) -> float | None:
    """Share of the neighbours of position-0 tokens that are position-0 tokens themselves.

    indices: ``[n, k]`` k-NN lists; pos: ``[n]`` positions. Near 1 (or (n_seq - 1) / k when there are fewer
    sequences than k) when the first tokens form an island apart from the text, as a massive activation does.
    """
    first = pos == 0
    if not first.any():
        return None
    return float((pos[indices[first]] == 0).double().mean())


def is_delimiter(text: str) -> bool:
    """A token whose text is only whitespace and punctuation (``.``, ``,``, ``\\n``, ``:`` ...)."""
    s = text.strip()
    return not s or all(unicodedata.category(c)[0] in "PZ" or c in "\n\r\t" for c in s)


# ---- reducers ------------------------------------------------------------------------------------------
class MatrixCollector:
    """Copies every (unmasked) token's vector at one hook point into a preallocated ``[n_tokens, d]`` matrix.

    The only reducer in normscope whose memory grows with the number of tokens: hubness needs all points at
    once. Tokens are stored in batch order (sequence-major, then position).
    """

    def __init__(self, n_tokens: int) -> None:
        self.n_tokens = n_tokens
        self.matrix: torch.Tensor | None = None  # [n_tokens, d] float32
        self.n = 0

    def update(self, x: torch.Tensor, ctx: BatchContext) -> None:
        rows = x[token_mask(ctx)].float().cpu()  # [kept tokens in batch, d]
        if self.matrix is None:
            self.matrix = torch.empty(self.n_tokens, rows.shape[-1], dtype=torch.float32)
        self.matrix[self.n:self.n + rows.shape[0]] = rows
        self.n += rows.shape[0]

    def take(self) -> torch.Tensor:
        """The filled matrix (``[n, d]``); the collector lets go of it."""
        assert self.matrix is not None
        m, self.matrix = self.matrix[: self.n], None
        return m


def token_mask(ctx: BatchContext) -> torch.Tensor:
    """``[batch, pos]`` bool: the tokens hubness looks at (every unmasked token of the sample)."""
    return ctx.attention_mask.bool()


@dataclass
class Point:
    """One hook point whose token representations are analysed."""

    hook: str  # capture point, e.g. "blocks.3.ln1.hook_out"
    layer: int  # block index (the final norm counts as the last block)
    kind: str  # "resid_post", "norm_in", "norm_out"
    site: str | None = None  # norm site name, e.g. "blocks.3.ln1"
    role: str | None = None
    order: int = 0  # position in the forward pass, for plots

    @property
    def label(self) -> str:
        if self.kind == "resid_post":
            return f"blocks.{self.layer}.resid_post"
        return f"{self.site}.{'in' if self.kind == 'norm_in' else 'out'}"


@dataclass
class _TokenMeta:
    ids: torch.Tensor  # [n] token ids
    pos: torch.Tensor  # [n] position in the sequence
    seq: torch.Tensor  # [n] sequence index
    next_ids: torch.Tensor  # [n] the next token (-1 at the last position)
    sink_ids: set[int] = field(default_factory=set)  # token ids that act as attention sinks after position 0


def default_layers(n_layers: int) -> list[int]:
    """Every third block plus the last one: 0, 3, 6, ..., n-1."""
    return sorted(set(range(0, n_layers, 3)) | {n_layers - 1})


def plan_points(layout: Any, sites: list[Any], layers: list[int], with_sites: bool) -> list[Point]:
    """The hook points of the chosen blocks: each norm site's input and output, then the block's output.

    qk-norm sites act on per-head vectors and are skipped; the final norm belongs to the last block.
    """
    n = layout.n_layers
    points: list[Point] = []
    order = 0
    chosen = set(layers)
    for layer in layers:
        if with_sites:
            for s in sites:
                if s.role in ("qk_norm", "embedding", "other", "final") or s.layer != layer:
                    continue
                for kind, hook in (("norm_in", "hook_in"), ("norm_out", "hook_out")):
                    points.append(Point(f"{s.name}.{hook}", layer, kind, s.name, s.role, order))
                    order += 1
        points.append(Point(f"blocks.{layer}.hook_resid_post", layer, "resid_post", order=order))
        order += 1
    if with_sites and layout.final_norm is not None and (n - 1) in chosen:
        s = layout.final_norm
        for kind, hook in (("norm_in", "hook_in"), ("norm_out", "hook_out")):
            points.append(Point(f"{s.name}.{hook}", n - 1, kind, s.name, "final", order))
            order += 1
    return points


def group_points(points: list[Point], bytes_per_point: int, memory_mb: float) -> list[list[Point]]:
    """Split the points into passes whose matrices together stay under ``memory_mb`` (at least one each)."""
    per_pass = max(1, int(memory_mb * 2**20 // max(bytes_per_point, 1)))
    return [points[i:i + per_pass] for i in range(0, len(points), per_pass)]


# ---- the analysis -------------------------------------------------------------------------------------
def run(ctx: RunContext, opts: HubnessOptions) -> Result:
    """k-occurrence hubness of the residual stream and of every norm site's input and output.

    ``ctx`` carries the loaded model, its layout and norm sites (probed once) and the text sample; ``ctx.progress``
    is the CLI's progress bar or None (silent).
    """
    lm, sample, progress = ctx.lm, ctx.sample, ctx.progress
    model, tok, info = lm.model, lm.tokenizer, lm.info
    meta = _token_meta(sample)
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
    total = sample.n_tokens * len(groups) + n_knn + (1 if with_unembed else 0)
    sink_tokens = SinkTokens(info.is_causal)
    nonfinite: list[list[dict[str, Any]]] = []  # one inf/NaN report per pass
    with _task(progress, "hubness", total) as advance:
        for gi, group in enumerate(groups):
            cap = Capture(model, layout, sites)
            collectors = {p.hook: cap.add(p.hook, MatrixCollector(n_tok)) for p in group}
            final_col = None
            if gi == 0:
                watch_residual(cap, layout)  # every block's output checked for inf/NaN once
                for b in layout.blocks:
                    if b.attn is not None:
                        cap.add(f"blocks.{b.index}.attn.hook_pattern", sink_tokens)
                if with_unembed:
                    hook = f"{layout.final_norm.name}.hook_out"
                    final_col = collectors.get(hook) or cap.add(hook, MatrixCollector(n_tok))
            t0 = time.perf_counter()
            with cap:
                cap.run(sample.iter_batches(), progress=advance)
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
                nks = next((r for m, r in done if m.shape == x.shape and torch.equal(m, x)), None)
                if nks is None:
                    nks = {}
                    for metric in opts.metrics:
                        t0 = time.perf_counter()
                        idx = knn_indices(x, opts.k, metric, block_size=opts.block_size)
                        timings["k-NN search"] += time.perf_counter() - t0
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



def _token_meta(sample: Any) -> _TokenMeta:
    """Token id, position, sequence and next token of every token hubness looks at, in collector order."""
    ids, pos, seq, nxt = [], [], [], []
    s0 = 0
    for b in sample.iter_batches():
        ctx = BatchContext(b.input_ids, b.attention_mask, list(b.categories), 0)
        mask = token_mask(ctx).cpu()  # [batch, pos]
        bsz, t = b.input_ids.shape
        p = torch.arange(t).expand(bsz, t)
        sq = (torch.arange(bsz) + s0)[:, None].expand(bsz, t)
        nx = torch.cat([b.input_ids[:, 1:], torch.full((bsz, 1), -1, dtype=b.input_ids.dtype)], dim=1)
        ids.append(b.input_ids[mask])
        pos.append(p[mask])
        seq.append(sq[mask])
        nxt.append(nx[mask])
        s0 += bsz
    return _TokenMeta(torch.cat(ids), torch.cat(pos), torch.cat(seq), torch.cat(nxt))


def _tok_str(tok: Any, token_id: int) -> str:
    try:
        return tok.decode([int(token_id)])
    except Exception:
        return str(token_id)


def top_hub_rows(nk: torch.Tensor, meta: _TokenMeta, tok: Any, n_top: int) -> list[dict[str, Any]]:
    """The ``n_top`` items with the largest N_k (ties: earlier token first), named by token and position."""
    n_top = min(n_top, nk.numel())
    order = torch.argsort(-nk, stable=True)[:n_top]
    rows = []
    for i in order.tolist():
        tid, pos = int(meta.ids[i]), int(meta.pos[i])
        text = _tok_str(tok, tid)
        sink = "position 0" if pos == 0 else ("sink token" if tid in meta.sink_ids else "")
        rows.append({"token": text, "token_id": tid, "position": pos, "sequence": int(meta.seq[i]),
                     "n_k": int(nk[i]), "sink": sink, "delimiter": is_delimiter(text)})
    return rows


def context_unembed_hubness(h: torch.Tensor, unembed: Any, meta: _TokenMeta, tok: Any,
                            opts: HubnessOptions) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Hubness of contexts against the unembedding: N_k of each vocabulary item = how many final states have it
    among their k largest logits (dot product with the W_U row plus the bias: the model's own similarity).

    h: ``[n_tokens, d]`` final states after the final norm. Returns (scores, top vocabulary hubs).
    """
    w = unembed.weight.detach().float().cpu()  # [vocab, d]
    bias = getattr(unembed, "bias", None)
    b = bias.detach().float().cpu() if isinstance(bias, torch.Tensor) else None
    vocab = w.shape[0]
    k = min(opts.k, vocab)
    idx = torch.empty(h.shape[0], k, dtype=torch.long)
    step = max(1, min(opts.block_size, int(2**26 // max(vocab, 1))))  # ~256 MB of logits per block
    for s in range(0, h.shape[0], step):
        logits = h[s:s + step] @ w.T  # [b, vocab]
        if b is not None:
            logits += b
        idx[s:s + step] = logits.topk(k, dim=1).indices
    nk = k_occurrence(idx, vocab)
    scores = hubness_scores(nk, k, opts.hub_size)
    freq = Counter(int(t) for t in meta.next_ids.tolist() if t >= 0)
    rank = {t: r + 1 for r, (t, _) in enumerate(freq.most_common())}
    order = torch.argsort(-nk, stable=True)[: opts.top_hubs]
    rows = [{"rank": i + 1, "token": _tok_str(tok, int(v)), "token_id": int(v), "n_k": int(nk[v]),
             "share_of_contexts": float(nk[v]) / h.shape[0], "count_in_text": freq.get(int(v), 0),
             "frequency_rank_in_text": rank.get(int(v))} for i, v in enumerate(order.tolist())]
    scores["vocab_size"] = vocab
    scores["top_hubs_in_text_top20"] = sum(1 for r in rows if r["frequency_rank_in_text"] is not None
                                           and r["frequency_rank_in_text"] <= 20)
    return scores, rows


def _build_result(lm: Any, sample: Any, opts: HubnessOptions, layers: list[int],
                  points: list[Point], groups: list[list[Point]], results: list[dict[str, Any]],
                  hubs: list[dict[str, Any]], hists: dict[str, dict[str, torch.Tensor]],
                  unembed_scores: dict[str, Any], unembed_rows: list[dict[str, Any]], meta: _TokenMeta,
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
    summary = _summary(pts, effect, hubs_df, unembed_scores, unembed_rows, opts, int(meta.ids.numel()), info,
                       groups, mem_mb)
    figures = _figures(pts, effect, hists, unembed_df, opts, layers)
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
        figures=figures,
        headlines=headlines,
        summary=summary,
        references=REFERENCES,
        timings=timings,
    )


def norm_effect_table(pts: pd.DataFrame) -> pd.DataFrame:
    """One row per (norm site, metric): each hubness measure on the site's input and output, side by side."""
    cols = ["site", "role", "layer", "metric"]
    measures = ["skewness", "robin_hood", "antihub_share", "hub_occurrence", "gini"]
    if not len(pts) or not (pts["kind"] == "norm_in").any():
        return pd.DataFrame(columns=cols + [f"{m}_{s}" for m in measures for s in ("in", "out")])
    a = pts[pts["kind"] == "norm_in"].set_index(["site", "metric"])
    b = pts[pts["kind"] == "norm_out"].set_index(["site", "metric"])
    rows = []
    for key in a.index:
        if key not in b.index:
            continue
        ra, rb = a.loc[key], b.loc[key]
        row = {"site": key[0], "role": ra["role"], "layer": int(ra["layer"]), "metric": key[1],
               "order": int(ra["order"])}
        for m in measures:
            row[f"{m}_in"] = float(ra[m])
            row[f"{m}_out"] = float(rb[m])
        row["skewness_change"] = row["skewness_out"] - row["skewness_in"]
        rows.append(row)
    return pd.DataFrame(rows).sort_values(["metric", "order"]).drop(columns="order").reset_index(drop=True)


def _summary(pts: pd.DataFrame, effect: pd.DataFrame, hubs_df: pd.DataFrame, un: dict[str, Any],
             un_rows: list[dict[str, Any]], opts: HubnessOptions, n_tok: int, info: Any,
             groups: list[list[Point]], mem_mb: float) -> list[str]:
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


def _figures(pts: pd.DataFrame, effect: pd.DataFrame, hists: dict[str, dict[str, torch.Tensor]],
             unembed_df: pd.DataFrame, opts: HubnessOptions, layers: list[int]) -> list[Figure]:
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

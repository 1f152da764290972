"""Attention sinks, residual sinks (massive activations) and outlier-driven rescaling of the norm.

Metrics and where they come from:

* sink score alpha_k and sink rate Sink_1^eps: Gu et al. 2024, "When Attention Sink Emerges in Language
  Models: An Empirical View" (arXiv:2410.10781), code ``sail-sg/Attention-Sink``;
* massive activations (|h| > 100 and > 1000x the median |h| of the hidden state): Sun et al. 2024,
  "Massive Activations in Large Language Models" (arXiv:2402.17762), code ``locuslab/massive-activations``;
* residual sinks (dims ranked by mean |h|) and outlier-driven rescaling of the RMS/std divisor:
  "A Unified View of Attention and Residual Sinks" (2026);
* the causal test that a sink matters: Xiao et al. 2023, "Efficient Streaming Language Models with Attention
  Sinks" (StreamingLLM, arXiv:2309.17453), and Sun et al.'s zero-versus-mean intervention.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

from normscope.analyses.base import RunContext
from normscope.analyses.sinks.options import REFERENCES, SinksOptions
from normscope.core.attention import SinkTokens, sink_scores
from normscope.core.capture import BatchContext, Capture
from normscope.core.errors import NormscopeError
from normscope.core.losses import LossMeter
from normscope.core.nonfinite import flag_nonfinite
from normscope.core.progress import progress_task as _task
from normscope.report import Figure, Result, heatmap_layer_head
from normscope.report.result import build_meta

AXES = {"layers": "layer", "sites": "layer"}  # each per-depth table: its depth column
LABELS = {  # words for table and column names on pages and in compare
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
}


# ---- pure metric functions -----------------------------------------------------------------------------
def sink_rate(alpha: torch.Tensor, eps: float = 0.3) -> float:
    """Sink_k^eps in percent: the share of entries of ``alpha`` (any shape) strictly above ``eps``."""
    return 100.0 * float((alpha > eps).float().mean()) if alpha.numel() else float("nan")


def row_median(a: torch.Tensor) -> torch.Tensor:
    """Lower median of each row of ``a`` ``[rows, n]``, exactly as ``a.median(dim=1)``; returns ``[rows]``.

    On the CPU it selects with NumPy's introselect (``np.partition``), about 8x faster than torch's median
    here: the residual reducer takes one median per layer and batch, so this is on the hot path.
    """
    if a.device.type != "cpu" or a.dtype not in (torch.float32, torch.float64) or a.shape[1] == 0:
        return a.median(dim=1).values
    k = (a.shape[1] - 1) // 2
    part = np.partition(a.detach().contiguous().numpy(), k, axis=1)  # [rows, n]
    return torch.from_numpy(np.ascontiguousarray(part[:, k]))


def top3_entries(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The three largest entries of each sequence of ``a`` ``[batch, pos, d]``, as ``a.flatten(1).topk(3)``.

    Returns values, positions and dims, each ``[batch, 3]``. The three largest entries lie in the three
    tokens with the largest per-token maximum, so one cheap max over d and a top-k over 3 x d entries
    replace a top-k over pos x d (5x faster here on a 64 x 576 sequence).
    """
    b, t, d = a.shape
    k = min(3, t)
    tok = a.amax(dim=-1).topk(k, dim=1).indices  # [batch, k] candidate tokens
    cand = a.gather(1, tok[..., None].expand(b, k, d))  # [batch, k, d]
    top = cand.flatten(1).topk(min(3, k * d), dim=1)  # over k*d entries
    return top.values, tok.gather(1, top.indices // d), top.indices % d


def massive_mask(h: torch.Tensor, threshold: float = 100.0, ratio: float = 1000.0,
                 median: torch.Tensor | None = None) -> torch.Tensor:
    """Massive activations (Sun et al.): |h| > threshold and > ratio x the median |h| of each sequence.

    h: ``[batch, pos, d_model]``; ``median``: ``[batch]`` median |h| when already known. Returns a bool mask
    of the same shape as h.
    """
    a = h.float().abs()
    med = row_median(a.flatten(1)) if median is None else median  # [batch]
    return (a > threshold) & (a > ratio * med[:, None, None])


def outlier_share(x: torch.Tensor, k: int = 3, centered: bool = False) -> torch.Tensor:
    """Share of the squared divisor carried by the top-1..k dims of each token.

    x: ``[batch, pos, d]`` a norm site's input. Returns ``[batch, pos, k]``: column j is the share of
    sum(x^2) (of the centred x for LayerNorm) in the j+1 largest |x| dims. With r = |x_top| / ||x||, the
    non-outlier dims are scaled down by sqrt(1 - r^2) relative to a norm without the outlier.
    """
    return site_outliers(x, k, centered, eps=0.0)[1]


def site_outliers(x: torch.Tensor, k: int, centered: bool, eps: float
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Everything the outlier analysis needs from a norm site's input, in one pass over it.

    x: ``[batch, pos, d]``. Returns the divisor ``[batch, pos]`` (std or RMS with eps, as
    :func:`normscope.core.sites.norm_divisor`), the top-1..k share of the squared divisor ``[batch, pos, k]`` (as
    :func:`outlier_share`) and the dim of largest |x| per token ``[batch, pos]``.
    """
    x = x.float()
    if centered:
        x = x - x.mean(dim=-1, keepdim=True)
    sq = x.pow(2)  # [batch, pos, d]
    total = sq.sum(dim=-1)  # [batch, pos]
    top = sq.topk(k, dim=-1)  # values/indices [batch, pos, k]
    share = top.values.cumsum(dim=-1) / total.unsqueeze(-1).clamp_min(1e-30)
    divisor = torch.sqrt(total / x.shape[-1] + eps)
    return divisor, share, top.indices[..., 0]


# ---- reducers ------------------------------------------------------------------------------------------
class AttentionSinkReducer:
    """Per layer: sum of alpha_k per head and key, sink counts per category, and the tokens that act as sinks."""

    def __init__(self, layer: int, eps: float, causal: bool, min_queries: int) -> None:
        self.layer, self.eps, self.causal, self.min_queries = layer, eps, causal, min_queries
        self.alpha_sum: torch.Tensor | None = None  # [head, key] float64
        self.n_seq = 0
        self.above: torch.Tensor | None = None  # [head] count of sequences with alpha_1 > eps
        self.cat_n: Counter[str] = Counter()
        self.cat_above: Counter[str] = Counter()
        self.tokens = SinkTokens(causal, eps, min_queries)  # (pos class, token id) -> count

    def update(self, pattern: torch.Tensor, ctx: BatchContext) -> None:
        alpha = sink_scores(pattern, self.causal)  # [batch, head, key]
        b, h, t = alpha.shape
        if self.alpha_sum is None:
            self.alpha_sum = torch.zeros(h, t, dtype=torch.float64)
            self.above = torch.zeros(h, dtype=torch.float64)
        self.alpha_sum += alpha.double().sum(0).cpu()
        first = alpha[:, :, 0] > self.eps  # [batch, head]
        assert self.above is not None
        self.above += first.double().sum(0).cpu()
        self.n_seq += b
        for cat, row in zip(ctx.categories, first.cpu(), strict=True):
            self.cat_n[cat] += h
            self.cat_above[cat] += int(row.sum())
        self.tokens.add(alpha, ctx.input_ids)

    def alpha_mean(self) -> torch.Tensor:
        """``[head, key]`` mean alpha_k over sequences."""
        assert self.alpha_sum is not None
        return self.alpha_sum / max(self.n_seq, 1)


class ResidualReducer:
    """Per layer: mean top-1/2/3 and median |h| per sequence, mean |h| per dim, and massive activations."""

    def __init__(self, layer: int, threshold: float, ratio: float, max_entries: int = 20000) -> None:
        self.layer, self.threshold, self.ratio, self.max_entries = layer, threshold, ratio, max_entries
        self.n_seq = 0
        self.top_sum = torch.zeros(3, dtype=torch.float64)
        self.median_sum = 0.0
        self.abs_sum: torch.Tensor | None = None  # [d_model]
        self.n_tok = 0
        # (dim, position) -> [count, max |h|, signed value at max, token at max]
        self.massive: dict[tuple[int, int], list[Any]] = {}
        self.massive_value_sum: Counter[int] = Counter()  # dim -> sum of signed massive values
        self.massive_count: Counter[int] = Counter()
        self.top1_where: Counter[tuple[int, int]] = Counter()  # (dim, position) of each sequence's top-1 |h|

    def update(self, h: torch.Tensor, ctx: BatchContext) -> None:
        a = h.float().abs()  # [batch, pos, d_model]
        flat = a.flatten(1)  # [batch, pos*d_model]
        top_vals, top_pos, top_dim = top3_entries(a)  # [batch, 3] each
        self.top_sum += top_vals.double().sum(0).cpu()
        for dim, pos in zip(top_dim[:, 0].tolist(), top_pos[:, 0].tolist(), strict=True):
            self.top1_where[(dim, pos)] += 1
        med = row_median(flat)  # [batch]
        self.median_sum += float(med.double().sum())
        self.n_seq += h.shape[0]
        s = a.sum(dim=(0, 1)).double().cpu()  # [d_model]
        self.abs_sum = s if self.abs_sum is None else self.abs_sum + s
        self.n_tok += h.shape[0] * h.shape[1]
        bar = torch.clamp(self.ratio * med.to(a.device), min=self.threshold)  # [batch]
        if not bool((top_vals[:, 0] > bar).any()):  # no sequence's top-1 passes: nothing is massive
            return
        mask = a > bar[:, None, None]  # massive_mask, median reused
        ids = ctx.input_ids
        for bi, pos, dim in mask.nonzero().tolist():
            v = float(h[bi, pos, dim])
            self.massive_value_sum[dim] += v
            self.massive_count[dim] += 1
            key = (dim, pos)
            e = self.massive.get(key)
            if e is None:
                if len(self.massive) >= self.max_entries:
                    continue
                self.massive[key] = [1, abs(v), v, int(ids[bi, pos])]
            else:
                e[0] += 1
                if abs(v) > e[1]:
                    e[1:] = [abs(v), v, int(ids[bi, pos])]

    @property
    def top(self) -> list[float]:
        return (self.top_sum / max(self.n_seq, 1)).tolist()

    @property
    def median(self) -> float:
        return self.median_sum / max(self.n_seq, 1)

    def top1_location(self) -> tuple[int, int, float]:
        """(dim, position) that most often holds a sequence's top-1 |h|, and how often (0..1)."""
        (dim, pos), n = self.top1_where.most_common(1)[0]
        return dim, pos, n / max(self.n_seq, 1)

    def massive_dims(self) -> list[int]:
        return sorted(self.massive_count, key=lambda d: -self.massive_count[d])


class OutlierReducer:
    """Per norm site: divisor of position 0 vs ordinary tokens, and the share of it carried by the top dims."""

    def __init__(self, site: Any, k: int) -> None:
        self.site, self.k = site, k
        self.n = {"first": 0, "rest": 0}
        self.div = {"first": 0.0, "rest": 0.0}
        self.share = {"first": torch.zeros(k, dtype=torch.float64), "rest": torch.zeros(k, dtype=torch.float64)}
        self.shrink = {"first": 0.0, "rest": 0.0}  # sum of sqrt(1 - r^2), r = |x_top1| / ||x||
        self.top_dim: torch.Tensor | None = None  # [d] how often each dim is a token's largest

    def update(self, x: torch.Tensor, ctx: BatchContext) -> None:
        div, share, top_dim = site_outliers(x, self.k, self.site.centered, self.site.eps)  # [b, p], [b, p, k]
        counts = torch.bincount(top_dim.flatten(), minlength=x.shape[-1]).cpu()  # [d]
        self.top_dim = counts if self.top_dim is None else self.top_dim + counts
        shrink = torch.sqrt((1 - share[..., 0]).clamp_min(0))  # [batch, pos]
        for key, sl in (("first", slice(0, 1)), ("rest", slice(1, None))):
            self.n[key] += div[:, sl].numel()
            self.div[key] += float(div[:, sl].double().sum())
            self.share[key] += share[:, sl].double().sum(dim=(0, 1)).cpu()
            self.shrink[key] += float(shrink[:, sl].double().sum())

    def row(self) -> dict[str, Any]:
        out: dict[str, Any] = {"site": self.site.name, "layer": self.site.layer, "role": self.site.role}
        for key in ("first", "rest"):
            n = max(self.n[key], 1)
            out[f"divisor_{key}"] = self.div[key] / n
            for j in range(self.k):
                out[f"top{j + 1}_share_{key}"] = float(self.share[key][j]) / n
            out[f"shrink_{key}"] = self.shrink[key] / n
        out["divisor_ratio_first_to_rest"] = out["divisor_first"] / max(out["divisor_rest"], 1e-30)
        dim, cnt = (int(self.top_dim.argmax()), int(self.top_dim.max())) if self.top_dim is not None else (-1, 0)
        out["top_dim"] = dim
        out["top_dim_frequency"] = cnt / max(self.n["first"] + self.n["rest"], 1)
        return out


# ---- interventions for the causal checks --------------------------------------------------------------
def _set_massive(dims: list[int], value: dict[int, float] | None, threshold: float, ratio: float):
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

    Edits the additive attention mask that the attention modules receive (eager attention).
    """

    def pre(module: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
        h = kwargs.get("hidden_states", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        b, t = h.shape[0], h.shape[1]
        if mask is None or mask.ndim != 4:
            mask = torch.zeros(b, 1, t, t, dtype=h.dtype, device=h.device)
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
    model, tok, info = lm.model, lm.tokenizer, lm.info
    layout = ctx.layout
    sites = ctx.sites
    causal = info.is_causal
    if opts.ablate and not causal:
        raise NormscopeError("--ablate measures next-token loss, so it needs a causal LM; drop --ablate for encoders.")
    cap = Capture(model, layout, sites)
    attn = {b.index: cap.add(f"blocks.{b.index}.attn.hook_pattern",
                             AttentionSinkReducer(b.index, opts.eps, causal, opts.min_queries))
            for b in layout.blocks if b.attn is not None}
    resid = {b.index: cap.add(f"blocks.{b.index}.hook_resid_post",
                              ResidualReducer(b.index, opts.massive_threshold, opts.massive_ratio))
             for b in layout.blocks}
    outl = {s.name: cap.add(f"{s.name}.hook_in", OutlierReducer(s, opts.top_k)) for s in sites}
    loss = LossMeter() if opts.ablate else None  # the ablations' baseline; 6% of a pass otherwise
    n_passes = 1 + (3 if opts.ablate else 0)
    total = sample.n_tokens * n_passes
    with _task(progress, "sinks", total) as advance, cap:
        cap.run(sample.iter_batches(), on_output=loss, progress=advance)
        nonfinite = cap.nonfinite_report()  # of the measuring pass only, not of the ablations' edited passes
        cap.remove()
        cap.clear()
        ablations = _ablate(cap, layout, resid, sample, opts, loss, advance) if opts.ablate else []

    result = _build_result(lm, sample, opts, layout, attn, resid, outl, loss, ablations, tok)
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


def _tok_str(tok: Any, token_id: int) -> str:
    try:
        return tok.decode([token_id])
    except Exception:
        return str(token_id)


def _build_result(lm: Any, sample: Any, opts: SinksOptions, layout: Any, attn: dict[int, AttentionSinkReducer],
                  resid: dict[int, ResidualReducer], outl: dict[str, OutlierReducer], loss: LossMeter | None,
                  ablations: list[dict[str, Any]], tok: Any) -> Result:
    info = lm.info
    # heads
    head_rows = []
    for layer, r in sorted(attn.items()):
        am = r.alpha_mean()  # [head, key]
        assert r.above is not None
        for h in range(am.shape[0]):
            top_k = int(am[h, 1:].argmax()) + 1 if am.shape[1] > 1 else 0
            head_rows.append({"layer": layer, "head": h, "label": f"L{layer}H{h}", "alpha1": float(am[h, 0]),
                              "sink_rate": 100.0 * float(r.above[h]) / max(r.n_seq, 1),
                              "strongest_later_position": top_k, "alpha_later_max": float(am[h, top_k])})
    heads = pd.DataFrame(head_rows)
    # layers
    layer_rows = []
    for b in layout.blocks:
        i = b.index
        a, rr = attn.get(i), resid[i]
        sr = 100.0 * float(a.above.sum()) / max(a.n_seq * a.above.numel(), 1) if a and a.above is not None else None
        t_dim, t_pos, t_freq = rr.top1_location()
        layer_rows.append({"layer": i, "sink_rate": sr,
                           "alpha1_mean": float(a.alpha_mean()[:, 0].mean()) if a and a.alpha_sum is not None else None,
                           "top1_abs": rr.top[0], "top2_abs": rr.top[1], "top3_abs": rr.top[2],
                           "median_abs": rr.median, "top1_to_median": rr.top[0] / max(rr.median, 1e-30),
                           "top1_dim": t_dim, "top1_position": t_pos, "top1_frequency": t_freq,
                           "massive_dims": rr.massive_dims()[:8]})
    layers = pd.DataFrame(layer_rows)
    n_cells = sum(a.n_seq * (a.above.numel() if a.above is not None else 0) for a in attn.values())
    overall = 100.0 * sum(float(a.above.sum()) for a in attn.values() if a.above is not None) / max(n_cells, 1)
    cats: Counter[str] = Counter()
    cats_above: Counter[str] = Counter()
    for a in attn.values():
        cats.update(a.cat_n)
        cats_above.update(a.cat_above)
    by_category = {c: 100.0 * cats_above[c] / cats[c] for c in sorted(cats)}
    # massive activations: per layer, per (dim, position), the largest
    mrows = []
    for i, rr in sorted(resid.items()):
        for (dim, pos), (count, mx, val, tid) in sorted(rr.massive.items(), key=lambda kv: -kv[1][1])[:10]:
            mrows.append({"layer": i, "dim": dim, "position": pos, "token": _tok_str(tok, tid), "value": val,
                          "abs": mx, "count": count})
    massive = pd.DataFrame(mrows, columns=["layer", "dim", "position", "token", "value", "abs", "count"])
    # residual-sink dims: mean |h| over tokens and layers
    abs_tot = sum(rr.abs_sum for rr in resid.values() if rr.abs_sum is not None)
    n_tok = sum(rr.n_tok for rr in resid.values())
    h_avg = abs_tot / max(n_tok, 1)
    order = torch.argsort(h_avg, descending=True)[:10].tolist()
    med = float(h_avg.median())
    dims_df = pd.DataFrame([{"dim": d, "mean_abs": float(h_avg[d]), "ratio_to_median_dim": float(h_avg[d]) / med}
                            for d in order])
    # sink tokens
    tcount: Counter[tuple[str, int]] = Counter()
    for a in attn.values():
        tcount.update(a.tokens.counts)
    total_hits = sum(tcount.values()) or 1
    tok_rows = [{"position": pc, "token": _tok_str(tok, tid), "token_id": tid, "count": c, "share": c / total_hits}
                for (pc, tid), c in tcount.most_common(25)]
    sink_tokens = pd.DataFrame(tok_rows, columns=["position", "token", "token_id", "count", "share"])
    sites_df = pd.DataFrame([r.row() for r in outl.values()])
    abl_df = pd.DataFrame(ablations)

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
    summary = _summary(info, sample, opts, overall, by_category, layers, all_massive_dims, massive, sites_df, ablations)
    figures = _figures(heads, layers, massive, sites_df, by_category, sample, opts, info)
    tables = {"layers": layers, "heads": heads, "massive_activations": massive, "residual_dims": dims_df,
              "sink_tokens": sink_tokens, "sites": sites_df}
    if len(abl_df):
        tables["ablations"] = abl_df
    return Result(
        analysis="sinks",
        title="Attention and residual sinks",
        meta=build_meta(lm, sample, **{k: v for k, v in opts.__dict__.items()}),
        payload=payload,
        tables=tables,
        axes=AXES,
        labels=LABELS,
        figures=figures,
        headlines=headlines,
        summary=summary,
        references=REFERENCES,
    )


def _summary(info: Any, sample: Any, opts: SinksOptions, overall: float, by_cat: dict[str, float],
             layers: pd.DataFrame, dims: list[int], massive: pd.DataFrame, sites_df: pd.DataFrame,
             ablations: list[dict[str, Any]]) -> list[str]:
    out = []
    sr = layers["sink_rate"].dropna()
    third = max(len(sr) // 3, 1)
    out.append(
        f"{overall:.1f}% of (sequence, layer, head) triples give the first token an average attention above "
        f"{opts.eps} (Sink_1^{opts.eps} at T = {sample.seq_len}; Gu et al. report 92-99% for Llama-family models "
        f"and 77% for GPT2-XL on natural text at T = 64). Per layer it goes from {sr.iloc[:third].mean():.1f}% in "
        f"the first third of the layers to {sr.iloc[-third:].mean():.1f}% in the last third."
    )
    if by_cat:
        parts = ", ".join(f"{c} {v:.1f}%" for c, v in by_cat.items())
        out.append(f"By kind of text: {parts}. Gu et al. find the rate lower on random tokens and, for Llama "
                   "models, zero on one repeated token.")
    if dims:
        top = massive.loc[massive["abs"].idxmax()]
        first = int(layers.loc[layers["massive_dims"].map(len) > 0, "layer"].min())
        out.append(
            f"Massive activations (|h| > {opts.massive_threshold:g} and > {opts.massive_ratio:g}x the median, Sun et "
            f"al. 2024) appear from layer {first} on in hidden dim(s) {', '.join(map(str, dims[:5]))}; the largest is "
            f"{top['value']:.0f} at position {int(top['position'])} (layer {int(top['layer'])}), against a median "
            f"|h| of {layers['median_abs'].median():.3f}."
        )
    else:
        out.append("No activation passes the massive-activation test (Sun et al. 2024) on this text.")
    if len(sites_df):
        worst = sites_df.sort_values("top1_share_first", ascending=False).iloc[0]
        out.append(
            f"Outlier-driven rescaling: at {worst['site']} one dim carries {100 * worst['top1_share_first']:.1f}% of "
            f"the squared divisor at position 0 (vs {100 * worst['top1_share_rest']:.1f}% for other tokens), and "
            f"position 0's divisor is {worst['divisor_ratio_first_to_rest']:.1f}x that of ordinary tokens: the "
            "outlier inflates the RMS and shrinks every other component of that token."
        )
    for r in ablations:
        out.append(f"Causal check, {r['intervention']}: loss {r['baseline_loss']:.3f} -> {r['loss']:.3f} "
                   f"({r['delta_loss']:+.3f} nats/token).")
    return out


def _figures(heads: pd.DataFrame, layers: pd.DataFrame, massive: pd.DataFrame, sites_df: pd.DataFrame,
             by_cat: dict[str, float], sample: Any, opts: SinksOptions, info: Any) -> list[Figure]:
    figs: list[Figure] = []
    if len(heads):
        n_l, n_h = int(heads["layer"].max()) + 1, int(heads["head"].max()) + 1
        grid = torch.full((n_l, n_h), math.nan)
        for r in heads.itertuples():
            grid[r.layer, r.head] = r.alpha1
        figs.append(Figure(
            "Sink score alpha_1 per layer and head",
            heatmap_layer_head(grid.numpy(), "alpha_1 (mean attention to position 0)", zlabel="alpha_1"),
            f"Bright cells are sink heads: on average they put more than {opts.eps} of their attention on the "
            "first token.",
        ))
        fig = go.Figure()
        fig.add_trace(go.Scatter(x=layers["layer"], y=layers["sink_rate"], mode="lines+markers", name="all text"))
        fig.update_layout(xaxis_title="layer", yaxis_title=f"Sink_1^{opts.eps} (%)", yaxis_range=[0, 100],
                          title=f"Sink rate per layer (T = {sample.seq_len})")
        figs.append(Figure("Sink rate per layer", fig,
                           "Look for the rise with depth: sinks form after the first few layers."))
    fig = go.Figure()
    for col, name in (("top1_abs", "top-1 |h|"), ("top2_abs", "top-2 |h|"), ("top3_abs", "top-3 |h|"),
                      ("median_abs", "median |h|")):
        fig.add_trace(go.Scatter(x=layers["layer"], y=layers[col], mode="lines+markers", name=name))
    if len(massive):
        top = massive.sort_values("abs", ascending=False).drop_duplicates("layer")
        fig.add_trace(go.Scatter(x=top["layer"], y=top["abs"], mode="text", text=[f"d{d}" for d in top["dim"]],
                                 textposition="top center", name="massive dim", showlegend=False))
    fig.update_layout(xaxis_title="layer", yaxis_title="|h| (log)", yaxis_type="log",
                      title="Residual stream magnitudes per layer (mean over sequences)")
    figs.append(Figure("Massive activations per layer", fig,
                       "A gap of three or more decades between the top-1 and the median marks a massive activation; "
                       "labels name its hidden dim."))
    if len(sites_df):
        fig = go.Figure()
        fig.add_trace(go.Bar(x=sites_df["site"], y=sites_df["top1_share_first"], name="position 0"))
        fig.add_trace(go.Bar(x=sites_df["site"], y=sites_df["top1_share_rest"], name="other positions"))
        fig.update_layout(barmode="group", xaxis_title="norm site", yaxis_title="share of divisor^2 in top-1 dim",
                          yaxis_range=[0, 1], title="Outlier share of the norm divisor per site")
        figs.append(Figure("Outlier share per norm site", fig,
                           "Where one dim carries most of the divisor, the norm shrinks every other dim of that "
                           "token (outlier-driven rescaling)."))
    return figs

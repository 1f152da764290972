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
* the loss change when one block is skipped (identity), per block (layer effectiveness);
* LayerNorm Scaling (Sun et al. 2025): each pre-norm output multiplied by 1/sqrt(l), l = layer index + 1,
  applied here at inference to a model that was NOT trained that way.

Cost: every statistic of a configuration (norms, variances, divisors, relative updates, angular distances,
loss) comes from ONE forward pass per batch. Skipping blocks costs one more forward pass per skipped block
per batch, the LayerNorm Scaling what-if one more, the dropped window one more.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

from normscope.analyses.base import RunContext
from normscope.analyses.depth.options import REFERENCES, DepthOptions
from normscope.core.capture import BatchContext, Capture
from normscope.core.errors import NormscopeError
from normscope.core.layers import parse_layers
from normscope.core.losses import LossMeter
from normscope.core.nonfinite import flag_nonfinite, nonfinite_warning
from normscope.core.progress import progress_task as _task
from normscope.core.text import TokenBatch
from normscope.report import Figure, Result, plot_text
from normscope.report.result import build_meta

CONTROL_CATEGORIES = ("random", "repeated")
PRE_NORM_ROLES = ("pre_attn", "pre_mlp")
DEEP_FRACTION = 0.4  # the summary line talks about the deepest 40% of blocks

AXES = {"layers": "point", "blocks": "block", "sites": "layer"}  # each per-depth table: its depth column
LABELS = {  # words for table and column names on pages and in compare
    "layers": "per residual point",
    "blocks": "per block",
    "sites": "per norm site",
    "point": "residual point",
    "block": "block",
    "norm_rest": "residual L2 norm, positions > 0",
    "norm_pos0": "residual L2 norm, position 0",
    "var_rest": "residual variance, positions > 0",
    "var_pos0": "residual variance, position 0",
    "rel_update": "relative update ||f(h)|| / ||h||",
    "rel_update_attn": "relative update of attention",
    "rel_update_mlp": "relative update of the MLP",
    "skip_delta_loss": "loss change when the block is skipped",
    "skip_loss": "loss with the block skipped",
    "angular_to_next": "angular distance to the next block",
    "divisor_rest": "norm divisor, positions > 0",
    "divisor_pos0": "norm divisor, position 0",
    "out_var_rest": "norm output variance, positions > 0",
    "lns_norm_rest": "LNS what-if: residual norm, positions > 0",
    "nonfinite_points": "hook points with inf/NaN",
}


# ---- pure metric functions -----------------------------------------------------------------------------
def token_l2(h: torch.Tensor) -> torch.Tensor:
    """L2 norm of each token's vector. h: ``[batch, pos, d]``; returns ``[batch, pos]`` float32."""
    return h.float().norm(dim=-1)


def token_variance(h: torch.Tensor) -> torch.Tensor:
    """Variance over the hidden dims of each token (population variance, as Sun et al. 2025 plot it).

    h: ``[batch, pos, d]`` or ``[batch, pos, heads, d_head]`` (qk-norm sites: averaged over heads).
    Returns ``[batch, pos]`` float32.
    """
    v = h.float().var(dim=-1, unbiased=False)
    while v.ndim > 2:
        v = v.mean(dim=-1)
    return v


def per_token(v: torch.Tensor) -> torch.Tensor:
    """Collapse trailing dims of a per-token quantity (a divisor ``[batch, pos, 1]`` or ``[b, p, heads, 1]``)."""
    v = v.float()
    while v.ndim > 2:
        v = v.mean(dim=-1)
    return v


def as_tokens(x: torch.Tensor, ctx: BatchContext) -> torch.Tensor:
    """View a hook tensor as ``[batch, pos, ...]``: some models (OPT) flatten tokens to ``[batch*pos, d]``."""
    b, t = ctx.attention_mask.shape
    if x.ndim == 2 and x.shape[0] == b * t and (b, t) != tuple(x.shape):
        return x.reshape(b, t, x.shape[-1])
    return x


def relative_update(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """||after - before|| / ||before|| per token (the relative update of a block, Sun et al. 2025).

    before, after: ``[batch, pos, d]``; returns ``[batch, pos]`` float32.
    """
    b = before.float()
    return (after.float() - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-30)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real (mask 1) token of each row, so a pad is never read (left or right padding).

    attention_mask: ``[batch, pos]``; returns ``[batch]`` long (0 for an all-pad row).
    """
    pos = torch.arange(attention_mask.shape[1], device=attention_mask.device)  # [pos]
    return torch.where(attention_mask.bool(), pos, torch.zeros_like(pos)).max(dim=1).values


def angular_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """arccos(cos(a, b)) / pi over the last dim, in [0, 1] (Gromov et al. 2024). Computed in float64."""
    a, b = a.double(), b.double()
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-300)
    return torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi


def angular_distance_matrix(vecs: torch.Tensor) -> torch.Tensor:
    """Angular distance between every pair of layers, per sequence (Gromov et al. 2024).

    vecs: ``[batch, n_points, d]`` the last token's residual stream at each layer. Returns
    ``[batch, n_points, n_points]`` float64, symmetric, zero on the diagonal.
    """
    v = vecs.double()
    u = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-300)  # [batch, P, d]
    cos = (u @ u.transpose(1, 2)).clamp(-1.0, 1.0)  # [batch, P, P]
    dist = torch.arccos(cos) / math.pi
    eye = torch.eye(dist.shape[-1], dtype=torch.bool, device=dist.device)
    return dist.masked_fill(eye, 0.0)


def best_windows(dist: np.ndarray | torch.Tensor) -> pd.DataFrame:
    """For every window size n, the start l minimising d(h_l, h_{l+n}) (Gromov et al.'s block to drop).

    dist: ``[L+1, L+1]`` mean angular distances between residual points (0 = embeddings, l = after block
    l - 1). Dropping blocks l .. l+n-1 joins h_l to h_{l+n}. Returns rows (n, start, end, distance); a window
    size whose distances are all NaN (inf/NaN activations, which the report flags) has no row.
    """
    d = np.asarray(dist, dtype=float)
    n_points = d.shape[0]
    rows = []
    for n in range(1, n_points):
        diag = np.array([d[i, i + n] for i in range(n_points - n)])
        if np.isnan(diag).all():
            continue
        start = int(np.nanargmin(diag))
        rows.append({"n": n, "start": start, "end": start + n - 1, "distance": float(diag[start])})
    return pd.DataFrame(rows, columns=["n", "start", "end", "distance"])


@dataclass
class GrowthFit:
    """Power law and exponential fits of a per-layer quantity against depth (least squares in log space)."""

    exponent: float  # p in y ~ (l + 1)^p
    power_r2: float
    rate: float  # r in y ~ exp(r * l); growth factor per layer = exp(r)
    exp_r2: float
    better: str  # "power law" or "exponential"

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _r2(y: np.ndarray, pred: np.ndarray) -> float:
    ss_res = float(((y - pred) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")


def fit_growth(depth: np.ndarray | list[float], values: np.ndarray | list[float]) -> GrowthFit:
    """Fit log(y) = a + p log(l + 1) (power law) and log(y) = a + r l (exponential); report both with R^2.

    depth: layer indices l >= 0 (0 = embeddings); values: positive numbers (e.g. the mean residual norm).
    Non-positive or non-finite values are left out; when inf/NaN values (an overflow, which the report flags)
    leave fewer than three layers, every field is NaN. R^2 is measured on log(y).
    """
    x = np.asarray(depth, dtype=float)
    y = np.asarray(values, dtype=float)
    ok = np.isfinite(y) & (y > 0) & np.isfinite(x)
    x, ly = x[ok], np.log(y[ok])
    if len(x) < 3 and len(y) >= 3 and not np.isfinite(y).all():
        return GrowthFit(math.nan, math.nan, math.nan, math.nan, "neither (inf/NaN values)")
    if len(x) < 3:
        raise NormscopeError("A growth law needs at least three layers with positive values; use a deeper model.")
    p, a = np.polyfit(np.log(x + 1.0), ly, 1)
    r, b = np.polyfit(x, ly, 1)
    pr2 = _r2(ly, a + p * np.log(x + 1.0))
    er2 = _r2(ly, b + r * x)
    return GrowthFit(float(p), pr2, float(r), er2, "power law" if pr2 >= er2 else "exponential")


def lns_factor(layer: int) -> float:
    """LayerNorm Scaling (Sun et al. 2025): the pre-norm output of block ``layer`` (0-based) times 1/sqrt(l + 1)."""
    return 1.0 / math.sqrt(layer + 1)


# ---- reducers ------------------------------------------------------------------------------------------
class _Call:
    """Adapter: a reducer whose ``update`` is a given function (one object feeding several hook points)."""

    def __init__(self, fn: Callable[[torch.Tensor, BatchContext], None]) -> None:
        self.update = fn


class BatchMoments:
    """Running count, mean and variance of many per-token quantities, position 0 and the rest kept apart.

    Hooks ``put`` one ``[batch, pos]`` tensor per quantity; :meth:`flush` (once per batch, after the forward
    pass) stacks the batch's ``[K, batch, pos]`` values and folds them into float64 sums with a handful of
    ops, so the cost does not grow with the number of reductions per hook. Nothing outlives the batch.
    """

    def __init__(self) -> None:
        self.names: list[str] = []
        self._cur: dict[int, torch.Tensor] = {}
        self.n = torch.zeros(0, 2, dtype=torch.float64)  # [K, (pos0, rest)]
        self.s = torch.zeros(0, 2, dtype=torch.float64)
        self.s2 = torch.zeros(0, 2, dtype=torch.float64)

    def slot(self, name: str) -> Slot:
        self.names.append(name)
        k = len(self.names)
        self.n, self.s, self.s2 = (torch.zeros(k, 2, dtype=torch.float64) for _ in range(3))
        return Slot(self, k - 1)

    def put(self, k: int, v: torch.Tensor) -> None:
        self._cur[k] = v.detach()  # [batch, pos]

    def flush(self, attention_mask: torch.Tensor) -> None:
        """Fold the current batch into the sums. attention_mask: ``[batch, pos]``; pads are left out."""
        if not self._cur:
            return
        idx = torch.tensor(sorted(self._cur))
        v = torch.stack([self._cur[int(k)].to(attention_mask.device) for k in idx]).double()  # [k, batch, pos]
        w = attention_mask.bool().unsqueeze(0)  # [1, batch, pos]
        v = torch.where(w, v, torch.zeros((), dtype=v.dtype, device=v.device))
        sums = torch.stack([v[:, :, 0].sum(1), v[:, :, 1:].sum((1, 2))], dim=1).cpu()  # [k, 2]
        sq = v.square()
        sums2 = torch.stack([sq[:, :, 0].sum(1), sq[:, :, 1:].sum((1, 2))], dim=1).cpu()
        counts = torch.tensor([float(w[0, :, 0].sum()), float(w[0, :, 1:].sum())], dtype=torch.float64)
        self.n.index_add_(0, idx, counts.expand(len(idx), 2).contiguous())
        self.s.index_add_(0, idx, sums)
        self.s2.index_add_(0, idx, sums2)
        self._cur = {}


@dataclass
class Slot:
    """One quantity of a :class:`BatchMoments`: ``mean(key)``, ``var(key)``, ``n[key]`` with key pos0 / rest."""

    owner: BatchMoments
    k: int

    @property
    def n(self) -> dict[str, float]:
        row = self.owner.n[self.k]
        return {"pos0": float(row[0]), "rest": float(row[1])}

    def mean(self, key: str = "rest") -> float:
        j = 0 if key == "pos0" else 1
        n = float(self.owner.n[self.k, j])
        return float(self.owner.s[self.k, j]) / n if n else float("nan")

    def var(self, key: str = "rest") -> float:
        j = 0 if key == "pos0" else 1
        n = float(self.owner.n[self.k, j])
        if not n:
            return float("nan")
        m = float(self.owner.s[self.k, j]) / n
        return max(float(self.owner.s2[self.k, j]) / n - m * m, 0.0)

    def put(self, v: torch.Tensor) -> None:
        self.owner.put(self.k, v)


class AngularAccumulator:
    """Sum over sequences of the angular-distance matrix between residual points, on the last real token.

    Per batch it holds the last token's vector at each point (``[batch, d]`` per point, for that batch only)
    and folds the ``[P, P]`` matrix into a float64 sum once all points of the batch have been seen.
    """

    def __init__(self, n_points: int) -> None:
        self.n_points = n_points
        self.sum = torch.zeros(n_points, n_points, dtype=torch.float64)
        self.n = 0
        self._batch: int | None = None
        self._cur: dict[int, torch.Tensor] = {}

    def add(self, point: int, h: torch.Tensor, ctx: BatchContext) -> None:
        if ctx.index != self._batch:
            self._batch, self._cur = ctx.index, {}
        idx = last_token_index(ctx.attention_mask).to(h.device)  # [batch]
        self._cur[point] = h[torch.arange(h.shape[0], device=h.device), idx].double().cpu()  # [batch, d]
        if len(self._cur) == self.n_points:
            vecs = torch.stack([self._cur[p] for p in range(self.n_points)], dim=1)  # [batch, P, d]
            self.sum += angular_distance_matrix(vecs).sum(0)
            self.n += vecs.shape[0]
            self._cur = {}

    def mean(self) -> torch.Tensor:
        """``[P, P]`` mean angular distance over sequences."""
        return self.sum / max(self.n, 1)


class ResidualStats:
    """Per residual point: moments of the token L2 norm and variance (position 0 apart), and the last token."""

    def __init__(self, point: int, angular: AngularAccumulator, moments: BatchMoments) -> None:
        self.point, self.angular = point, angular
        self.norm = moments.slot(f"resid.{point}.norm")
        self.var = moments.slot(f"resid.{point}.var")

    def update(self, h: torch.Tensor, ctx: BatchContext) -> None:
        self.norm.put(token_l2(h))  # h: [batch, pos, d_model] -> [batch, pos]
        self.var.put(token_variance(h))
        self.angular.add(self.point, h, ctx)


class SiteStats:
    """Per norm site: moments of its divisor (``hook_scale``) and of its output variance (``hook_out``)."""

    def __init__(self, site: Any, moments: BatchMoments) -> None:
        self.site = site
        self.divisor = moments.slot(f"{site.name}.divisor")
        self.out_var = moments.slot(f"{site.name}.out_var")

    def on_scale(self, d: torch.Tensor, ctx: BatchContext) -> None:
        self.divisor.put(per_token(as_tokens(d, ctx)))  # [batch, pos, 1] (or [b, p, heads, 1]) -> [batch, pos]

    def on_out(self, y: torch.Tensor, ctx: BatchContext) -> None:
        self.out_var.put(token_variance(as_tokens(y, ctx)))  # [batch, pos, d] -> [batch, pos]


class BlockUpdate:
    """Relative update of one block, total and split into its attention and MLP parts.

    With h = the block's input, m = the residual stream between attention and MLP, h' = its output:
    total = ||h' - h|| / ||h||, attention = ||m - h|| / ||h||, MLP = ||h' - m|| / ||h|| (all relative to the
    block's input, so the two parts are comparable with the total). Where m comes from:

    * ``pre_ln``: the input of the pre-MLP norm (``ln2.hook_in``) in sequential pre-norm blocks (Llama,
      GPT-2, Gemma2's sandwich); when that input equals h the block is parallel (GPT-NeoX) and m = h + attn out;
    * ``post_ln``: the output of the post-attention LayerNorm (BERT, post-LN OPT): the parts then include
      the renormalisation, since the post-LN stream is re-normalised after each sub-layer;
    * ``attn_out``: h + the attention module's output (blocks with no separable pre-MLP norm).
    """

    def __init__(self, layer: int, mode: str, moments: BatchMoments) -> None:
        self.layer, self.mode = layer, mode
        self.total = moments.slot(f"blocks.{layer}.rel_update")
        self.attn = moments.slot(f"blocks.{layer}.rel_update_attn")
        self.mlp = moments.slot(f"blocks.{layer}.rel_update_mlp")
        self.parallel = False
        self._pre: torch.Tensor | None = None
        self._ln2_in: torch.Tensor | None = None
        self._attn_out: torch.Tensor | None = None
        self._mid: torch.Tensor | None = None

    def on_pre(self, h: torch.Tensor, ctx: BatchContext) -> None:
        self._pre, self._ln2_in, self._attn_out, self._mid = h, None, None, None

    def on_ln2_in(self, x: torch.Tensor, ctx: BatchContext) -> None:
        self._ln2_in = as_tokens(x, ctx)

    def on_attn_out(self, x: torch.Tensor, ctx: BatchContext) -> None:
        self._attn_out = as_tokens(x, ctx)

    def on_mid(self, x: torch.Tensor, ctx: BatchContext) -> None:
        self._mid = as_tokens(x, ctx)

    def on_post(self, h_out: torch.Tensor, ctx: BatchContext) -> None:
        pre = self._pre
        if pre is None:
            return
        mid = self._mid
        if self.mode == "pre_ln" and self._ln2_in is not None and not torch.equal(self._ln2_in, pre):
            mid = self._ln2_in
        elif self.mode in ("pre_ln", "attn_out") and self._attn_out is not None:
            self.parallel = self.mode == "pre_ln"
            mid = pre.float() + self._attn_out.float()
        denom = pre.float().norm(dim=-1).clamp_min(1e-30)  # [batch, pos]
        self.total.put((h_out.float() - pre.float()).norm(dim=-1) / denom)
        if mid is not None:
            self.attn.put((mid.float() - pre.float()).norm(dim=-1) / denom)
            self.mlp.put((h_out.float() - mid.float()).norm(dim=-1) / denom)
        self._pre = self._ln2_in = self._attn_out = self._mid = None


def _block_mode(b: Any, sites_in_block: dict[str, Any]) -> str:
    roles = {s.role for s in sites_in_block.values()}
    if "pre_mlp" in roles:
        return "pre_ln"
    if "post_attn" in roles and "pre_attn" not in roles:
        return "post_ln"
    return "attn_out"


@dataclass
class PassStats:
    """Everything one statistics pass collected (one configuration of the model)."""

    label: str
    residual: list[ResidualStats]
    sites: dict[str, SiteStats]
    blocks: dict[int, BlockUpdate]
    angular: AngularAccumulator
    loss: LossMeter | None
    moments: BatchMoments
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def _register_stats(cap: Capture, layout: Any, sites: list[Any], label: str, causal: bool) -> PassStats:
    """Add every depth reducer of one pass to ``cap``: all of them are fed by the same forward pass."""
    n_points = layout.n_layers + 1
    angular = AngularAccumulator(n_points)
    moments = BatchMoments()
    residual = [ResidualStats(p, angular, moments) for p in range(n_points)]
    cap.add(f"blocks.{layout.blocks[0].index}.hook_resid_pre", residual[0])
    for k, b in enumerate(layout.blocks):
        cap.add(f"blocks.{b.index}.hook_resid_post", residual[k + 1])
    site_stats: dict[str, SiteStats] = {}
    for s in sites:
        st = SiteStats(s, moments)
        cap.add(f"{s.name}.hook_scale", _Call(st.on_scale))
        cap.add(f"{s.name}.hook_out", _Call(st.on_out))
        site_stats[s.name] = st
    blocks: dict[int, BlockUpdate] = {}
    for b in layout.blocks:
        in_block = {s.name: s for s in sites if s.layer == b.index}
        bu = BlockUpdate(b.index, _block_mode(b, in_block), moments)
        i = b.index
        cap.add(f"blocks.{i}.hook_resid_pre", _Call(bu.on_pre))
        if bu.mode == "pre_ln":
            ln2 = next(s for s in in_block.values() if s.role == "pre_mlp")
            cap.add(f"{ln2.name}.hook_in", _Call(bu.on_ln2_in))
        if bu.mode == "post_ln":
            ln1p = next(s for s in in_block.values() if s.role == "post_attn")
            cap.add(f"{ln1p.name}.hook_out", _Call(bu.on_mid))
        if bu.mode in ("pre_ln", "attn_out") and b.attn is not None:
            cap.add(f"blocks.{i}.attn.hook_out", _Call(bu.on_attn_out))
        cap.add(f"blocks.{i}.hook_resid_post", _Call(bu.on_post))
        blocks[i] = bu
    return PassStats(label, residual, site_stats, blocks, angular, LossMeter() if causal else None, moments)


def _end_of_batch(stats: PassStats) -> Callable[[Any, BatchContext], None]:
    """``on_output`` for Capture.run: fold the batch's per-token values, then score the loss."""

    def fn(out: Any, ctx: BatchContext) -> None:
        stats.moments.flush(ctx.attention_mask)
        if stats.loss is not None:
            stats.loss(out, ctx)

    return fn


def skip_interventions(cap: Capture, block_indices: list[int]) -> None:
    """Make each listed block the identity: its output becomes its input (``hook_resid_pre``).

    The block still runs (its hooks fire), so the cost is one full forward pass per configuration.
    """
    for i in block_indices:
        box: dict[str, torch.Tensor] = {}

        def stash(h: torch.Tensor, ctx: BatchContext, box: dict[str, torch.Tensor] = box) -> None:
            box["h"] = h

        def restore(h: torch.Tensor, ctx: BatchContext, box: dict[str, torch.Tensor] = box) -> torch.Tensor:
            return box.pop("h").to(h.dtype)

        cap.add(f"blocks.{i}.hook_resid_pre", _Call(stash))
        cap.intervene(f"blocks.{i}.hook_resid_post", restore)


def lns_interventions(cap: Capture, sites: list[Any]) -> list[str]:
    """LayerNorm Scaling at inference: multiply every pre-norm site's output by 1/sqrt(layer + 1)."""
    names = []
    for s in sites:
        if s.role in PRE_NORM_ROLES and s.layer is not None:
            f = lns_factor(s.layer)
            cap.intervene(f"{s.name}.hook_out", lambda x, ctx, f=f: x * f)
            names.append(s.name)
    return names


# ---- running -------------------------------------------------------------------------------------------
def _stats_pass(model: Any, layout: Any, sites: list[Any], batches: list[TokenBatch], label: str, causal: bool,
                progress: Any, task: str, lns: bool = False) -> PassStats:
    cap = Capture(model, layout, sites)
    stats = _register_stats(cap, layout, sites, label, causal)
    if lns:
        stats.extra["scaled_sites"] = lns_interventions(cap, sites)
    n_tok = sum(int(b.attention_mask.sum()) for b in batches)
    t0 = time.perf_counter()
    with _task(progress, task, n_tok) as adv, cap:
        cap.run(batches, on_output=_end_of_batch(stats), progress=adv)
    stats.seconds = time.perf_counter() - t0
    stats.extra["nonfinite"] = cap.nonfinite_report()
    return stats


def _loss_pass(model: Any, layout: Any, sites: list[Any], batches: list[TokenBatch], skip: list[int],
               advance: Callable[[float], None] | None = None) -> float:
    cap = Capture(model, layout, sites)
    skip_interventions(cap, skip)
    meter = LossMeter()
    with cap:
        cap.run(batches, on_output=meter, progress=advance)
    return meter.mean


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

    timings: dict[str, float] = {}
    base = _stats_pass(model, layout, sites, batches, "baseline", causal, progress, "depth statistics")
    timings["statistics pass (one forward per batch)"] = base.seconds
    lns = None
    if do_lns:
        lns = _stats_pass(model, layout, sites, batches, "LayerNorm Scaling", causal, progress,
                          "LayerNorm Scaling what-if", lns=True)
        timings["LayerNorm Scaling pass"] = lns.seconds

    skip_loss: dict[int, float] = {}
    if do_skip:
        t0 = time.perf_counter()
        with _task(progress, f"skip-one-block ({len(skip_layers)} blocks)", len(skip_layers)) as adv:
            for i in skip_layers:
                skip_loss[i] = _loss_pass(model, layout, sites, batches, [layout.blocks[i].index])
                if adv is not None:
                    adv(1)
        timings[f"skip-one-block ({len(skip_layers)} forward passes per batch)"] = time.perf_counter() - t0

    dist = base.angular.mean().numpy()
    windows = best_windows(dist)
    drop: dict[str, Any] | None = None
    if window and causal and (windows["n"] == window).any():
        row = windows.loc[windows["n"] == window].iloc[0]
        blocks = list(range(int(row["start"]), int(row["end"]) + 1))
        t0 = time.perf_counter()
        with _task(progress, f"drop {window} blocks", n_tok) as adv:
            loss = _loss_pass(model, layout, sites, batches, [layout.blocks[k].index for k in blocks], adv)
        timings[f"drop-window pass (n = {window})"] = time.perf_counter() - t0
        assert base.loss is not None
        drop = {"n": window, "start": int(row["start"]), "end": int(row["end"]), "distance": float(row["distance"]),
                "loss": loss, "delta_loss": loss - base.loss.mean}

    return _build_result(lm, sample, opts, layout, sites, base, lns, skip_loss, windows, drop, batches, n_tok,
                         timings)


# ---- result --------------------------------------------------------------------------------------------
def _layer_rows(stats: PassStats) -> list[dict[str, Any]]:
    rows = []
    for r in stats.residual:
        rows.append({"point": r.point, "where": "embeddings" if r.point == 0 else f"after block {r.point - 1}",
                     "norm_rest": r.norm.mean("rest"), "norm_pos0": r.norm.mean("pos0"),
                     "norm_rest_std": math.sqrt(r.norm.var("rest")) if r.norm.n["rest"] else float("nan"),
                     "var_rest": r.var.mean("rest"), "var_pos0": r.var.mean("pos0")})
    return rows


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
                  lns: PassStats | None, skip_loss: dict[int, float], windows: pd.DataFrame,
                  drop: dict[str, Any] | None, batches: list[TokenBatch], n_tok: int,
                  timings: dict[str, float]) -> Result:
    info = lm.info
    n_blocks = layout.n_layers
    layers = pd.DataFrame(_layer_rows(base))
    blocks = pd.DataFrame(_block_rows(base))
    sites_df = pd.DataFrame(_site_rows(base))
    base_loss = base.loss.mean if base.loss is not None else None
    if skip_loss:
        blocks["skip_loss"] = blocks["block"].map(skip_loss)
        blocks["skip_delta_loss"] = blocks["skip_loss"] - base_loss
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
        "lns": None if lns is None else {
            "loss": lns.loss.mean if lns.loss is not None else None,
            "scaled_sites": lns.extra.get("scaled_sites", []),
            "angular_distance": lns.angular.mean().tolist(),
            "note": "applied at inference to a model that was not trained with LayerNorm Scaling",
        },
    }
    post_ln = not any(s.role in PRE_NORM_ROLES for s in sites)
    summary = _summary(info, layers, blocks, growth_rest, base_loss, lns, drop, n_blocks, opts, sample, batches,
                       post_ln)
    figures = _figures(layers, blocks, sites_df, dist, windows, drop, growth_rest, lns is not None, base_loss)
    tables = {"layers": layers, "blocks": blocks, "sites": sites_df, "growth": growth, "windows": windows,
              "angular": angular_df}
    settings = {k: v for k, v in opts.__dict__.items()}
    result = Result(
        analysis="depth",
        title="Curse of depth: variance growth and layer effectiveness",
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
    flag_nonfinite(result, base.extra.get("nonfinite", []))
    lns_bad = lns.extra.get("nonfinite", []) if lns is not None else []
    result.payload["nonfinite_lns"] = lns_bad  # the what-if's own overflow, not the model's
    if lns_bad:
        result.summary.append("LayerNorm Scaling what-if: " + nonfinite_warning(
            lns_bad, "the scaled model overflows there, so its curves stop being meaningful from that point"
        ).replace("; rerun with --dtype float32.", "."))
    return result


def quotable_line(blocks: pd.DataFrame, n_blocks: int, fraction: float = DEEP_FRACTION) -> str:
    """The sentence a reader can quote: how much the deepest ``fraction`` of blocks change the stream,
    and (when measured) what skipping any one of them costs."""
    k = max(1, math.ceil(fraction * n_blocks))
    deep = blocks.sort_values("block").tail(k)
    upd = float(deep["rel_update"].max())
    line = (f"The deepest {round(100 * k / n_blocks)}% of blocks ({k} of {n_blocks}, blocks "
            f"{int(deep['block'].min())}-{int(deep['block'].max())}) change the residual stream of ordinary tokens "
            f"by at most {100 * upd:.1f}% each (median {100 * float(deep['rel_update'].median()):.1f}%)")
    if "skip_delta_loss" in deep and deep["skip_delta_loss"].notna().any():
        measured = deep.dropna(subset=["skip_delta_loss"])
        w = measured.loc[measured["skip_delta_loss"].idxmax()]
        who = "any one of them" if len(measured) == len(deep) else f"any one of the {len(measured)} measured"
        line += f"; skipping {who} costs at most {w['skip_delta_loss']:.3f} nats/token (block {int(w['block'])})"
    return line + "."


def _summary(info: Any, layers: pd.DataFrame, blocks: pd.DataFrame, g: GrowthFit, base_loss: float | None,
             lns: PassStats | None, drop: dict[str, Any] | None, n_blocks: int, opts: DepthOptions,
             sample: Any, batches: list[TokenBatch], post_ln: bool = False) -> list[str]:
    out = [quotable_line(blocks, n_blocks)]
    e, last = layers["norm_rest"].iloc[0], layers["norm_rest"].iloc[-2]
    ratio = (layers["norm_pos0"] / layers["norm_rest"]).max()
    out.append(
        f"Variance growth: the mean L2 norm of the residual stream at ordinary positions goes from {e:.2f} at the "
        f"embeddings to {last:.1f} before the last block and {layers['norm_rest'].iloc[-1]:.1f} after it; position 0 "
        f"reaches up to {ratio:.0f}x that. Norm ~ (l+1)^{g.exponent:.2f} (R^2 {g.power_r2:.3f}) against "
        f"norm ~ exp({g.rate:.3f} l) (R^2 {g.exp_r2:.3f}): "
        + (f"the {g.better} fits better." if max(g.power_r2, g.exp_r2) >= 0.5 else "neither law fits (R^2 < 0.5).")
        + (" This model normalises after each sub-layer (post-LN), so its stream cannot grow with depth; the Curse "
           "of Depth (Sun et al. 2025) concerns Pre-LN models." if post_ln else
           " Sun et al. 2025 (Curse of Depth) show that in Pre-LN models this growth makes deep blocks "
           "near-identity.")
    )
    if "skip_delta_loss" in blocks and blocks["skip_delta_loss"].notna().any():
        sk = blocks.dropna(subset=["skip_delta_loss"])
        w = sk.loc[sk["skip_delta_loss"].idxmax()]
        out.append(
            f"Layer effectiveness: skipping one block (identity) on this text raises the loss from {base_loss:.3f} by "
            f"{sk['skip_delta_loss'].median():.3f} nats/token at the median over {len(sk)} blocks; block "
            f"{int(w['block'])} is the costliest ({w['skip_delta_loss']:+.3f})."
        )
    if drop is not None:
        out.append(
            f"Gromov et al.'s rule picks blocks {drop['start']}-{drop['end']} as the cheapest window of {drop['n']} "
            f"to drop (angular distance {drop['distance']:.3f} between its input and output); dropping them all "
            f"changes the loss by {drop['delta_loss']:+.3f} nats/token (Gromov et al. see little degradation "
            "until about half the layers of large models are removed)."
        )
    if lns is not None:
        g2 = fit_growth(layers["point"], layers["lns_norm_rest"])
        loss_part = ""
        if lns.loss is not None and base_loss is not None:
            loss_part = f"; the loss goes from {base_loss:.3f} to {lns.loss.mean:.3f} nats/token"
        out.append(
            "What-if, LayerNorm Scaling (Sun et al. 2025): each pre-norm output is multiplied by 1/sqrt(l) at "
            "inference. This model was NOT trained that way, so this shows how its blocks react, not what a "
            f"model trained with LayerNorm Scaling would do. The norm before the last block becomes "
            f"{layers['lns_norm_rest'].iloc[-2]:.1f} (exponent {g2.exponent:.2f}){loss_part}. Sun et al. report "
            "perplexities Pre-LN vs LNS for models trained from scratch: LLaMA-130M 26.73 vs 25.76, 1B 17.02 vs 15.71."
        )
    dropped = sample.n_sequences - sum(len(b) for b in batches)
    if dropped:
        out.append(f"{dropped} control sequences (random or repeated tokens) of the built-in text were left out; "
                   "--include-controls keeps them.")
    return out


def _figures(layers: pd.DataFrame, blocks: pd.DataFrame, sites_df: pd.DataFrame, dist: np.ndarray,
             windows: pd.DataFrame, drop: dict[str, Any] | None, g: GrowthFit, has_lns: bool,
             base_loss: float | None) -> list[Figure]:
    figs: list[Figure] = []
    x = layers["point"].to_numpy()
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=x, y=layers["norm_rest"], mode="lines+markers", name="ordinary positions"))
    fig.add_trace(go.Scatter(x=x, y=layers["norm_pos0"], mode="lines+markers", name="position 0"))
    ok = layers["norm_rest"] > 0
    a = float(np.mean(np.log(layers.loc[ok, "norm_rest"]) - g.exponent * np.log(x[ok.to_numpy()] + 1.0)))
    fig.add_trace(go.Scatter(x=x, y=np.exp(a) * (x + 1.0) ** g.exponent, mode="lines", name="power-law fit",
                             line={"dash": "dot", "color": "grey"}))
    if has_lns:
        fig.add_trace(go.Scatter(x=x, y=layers["lns_norm_rest"], mode="lines+markers", name="LNS what-if, ordinary",
                                 line={"dash": "dash"}))
        fig.add_trace(go.Scatter(x=x, y=layers["lns_norm_pos0"], mode="lines+markers", name="LNS what-if, position 0",
                                 line={"dash": "dash"}))
    fig.update_layout(title="Residual stream L2 norm per layer", xaxis_title="layer (0 = embeddings, l = after "
                      "block l-1)", yaxis_title="mean L2 norm (log)", yaxis_type="log", template="plotly_white")
    figs.append(Figure("Residual norm per layer", fig,
                       f"The norm grows like (l+1)^{g.exponent:.2f}; position 0 sits far above the other tokens."))
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=x, y=layers["var_rest"], mode="lines+markers", name="ordinary positions"))
    fig.add_trace(go.Scatter(x=x, y=layers["var_pos0"], mode="lines+markers", name="position 0"))
    if has_lns:
        fig.add_trace(go.Scatter(x=x, y=layers["lns_var_rest"], mode="lines+markers", name="LNS what-if, ordinary",
                                 line={"dash": "dash"}))
    fig.update_layout(title="Residual stream variance per layer (over hidden dims)", xaxis_title="layer",
                      yaxis_title="variance (log)", yaxis_type="log", template="plotly_white")
    figs.append(Figure("Residual variance per layer", fig,
                       "The Curse of Depth: in Pre-LN models the output variance grows with depth."))
    fig = go.Figure()
    bx = blocks["block"].to_numpy()
    fig.add_trace(go.Scatter(x=bx, y=blocks["rel_update"], mode="lines+markers", name="block (total)"))
    fig.add_trace(go.Scatter(x=bx, y=blocks["rel_update_attn"], mode="lines+markers", name="attention part"))
    fig.add_trace(go.Scatter(x=bx, y=blocks["rel_update_mlp"], mode="lines+markers", name="MLP part"))
    if has_lns:
        fig.add_trace(go.Scatter(x=bx, y=blocks["lns_rel_update"], mode="lines+markers", name="LNS what-if (total)",
                                 line={"dash": "dash"}))
    fig.update_layout(title="Relative update ||h_out - h_in|| / ||h_in|| per block (ordinary positions)",
                      xaxis_title="block", yaxis_title="relative update (log)", yaxis_type="log",
                      template="plotly_white")
    figs.append(Figure("Relative update per block", fig,
                       "Blocks near the bottom of this plot barely change the residual stream: they are "
                       "near-identity."))
    n_p = dist.shape[0]
    fig = go.Figure(go.Heatmap(z=dist, x=list(range(n_p)), y=list(range(n_p)), colorscale="Viridis",
                               colorbar={"title": {"text": "d / pi"}},
                               hovertemplate="h_%{y} vs h_%{x}: %{z:.3f}<extra></extra>"))
    fig.update_layout(title="Angular distance arccos(cos(h_l, h_m)) / pi on the last token", template="plotly_white",
                      height=620, width=680, xaxis_title="layer m", yaxis_title="layer l")
    fig.update_yaxes(autorange="reversed", scaleanchor="x")
    figs.append(Figure("Angular distance between layers", fig,
                       "Dark squares along the diagonal are runs of layers that barely turn the last token's "
                       "representation: candidates to drop (Gromov et al.)."))
    if "skip_delta_loss" in blocks:
        sk = blocks.dropna(subset=["skip_delta_loss"])
        fig = go.Figure(go.Bar(x=sk["block"], y=sk["skip_delta_loss"], name="delta loss"))
        fig.update_layout(title=f"Loss change when one block is skipped (baseline {base_loss:.3f} nats/token)",
                          xaxis_title="block skipped", yaxis_title="delta loss (nats/token, log)",
                          yaxis_type="log", template="plotly_white")
        figs.append(Figure("Skip-one-block loss change", fig,
                           "Tall bars are blocks the model cannot do without; short ones are near-redundant."))
    fig = go.Figure(go.Scatter(x=windows["n"], y=windows["distance"], mode="lines+markers", name="min distance",
                               text=[f"blocks {s}-{e}" for s, e in zip(windows["start"], windows["end"], strict=True)],
                               hovertemplate="n=%{x}: %{text}, d=%{y:.3f}<extra></extra>"))
    if drop is not None:
        fig.add_trace(go.Scatter(x=[drop["n"]], y=[drop["distance"]], mode="markers+text", marker={"size": 12},
                                 text=[plot_text(f"dropped: {drop['delta_loss']:+.3f} nats")],
                                 textposition="top left", name="measured drop"))
    fig.update_layout(title="Cheapest window of n blocks to drop: min over l of d(h_l, h_l+n)",
                      xaxis_title="n (blocks dropped)", yaxis_title="angular distance / pi", template="plotly_white")
    figs.append(Figure("Cheapest window per size", fig,
                       "The lower the curve stays as n grows, the more consecutive blocks could go with little "
                       "change to the last token."))
    if len(sites_df):
        fig = go.Figure()
        for role, grp in sites_df.groupby("role", sort=False):
            fig.add_trace(go.Scatter(x=grp["layer"], y=grp["divisor_rest"], mode="lines+markers",
                                     name=f"{role} divisor"))
            fig.add_trace(go.Scatter(x=grp["layer"], y=grp["out_var_rest"], mode="lines+markers",
                                     name=f"{role} output variance", line={"dash": "dot"}))
        fig.update_layout(title="Norm sites: divisor (RMS or std) and output variance, ordinary positions",
                          xaxis_title="layer", yaxis_title="value (log)", yaxis_type="log", template="plotly_white")
        figs.append(Figure("Norm divisor and output variance per site", fig,
                           "The divisor tracks the growing residual norm, while the output variance stays set by "
                           "the gains."))
    if has_lns:
        fig = go.Figure()
        fig.add_trace(go.Scatter(x=bx, y=blocks["angular_to_next"], mode="lines+markers", name="as trained"))
        fig.add_trace(go.Scatter(x=bx, y=blocks["lns_angular_to_next"], mode="lines+markers",
                                 name="LNS what-if (not trained so)", line={"dash": "dash"}))
        fig.update_layout(title="Angular distance d(h_l, h_l+1) per block: as trained vs LayerNorm Scaling at "
                          "inference", xaxis_title="block", yaxis_title="angular distance / pi",
                          template="plotly_white")
        figs.append(Figure("LayerNorm Scaling what-if: per-block turn", fig,
                           "The model was not trained with LayerNorm Scaling, so read this as a sensitivity test, "
                           "not as the paper's trained result."))
    return figs


def terminal_table(result: Any) -> Any:
    """The rich table the CLI prints after the run."""
    from rich.table import Table

    r = result  # a normscope.report.Result
    t = Table(title=f"depth-curse: {r.payload['model']}", show_header=True)
    for col in ("block", "rel. update", "attn", "MLP", "norm after", "skip dloss"):
        t.add_column(col, justify="right")
    layers = {row["point"]: row for row in r.payload["layers"]}
    for row in r.payload["blocks"]:
        d = row.get("skip_delta_loss")
        t.add_row(str(row["block"]), f"{100 * row['rel_update']:.1f}%", f"{100 * row['rel_update_attn']:.1f}%",
                  f"{100 * row['rel_update_mlp']:.1f}%", f"{layers[row['block'] + 1]['norm_rest']:.1f}",
                  "" if d is None or d != d else f"{d:+.3f}")
    return t

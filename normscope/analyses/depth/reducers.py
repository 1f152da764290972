"""Hook reducers of the curse-of-depth analysis: each folds its statistics once per batch and keeps only sums
(float64, on the host) across batches, so memory does not grow with the text.

One statistics pass registers all of them on one :class:`~normscope.core.capture.Capture` (see
:func:`register_stats`): residual norms and variances (Sun et al. 2025, arXiv:2502.05795), norm divisors,
relative updates per block, the last token's angular distances (Gromov et al. 2024, arXiv:2403.17887) and the
tokens that carry massive activations (Sun, Chen, Kolter, Liu 2024, arXiv:2402.17762).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from normscope.analyses.depth.metrics import (
    angular_distance_matrix,
    last_token_index,
    massive_tokens,
    per_token,
    token_l2,
    token_variance,
)
from normscope.core.capture import BatchContext, Capture
from normscope.core.losses import SequenceLossMeter

MAX_OCCURRENCES = 64  # later-position massive-activation tokens kept (the largest |h|): the page names them


def as_tokens(x: torch.Tensor, ctx: BatchContext) -> torch.Tensor:
    """View a hook tensor as ``[batch, pos, ...]``: some models (OPT) flatten tokens to ``[batch*pos, d]``."""
    b, t = ctx.attention_mask.shape
    if x.ndim == 2 and x.shape[0] == b * t and (b, t) != tuple(x.shape):
        return x.reshape(b, t, x.shape[-1])
    return x


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


@dataclass
class Occurrence:
    """One token at a position > 0 that carries a massive activation at some residual point."""

    sequence: int
    position: int
    token_id: int
    dim: int  # dim of its largest |h|
    max_abs: float  # its largest |h| over the points where it is massive
    first_point: int
    last_point: int


class MassiveActivations:
    """Per residual point: how many tokens carry a massive activation (Sun, Chen, Kolter, Liu 2024), position 0
    and positions > 0 apart, and the norm and variance moments of the positions > 0 that carry none.

    The mean variance of positions > 0 is a mean of squares: one token with |h| ~ 24,000 in one dim among two
    thousand adds about 500 to it. The ``typical`` moments leave such tokens out, so the page can show what
    the growth of the other tokens looks like. Per batch it folds a handful of sums per point; across batches it
    keeps those sums and at most ``MAX_OCCURRENCES`` later-position occurrences (the largest), never the text.
    """

    def __init__(self, n_points: int) -> None:
        self.n_points = n_points
        z = torch.zeros(n_points, dtype=torch.float64)
        self.n_pos0, self.n_rest, self.n_typical = z.clone(), z.clone(), z.clone()
        self.s_norm, self.s_var = z.clone(), z.clone()  # sums over typical tokens at positions > 0
        self.max_abs_rest = torch.full((n_points,), float("nan"), dtype=torch.float64)
        self.max_dim_rest = torch.full((n_points,), -1, dtype=torch.long)
        self.occurrences: dict[tuple[int, int], Occurrence] = {}
        self.dims: Counter[int] = Counter()  # dim of each later-position massive activation, over points
        self._batch: int | None = None
        self._seq0 = 0  # sequences before the current batch
        self._rows = 0

    def add(self, point: int, h: torch.Tensor, norm: torch.Tensor, var: torch.Tensor, ctx: BatchContext) -> None:
        """h: ``[batch, pos, d]``; norm, var: its ``[batch, pos]`` token L2 norms and variances."""
        if ctx.index != self._batch:
            self._seq0 += self._rows if self._batch is not None else 0
            self._batch, self._rows = ctx.index, int(h.shape[0])
        mask = ctx.attention_mask.to(h.device)
        massive, top, dim = massive_tokens(h, mask)  # [batch, pos] each
        rest = mask.bool().clone()
        rest[:, 0] = False  # positions > 0
        later = massive & rest  # [batch, pos]
        typical = rest & ~massive
        p = point
        t = torch.where(rest, top, torch.full_like(top, -1.0)).flatten()  # [batch * pos]: positions > 0 only
        j = t.argmax()
        tw = typical.double()
        # every scalar of this point and batch in one vector, so it reaches the host in one transfer
        vals = torch.stack([massive[:, 0].sum().double(), later.sum().double(), tw.sum(),
                            (norm.double().to(h.device) * tw).sum(), (var.double().to(h.device) * tw).sum(),
                            t[j].double(), dim.flatten()[j].double(), later.any().double()]).tolist()
        self.n_pos0[p] += vals[0]
        self.n_rest[p] += vals[1]
        self.n_typical[p] += vals[2]
        self.s_norm[p] += vals[3]
        self.s_var[p] += vals[4]
        if vals[5] >= 0 and not vals[5] <= float(self.max_abs_rest[p]):  # NaN at first: take it
            self.max_abs_rest[p], self.max_dim_rest[p] = vals[5], int(vals[6])
        if vals[7]:  # rare: a massive activation after position 0
            for b, pos in later.nonzero().tolist():
                self._note(p, self._seq0 + b, pos, int(ctx.input_ids[b, pos]), int(dim[b, pos]), float(top[b, pos]))

    def _note(self, point: int, seq: int, pos: int, token_id: int, dim: int, value: float) -> None:
        self.dims[dim] += 1
        occ = self.occurrences.get((seq, pos))
        if occ is None:
            self.occurrences[(seq, pos)] = Occurrence(seq, pos, token_id, dim, value, point, point)
            if len(self.occurrences) > 4 * MAX_OCCURRENCES:  # keep the largest: memory stays bounded
                keep = sorted(self.occurrences.values(), key=lambda o: -o.max_abs)[:MAX_OCCURRENCES]
                self.occurrences = {(o.sequence, o.position): o for o in keep}
            return
        if value > occ.max_abs:
            occ.max_abs, occ.dim = value, dim
        occ.first_point, occ.last_point = min(occ.first_point, point), max(occ.last_point, point)

    def typical_mean(self, point: int, which: str) -> float:
        """Mean token norm (``which="norm"``) or variance (``"var"``) of positions > 0 without a massive one."""
        n = float(self.n_typical[point])
        s = self.s_norm if which == "norm" else self.s_var
        return float(s[point]) / n if n else float("nan")

    def top_occurrences(self) -> list[Occurrence]:
        """The later-position occurrences, largest |h| first (at most ``MAX_OCCURRENCES``)."""
        return sorted(self.occurrences.values(), key=lambda o: (-o.max_abs, o.sequence, o.position))[:MAX_OCCURRENCES]


class ResidualStats:
    """Per residual point: moments of the token L2 norm and variance (position 0 apart), the last token, and
    the tokens with massive activations."""

    def __init__(self, point: int, angular: AngularAccumulator, moments: BatchMoments,
                 massive: MassiveActivations) -> None:
        self.point, self.angular, self.massive = point, angular, massive
        self.norm = moments.slot(f"resid.{point}.norm")
        self.var = moments.slot(f"resid.{point}.var")

    def update(self, h: torch.Tensor, ctx: BatchContext) -> None:
        norm, var = token_l2(h), token_variance(h)  # h: [batch, pos, d_model] -> [batch, pos]
        self.norm.put(norm)
        self.var.put(var)
        self.angular.add(self.point, h, ctx)
        self.massive.add(self.point, h, norm, var, ctx)


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


def block_mode(b: Any, sites_in_block: dict[str, Any]) -> str:
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
    loss: SequenceLossMeter | None
    moments: BatchMoments
    massive: MassiveActivations
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def register_stats(cap: Capture, layout: Any, sites: list[Any], label: str, causal: bool) -> PassStats:
    """Add every depth reducer of one pass to ``cap``: all of them are fed by the same forward pass."""
    n_points = layout.n_layers + 1
    angular = AngularAccumulator(n_points)
    moments = BatchMoments()
    massive = MassiveActivations(n_points)
    residual = [ResidualStats(p, angular, moments, massive) for p in range(n_points)]
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
        bu = BlockUpdate(b.index, block_mode(b, in_block), moments)
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
    return PassStats(label, residual, site_stats, blocks, angular, SequenceLossMeter() if causal else None, moments,
                     massive)


def end_of_batch(stats: PassStats) -> Callable[[Any, BatchContext], None]:
    """``on_output`` for Capture.run: fold the batch's per-token values, then score the loss."""

    def fn(out: Any, ctx: BatchContext) -> None:
        stats.moments.flush(ctx.attention_mask)
        if stats.loss is not None:
            stats.loss(out, ctx)

    return fn


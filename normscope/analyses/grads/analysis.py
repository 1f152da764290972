"""Gradient flow per layer: parameter-gradient norms per block and group, and the gradient on the residual stream.

Metrics and where they come from:

* ||grad of block l's parameters||_2 per layer, and per parameter group (attention, MLP, norm gains,
  embeddings): Li et al. 2024, "Mix-LN: Unleashing the Power of Deeper Layers by Combining Pre-LN and
  Post-LN" (arXiv:2412.13795), who find small gradients in the deep layers of Pre-LN models and vanishing
  gradients in the early layers of Post-LN models; the Pre-LN / Post-LN gradient analysis goes back to Xiong et
  al. 2020, "On Layer Normalization in the Transformer Architecture" (arXiv:2002.04745);
* ||dL/dh_l|| on the residual stream at every layer, where vanishing gradients show (Xiong et al. 2020;
  Sun et al. 2025, "The Curse of Depth in Large Language Models", arXiv:2502.05795).

Losses: causal LMs use next-token cross-entropy; encoders use their masked-LM head when they have one, and
otherwise (e.g. the bundled all-MiniLM-L6-v2, a sentence encoder without a head) the **masked-view cosine
loss**: 1 - cos(mean-pooled last hidden state of a sequence, the same for a copy with 15% of its tokens
replaced by [MASK]), averaged over sequences (a SimCSE-style self-supervised objective, Gao et al. 2021,
arXiv:2104.08821, with masking as the augmentation).

Accumulation: one forward and one backward pass per batch, no graph kept. Each batch's loss is scaled by its
share of the whole text, so the ``.grad`` the parameters accumulate over batches IS the gradient of the mean
loss over the whole text (not a mean of per-batch norms). Residual-stream gradients are reduced to per-token
norms inside tensor hooks registered during the forward pass; nothing per token is kept. A batch whose
activations or loss overflow to inf/NaN (fp16/bf16) gets no backward pass, since one NaN would poison every
accumulated gradient: the gradients are rescaled to the mean over the batches kept, and the report names the
first hook point that overflowed and the batches left out.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
import torch.nn.functional as F
from torch import nn

from normscope.analyses.base import RunContext
from normscope.analyses.grads.options import LOSSES, REFERENCES, GradsOptions
from normscope.core.capture import BatchContext, Capture, TokenMoments
from normscope.core.errors import NormscopeError
from normscope.core.nonfinite import flag_nonfinite, note_nonfinite, watch_residual
from normscope.core.progress import progress_task as _task
from normscope.core.sites import find_layout, find_norm_sites
from normscope.core.text import TokenBatch
from normscope.report import Figure, Result
from normscope.report.result import build_meta

LOSS_NAMES = {
    "next-token": "next-token cross-entropy",
    "mlm": "masked-LM cross-entropy ({rate:.0%} of tokens replaced by [MASK])",
    "masked-view": "masked-view cosine loss: 1 - cos(mean-pooled last hidden state of a sequence, of a copy with "
                   "{rate:.0%} of its tokens replaced by [MASK])",
}
GROUPS = ("attention", "mlp", "norm", "embeddings", "unembedding", "other")

AXES = {"blocks": "block", "residual": "point", "groups": "block"}  # each per-depth table: its depth column
LABELS = {  # words for table and column names on pages and in compare
    "blocks": "per block",
    "residual": "per residual point",
    "groups": "per parameter group",
    "total": "||grad|| of the block's parameters",
    "attention": "||grad|| of attention",
    "mlp": "||grad|| of the MLP",
    "norm": "||grad|| of the norms",
    "param_norm": "||parameters||",
    "grad_rest": "||dL/dh||, positions > 0",
    "grad_pos0": "||dL/dh||, position 0",
    "grad_norm": "||grad||",
    "relative": "||grad|| / ||parameters||",
    "point": "residual point",
    "nonfinite_points": "hook points with inf/NaN",
}


# ---- pure functions -------------------------------------------------------------------------------------
def l2(tensors: list[torch.Tensor]) -> float:
    """L2 norm of several tensors taken together: sqrt(sum of squares), in float64."""
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors)) if tensors else 0.0


def mean_pool(h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token vectors of each row over its real tokens (sentence-transformers' mean pooling).

    h: ``[batch, pos, d]``; attention_mask: ``[batch, pos]``. Returns ``[batch, d]``.
    """
    m = attention_mask.to(h.dtype).unsqueeze(-1)  # [batch, pos, 1]
    return (h * m).sum(1) / m.sum(1).clamp_min(1.0)


def masked_view_loss(h: torch.Tensor, h_masked: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Per sequence: 1 - cos(mean_pool(h), mean_pool(h_masked)).

    h, h_masked: ``[batch, pos, d]``; attention_mask: ``[batch, pos]``; returns ``[batch]``.
    """
    return 1.0 - F.cosine_similarity(mean_pool(h, attention_mask), mean_pool(h_masked, attention_mask), dim=-1)


def mask_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor, special_ids: list[int], rate: float,
                   generator: torch.Generator) -> torch.Tensor:
    """Choose about ``rate`` of each row's real, non-special tokens (at least one) to replace by [MASK].

    input_ids, attention_mask: ``[batch, pos]``; returns a bool mask ``[batch, pos]``.
    """
    ok = attention_mask.bool().cpu()
    if special_ids:
        ok &= ~torch.isin(input_ids.cpu(), torch.tensor(special_ids))
    score = torch.rand(input_ids.shape, generator=generator)  # [batch, pos]
    score = torch.where(ok, score, torch.full_like(score, 2.0))
    n = (ok.sum(1).float() * rate).round().clamp_min(1).long()  # [batch]
    order = score.argsort(dim=1)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1]).expand_as(order).contiguous())
    return ((rank < n[:, None]) & ok).to(input_ids.device)


# ---- parameter groups ------------------------------------------------------------------------------------
@dataclass
class ParamGroup:
    """A named set of parameters: one group of one block (``block`` set) or of the model outside the blocks."""

    block: int | None
    group: str
    params: list[nn.Parameter] = field(default_factory=list)
    names: list[str] = field(default_factory=list)

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.params)


def param_groups(model: nn.Module, layout: Any, sites: list[Any]) -> list[ParamGroup]:
    """Sort every parameter (tied ones once) into (block, group).

    Inside a block: parameters of a norm site are ``norm``; those under the attention module, or whose path
    names an attention (``attn``, ``attention``; BERT's output projection lives beside its self-attention)
    are ``attention``; the rest of the block is ``mlp``. Outside the blocks: norms (final, embedding norm) are
    ``norm``; ``nn.Embedding`` weights (tokens, positions, token types) are ``embeddings``; an untied output
    projection is ``unembedding``; anything else (a pooler) is ``other``.
    """
    norm_params = {id(p) for s in sites for p in s.module.parameters()}
    block_of: dict[int, Any] = {}
    for b in layout.blocks:
        for p in b.module.parameters():
            block_of[id(p)] = b
    attn_params = {id(p) for b in layout.blocks if b.attn is not None for p in b.attn.parameters()}
    embed_params = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    embed_params |= {id(p) for p in layout.embed.parameters()}
    unembed_params = {id(p) for p in layout.unembed.parameters()} if layout.unembed is not None else set()
    groups: dict[tuple[int | None, str], ParamGroup] = {}
    for name, p in model.named_parameters():
        b = block_of.get(id(p))
        rel = name[len(b.path) + 1:] if b is not None else name
        if id(p) in norm_params:
            g = "norm"
        elif b is not None:
            g = "attention" if id(p) in attn_params or "attn" in rel or "attention" in rel else "mlp"
        elif id(p) in embed_params:
            g = "embeddings"
        elif id(p) in unembed_params:
            g = "unembedding"
        else:
            g = "other"
        key = (b.index if b is not None else None, g)
        pg = groups.setdefault(key, ParamGroup(*key))
        pg.params.append(p)
        pg.names.append(name)
    return list(groups.values())


# ---- losses --------------------------------------------------------------------------------------------
def choose_loss(lm: Any, layout: Any, requested: str) -> str:
    """The loss to use, or a one-line NormscopeError when the model cannot take the requested one."""
    if requested not in LOSSES:
        raise NormscopeError(f"--loss must be one of {', '.join(LOSSES)}, not '{requested}'.")
    causal = bool(lm.info.is_causal and layout.is_causal)
    has_head = layout.unembed is not None
    if requested == "auto":
        return "next-token" if causal else ("mlm" if has_head else "masked-view")
    if requested == "next-token" and not causal:
        raise NormscopeError("--loss next-token needs a causal LM and this model is an encoder; use --loss auto.")
    if requested == "mlm" and (causal or not has_head):
        raise NormscopeError("--loss mlm needs an encoder with a masked-LM head; use --loss auto.")
    if requested == "masked-view" and causal:
        raise NormscopeError("--loss masked-view is for encoders; causal LMs use next-token loss (--loss auto).")
    if requested in ("mlm", "masked-view") and getattr(lm.tokenizer, "mask_token_id", None) is None:
        raise NormscopeError(f"--loss {requested} needs a [MASK] token and this tokenizer has none.")
    return requested


def _special_ids(tok: Any) -> list[int]:
    return sorted({int(i) for i in (getattr(tok, "all_special_ids", None) or []) if i is not None})


def _loss_units(kind: str, b: TokenBatch) -> int:
    """How many terms batch ``b`` adds to the mean loss (tokens predicted, masked tokens or sequences)."""
    m = b.attention_mask.bool()
    if kind == "next-token":
        return int((m[:, 1:] & m[:, :-1]).sum())
    return len(b)


class _Masker:
    def __init__(self, tok: Any, rate: float, seed: int) -> None:
        self.mask_id = getattr(tok, "mask_token_id", None)
        self.special = _special_ids(tok)
        self.rate, self.seed = rate, seed

    def __call__(self, b: TokenBatch, index: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        return mask_positions(b.input_ids, b.attention_mask, self.special, self.rate, gen)  # [batch, pos] bool


# ---- the measurement -----------------------------------------------------------------------------------
@dataclass
class GradProfile:
    """What :func:`measure` found for one model (the input of the report; several make a comparison)."""

    model: str
    n_blocks: int
    loss_kind: str
    loss_name: str
    loss: float
    n_units: int
    n_tokens: int
    blocks: pd.DataFrame  # block, total, attention, mlp, norm (+ param norms)
    groups: pd.DataFrame  # block (or None), group, grad_norm, param_norm, n_params
    residual: pd.DataFrame  # point, grad_rest, grad_pos0
    seconds: float = 0.0
    nonfinite: list[dict[str, Any]] = field(default_factory=list)  # inf/NaN report (Capture.nonfinite_report)
    skipped_batches: list[int] = field(default_factory=list)  # batches left out because of inf/NaN

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "n_blocks": self.n_blocks, "loss_kind": self.loss_kind,
                "loss_name": self.loss_name, "loss": self.loss, "n_loss_terms": self.n_units,
                "n_tokens": self.n_tokens, "skipped_batches": self.skipped_batches,
                "blocks": self.blocks.to_dict("records"), "groups": self.groups.to_dict("records"),
                "residual": self.residual.to_dict("records")}


@contextmanager
def _grads_enabled(model: nn.Module) -> Iterator[list[nn.Parameter]]:
    """requires_grad on every parameter and no stale .grad; both restored afterwards (shared models stay clean)."""
    params = list(model.parameters())
    saved = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
        p.grad = None
    try:
        with torch.enable_grad():
            yield params
    finally:
        for p, r in zip(params, saved, strict=True):
            p.grad = None
            p.requires_grad_(r)


class ResidualGrad:
    """Per residual point: moments of the per-token norm of dL_sum/dh (position 0 apart).

    Registered as an intervention that returns its input unchanged after hanging a tensor hook on it; the
    tensor hook reduces the gradient to ``[batch, pos]`` norms when the backward pass reaches it.
    """

    def __init__(self, point: int) -> None:
        self.point = point
        self.moments = TokenMoments(lambda h: h.float().norm(dim=-1))  # [batch, pos] L2 per token
        self.scale = 1.0  # turns dL_mean/dh into dL_sum/dh (the number of loss terms in the whole text)

    def __call__(self, h: torch.Tensor, ctx: BatchContext) -> torch.Tensor:
        if h.requires_grad:
            h.register_hook(lambda g, ctx=ctx: self.moments.update(g.detach() * self.scale, ctx))
        return h


def _forward_loss(model: nn.Module, kind: str, b: TokenBatch, masked: torch.Tensor | None,
                  mask_id: int | None) -> tuple[torch.Tensor, int, TokenBatch]:
    """Summed loss of one batch, the number of its terms, and the batch the model actually saw."""
    ids, att = b.input_ids, b.attention_mask
    if kind == "next-token":
        logits = model(input_ids=ids, attention_mask=att, use_cache=False).logits  # [batch, pos, vocab]
        keep = att[:, 1:].bool() & att[:, :-1].bool()
        ce = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                             reduction="none")
        return ce[keep.reshape(-1)].sum(), int(keep.sum()), b
    assert masked is not None and mask_id is not None
    ids_m = torch.where(masked, torch.full_like(ids, mask_id), ids)
    if kind == "mlm":
        logits = model(input_ids=ids_m, attention_mask=att).logits  # [batch, pos, vocab]
        ce = F.cross_entropy(logits[masked].float(), ids[masked], reduction="sum")
        return ce, int(masked.sum()), TokenBatch(ids_m, att, list(b.categories))
    both = TokenBatch(torch.cat([ids, ids_m]), torch.cat([att, att]), list(b.categories) * 2)
    out = model(input_ids=both.input_ids, attention_mask=both.attention_mask)
    h = out.last_hidden_state.float()  # [2 * batch, pos, d]
    n = ids.shape[0]
    return masked_view_loss(h[:n], h[n:], att).sum(), n, both


def measure(lm: Any, sample: Any, opts: GradsOptions | None = None, progress: Any = None, *,
            layout: Any = None, sites: list[Any] | None = None) -> GradProfile:
    """One forward and one backward pass per batch; returns the gradient profile of ``lm`` on ``sample``.

    ``layout`` and ``sites`` are probed here when not given (a RunContext has them already)."""
    opts = opts or GradsOptions()
    model = lm.model
    layout = layout if layout is not None else find_layout(model)
    sites = sites if sites is not None else find_norm_sites(model, layout)
    kind = choose_loss(lm, layout, opts.loss)
    batches = list(sample.iter_batches())
    masker = _Masker(lm.tokenizer, opts.mask_rate, sample.seed)
    masks = (lambda b, i: masker(b, i)) if kind != "next-token" else (lambda b, i: None)
    units = [int(masks(b, i).sum()) if kind == "mlm" else _loss_units(kind, b) for i, b in enumerate(batches)]
    n_units = sum(units)
    if n_units == 0:
        raise NormscopeError("The text gives no loss terms (sequences too short); raise --seq-len.")
    groups = param_groups(model, layout, sites)
    cap = Capture(model, layout, sites)
    points = [ResidualGrad(p) for p in range(layout.n_layers + 1)]
    cap.intervene(f"blocks.{layout.blocks[0].index}.hook_resid_pre", points[0])
    for k, b in enumerate(layout.blocks):
        cap.intervene(f"blocks.{b.index}.hook_resid_post", points[k + 1])
    for p in points:
        p.scale = float(n_units)
    watch_residual(cap, layout)
    dev = next(model.parameters()).device
    total_loss = 0.0
    kept_units = kept_tok = 0
    skipped: list[int] = []
    bad_loss: dict[str, dict[str, Any]] = {}  # a loss that overflowed while every hooked activation was finite
    n_tok = sum(int(b.attention_mask.sum()) for b in batches)
    t0 = time.perf_counter()
    with _grads_enabled(model), cap, _task(progress, f"gradients ({LOSS_NAMES[kind].split(':')[0][:40]})",
                                           n_tok) as adv:
        for i, b in enumerate(batches):
            b = TokenBatch(b.input_ids.to(dev), b.attention_mask.to(dev), list(b.categories))
            masked = masks(b, i)
            seen = b if kind != "masked-view" else TokenBatch(
                torch.cat([b.input_ids, b.input_ids]), torch.cat([b.attention_mask, b.attention_mask]),
                list(b.categories) * 2)
            before = _nonfinite_count(cap)
            with cap.batch(seen, index=i):
                loss_sum, _, _ = _forward_loss(model, kind, b, masked, masker.mask_id)
                hooked_ok = _nonfinite_count(cap) == before
                if hooked_ok:
                    note_nonfinite(bad_loss, "loss", loss_sum.detach(), i)
                finite = hooked_ok and math.isfinite(float(loss_sum.detach()))
                if finite:  # an overflowing batch would turn every accumulated gradient into NaN: left out
                    (loss_sum / n_units).backward()  # accumulates .grad of the mean loss over the whole text
            if finite:
                total_loss += float(loss_sum.detach())
                kept_units += units[i]
                kept_tok += int(b.attention_mask.sum())
            else:
                skipped.append(i)
            if adv is not None:
                adv(int(b.attention_mask.sum()))
        report = cap.nonfinite_report() + list(bad_loss.values())
        if not kept_units:
            first = report[0]
            raise NormscopeError(f"Every batch overflowed to inf/NaN in this dtype (first at {first['point']}, batch "
                                 f"{first['first_batch']}), so there is no gradient to measure; rerun with "
                                 "--dtype float32.")
        rescale = n_units / kept_units  # 1.0 unless batches were left out: the mean over the batches kept
        rows = []
        for g in groups:
            grads = [p.grad for p in g.params if p.grad is not None]
            rows.append({"block": g.block, "group": g.group, "grad_norm": l2(grads) * rescale,
                         "param_norm": l2([p.detach() for p in g.params]), "n_params": g.n_params})
    seconds = time.perf_counter() - t0
    gdf = pd.DataFrame(rows, columns=["block", "group", "grad_norm", "param_norm", "n_params"])
    gdf["relative"] = gdf["grad_norm"] / gdf["param_norm"].where(gdf["param_norm"] > 0)
    blocks = _block_table(gdf, layout.n_layers)
    residual = pd.DataFrame([{"point": p.point, "grad_rest": p.moments.mean("rest"),
                              "grad_pos0": p.moments.mean("pos0")} for p in points])
    if not np.isfinite(gdf["grad_norm"]).all():
        raise NormscopeError("The gradients overflowed to inf/NaN in this dtype (the forward pass stayed finite); "
                             "rerun with --dtype float32.")
    name = LOSS_NAMES[kind].format(rate=opts.mask_rate)
    return GradProfile(lm.info.spec, layout.n_layers, kind, name, total_loss / kept_units, kept_units, kept_tok,
                       blocks, gdf, residual, seconds, report, skipped)


def _nonfinite_count(cap: Capture) -> int:
    """inf/NaN values the capture has counted so far, over all its points."""
    return sum(r["values"] for r in cap.nonfinite.values())


def _block_table(gdf: pd.DataFrame, n_blocks: int) -> pd.DataFrame:
    rows = []
    inb = gdf[gdf["block"].notna()]
    for i in range(n_blocks):
        sub = inb[inb["block"] == i]
        row: dict[str, Any] = {"block": i, "total": math.sqrt(float((sub["grad_norm"] ** 2).sum()))}
        for g in ("attention", "mlp", "norm"):
            s = sub[sub["group"] == g]
            row[g] = math.sqrt(float((s["grad_norm"] ** 2).sum())) if len(s) else float("nan")
        row["param_norm"] = math.sqrt(float((sub["param_norm"] ** 2).sum()))
        rows.append(row)
    out = pd.DataFrame(rows)
    out["depth"] = (out["block"] + 0.5) / max(n_blocks, 1)
    return out


# ---- the analysis ----------------------------------------------------------------------------------------
def thirds_ratio(values: pd.Series | np.ndarray) -> float:
    """Mean of the first third over the mean of the last third (> 1: gradients shrink with depth)."""
    v = np.asarray(values, dtype=float)
    k = max(1, len(v) // 3)
    return float(np.nanmean(v[:k]) / np.nanmean(v[-k:]))


def run(ctx: RunContext, opts: GradsOptions) -> Result:
    """Gradient profile of ``ctx.lm``: L2 gradient norms per block and parameter group, and ||dL/dh||.

    ``ctx`` carries the loaded model, its layout and norm sites (probed once) and the text sample; ``ctx.progress``
    is the CLI's progress bar or None (silent).
    """
    lm, sample, progress = ctx.lm, ctx.sample, ctx.progress
    profiles = [measure(lm, sample, opts, progress, layout=ctx.layout, sites=ctx.sites)]
    result = _build_result(lm, sample, opts, profiles)
    flag_nonfinite(result, nonfinite_report(profiles), _skipped_note(profiles))
    return result


def nonfinite_report(profiles: list[GradProfile]) -> list[dict[str, Any]]:
    """The profiles' inf/NaN reports as one; with a comparison, each point of the second model is prefixed by
    its name."""
    rows = list(profiles[0].nonfinite)
    for p in profiles[1:]:
        rows += [{**r, "point": f"{p.model}: {r['point']}"} for r in p.nonfinite]
    return rows


def _skipped_note(profiles: list[GradProfile]) -> str:
    parts = [f"{len(p.skipped_batches)} batch{'es' if len(p.skipped_batches) != 1 else ''} of {p.model} "
             f"({', '.join(map(str, p.skipped_batches))})" for p in profiles if p.skipped_batches]
    return f"{' and '.join(parts) or 'no batch'} left out of the gradients and the loss"


def _build_result(lm: Any, sample: Any, opts: GradsOptions, profiles: list[GradProfile]) -> Result:
    a = profiles[0]
    headlines: dict[str, Any] = {}
    for p in profiles:
        tag = "" if len(profiles) == 1 else f"{p.model}: "
        headlines[f"{tag}loss ({p.loss_kind})"] = round(p.loss, 4)
        headlines[f"{tag}block grad, first/last third"] = round(thirds_ratio(p.blocks["total"]), 3)
        r = p.residual["grad_rest"]
        headlines[f"{tag}residual grad, embeddings/last"] = round(float(r.iloc[0] / r.iloc[-1]), 3)
    tables: dict[str, pd.DataFrame] = {}
    for k, p in enumerate(profiles):
        sfx = "" if k == 0 else "_compare"
        tables[f"blocks{sfx}"] = p.blocks
        tables[f"residual{sfx}"] = p.residual.assign(depth=p.residual["point"] / p.n_blocks)
        tables[f"groups{sfx}"] = p.groups
    payload: dict[str, Any] = {"model": a.model, "profiles": [p.to_dict() for p in profiles],
                               "accumulation": "gradient of the mean loss over the whole text, accumulated in .grad "
                                               "over batches (one backward per batch)"}
    title = "Gradient flow per layer" + (f": {a.model} vs {profiles[1].model}" if len(profiles) > 1 else "")
    meta = build_meta(lm, sample, **opts.__dict__,
                      **({"compare": profiles[1].model} if len(profiles) > 1 else {}))
    return Result(analysis="grads", title=title, meta=meta, payload=payload, tables=tables, axes=AXES, labels=LABELS,
                  figures=_figures(profiles), headlines=headlines, summary=_summary(profiles),
                  references=REFERENCES, timings={f"forward + backward, {p.model}": p.seconds for p in profiles})


def _summary(profiles: list[GradProfile]) -> list[str]:
    out = []
    for p in profiles:
        ratio = thirds_ratio(p.blocks["total"])
        trend = ("larger in the early blocks than in the deep ones" if ratio > 1.0
                 else "smaller in the early blocks than in the deep ones")
        b = p.blocks
        lo, hi = b.loc[b["total"].idxmin()], b.loc[b["total"].idxmax()]
        r = p.residual["grad_rest"]
        dom = p.groups.groupby("group")["grad_norm"].apply(lambda s: math.sqrt(float((s ** 2).sum())))
        out.append(
            f"{p.model}: loss = {p.loss_name}, {p.loss:.4f} on average over {p.n_units} terms ({p.n_tokens} tokens). "
            f"The parameter-gradient norm per block is {trend}: the first third averages {ratio:.2f}x the last "
            f"third (smallest at block {int(lo['block'])}, {lo['total']:.3g}; largest at block {int(hi['block'])}, "
            f"{hi['total']:.3g}). On the residual stream, ||dL/dh|| per token goes from {r.iloc[0]:.3g} at the "
            f"embeddings to {r.iloc[-1]:.3g} after the last block ({r.iloc[0] / r.iloc[-1]:.2f}x). By group, the "
            f"largest gradient norm is in {dom.idxmax()} ({dom.max():.3g})."
        )
    out.append("Mix-LN (Li et al. 2024) reports that Pre-LN models get small gradients in their deep layers and "
               "Post-LN models vanishing gradients in their early layers; compare the first/last-third ratio above "
               "(> 1: early blocks get more gradient, < 1: deep blocks do).")
    if len(profiles) > 1:
        out.append("Both models are drawn against depth normalised to 0..1 (block i of L at (i + 0.5) / L, residual "
                   "point l at l / L). Their losses differ, so compare the shapes of the curves (the normalised "
                   "figure divides each curve by its median), not their absolute values.")
    return out


def _figures(profiles: list[GradProfile]) -> list[Figure]:
    multi = len(profiles) > 1
    xb = "depth (0 = first block, 1 = last)" if multi else "block"
    xr = "depth (0 = embeddings, 1 = after the last block)" if multi else "layer (0 = embeddings)"
    figs: list[Figure] = []
    fig = go.Figure()
    for p in profiles:
        x = p.blocks["depth"] if multi else p.blocks["block"]
        tag = f"{p.model}: " if multi else ""
        fig.add_trace(go.Scatter(x=x, y=p.blocks["total"], mode="lines+markers", name=f"{tag}block total"))
        if not multi:
            for g in ("attention", "mlp", "norm"):
                fig.add_trace(go.Scatter(x=x, y=p.blocks[g], mode="lines+markers", name=g))
    fig.update_layout(title="Parameter-gradient L2 norm per block (Mix-LN's per-layer plot)", xaxis_title=xb,
                      yaxis_title="||grad||_2 (log)", yaxis_type="log", template="plotly_white")
    figs.append(Figure("Parameter gradient per block", fig,
                       "A curve falling to the right means deep blocks learn slowly (Pre-LN); rising means early "
                       "blocks do (Post-LN)."))
    fig = go.Figure()
    for p in profiles:
        x = p.residual["point"] / p.n_blocks if multi else p.residual["point"]
        tag = f"{p.model}: " if multi else ""
        fig.add_trace(go.Scatter(x=x, y=p.residual["grad_rest"], mode="lines+markers", name=f"{tag}ordinary tokens"))
        fig.add_trace(go.Scatter(x=x, y=p.residual["grad_pos0"], mode="lines+markers", name=f"{tag}position 0",
                                 line={"dash": "dot"}))
    fig.update_layout(title="Gradient on the residual stream ||dL/dh_l|| per token", xaxis_title=xr,
                      yaxis_title="||dL/dh|| (log)", yaxis_type="log", template="plotly_white")
    figs.append(Figure("Residual-stream gradient per layer", fig,
                       "Vanishing gradients show as a curve that drops toward the embeddings (left)."))
    if multi:
        fig = go.Figure()
        for p in profiles:
            med = float(np.nanmedian(p.blocks["total"]))
            fig.add_trace(go.Scatter(x=p.blocks["depth"], y=p.blocks["total"] / med, mode="lines+markers",
                                     name=f"{p.model}: block grad / median"))
            medr = float(np.nanmedian(p.residual["grad_rest"]))
            fig.add_trace(go.Scatter(x=p.residual["point"] / p.n_blocks, y=p.residual["grad_rest"] / medr,
                                     mode="lines", name=f"{p.model}: residual grad / median", line={"dash": "dot"}))
        fig.update_layout(title="Shapes compared: each curve divided by its own median", xaxis_title="depth (0..1)",
                          yaxis_title="relative to the model's median (log)", yaxis_type="log",
                          template="plotly_white")
        figs.append(Figure("Gradient profiles, normalised", fig,
                           "Where one model's curve tilts down and the other's up, their norms place gradient "
                           "differently across depth."))
    else:
        p = profiles[0]
        other = p.groups[p.groups["block"].isna()]
        if len(other):
            fig = go.Figure(go.Bar(x=other["group"], y=other["grad_norm"], name="grad norm"))
            fig.update_layout(title="Gradient norm of the parameters outside the blocks", yaxis_type="log",
                              yaxis_title="||grad||_2 (log)", template="plotly_white")
            figs.append(Figure("Embeddings, final norm and head", fig,
                               "Tied embeddings collect the gradient of both the input and the output side."))
    return figs


def terminal_table(result: Any) -> Any:
    """The rich table the CLI prints after the run."""
    from rich.table import Table

    r = result  # a normscope.report.Result
    profiles = r.payload["profiles"]
    t = Table(title=f"grads: {' vs '.join(p['model'] for p in profiles)}", show_header=True)
    t.add_column("block", justify="right")
    for p in profiles:
        tag = "" if len(profiles) == 1 else f" {p['model']}"
        t.add_column(f"||grad||{tag}", justify="right")
        if len(profiles) == 1:
            for g in ("attention", "mlp", "norm"):
                t.add_column(g, justify="right")
        t.add_column(f"||dL/dh||{tag}", justify="right")
    n = max(p["n_blocks"] for p in profiles)
    for i in range(n):
        cells = [str(i)]
        for p in profiles:
            b = p["blocks"][i] if i < p["n_blocks"] else None
            res = p["residual"][i + 1] if i < p["n_blocks"] else None
            cells.append("" if b is None else f"{b['total']:.3g}")
            if len(profiles) == 1 and b is not None:
                cells += [f"{b[g]:.3g}" if b[g] == b[g] else "" for g in ("attention", "mlp", "norm")]
            cells.append("" if res is None else f"{res['grad_rest']:.3g}")
        t.add_row(*cells)
    return t

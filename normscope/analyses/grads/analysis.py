"""``normscope grads``: the measurement (one forward and one backward pass per batch) and its Result.

Gradient flow per layer: parameter-gradient norms per block and group, and the gradient on the residual stream.

Metrics and where they come from:

* ||grad of block l's parameters||_2 per layer, and per parameter group (attention, MLP, norm gains,
  embeddings): Li et al. 2024, "Mix-LN: Unleashing the Power of Deeper Layers by Combining Pre-LN and
  Post-LN" (arXiv:2412.13795), who find small gradients in the deep layers of Pre-LN models and vanishing
  gradients in the early layers of Post-LN models; the Pre-LN / Post-LN gradient analysis goes back to Xiong et
  al. 2020, "On Layer Normalization in the Transformer Architecture" (arXiv:2002.04745);
* ||dL/dh_l|| on the residual stream at every layer, where vanishing gradients show (Xiong et al. 2020;
  Sun et al. 2025, "The Curse of Depth in Large Language Models", arXiv:2502.05795);
* per weight matrix whose output a norm normalizes (:mod:`normscope.core.writers`: the embeddings, attention
  output and MLP down projections of pre-norm models, the dense layer before each LayerNorm of post-LN ones, the
  projections into qk-norms), ||w|| and the effective step sizes lr/||w||^2 (SGD) and lr/||w|| (Adam), and with
  ``--steps N`` the relative update ||dw||/||w|| of each of N AdamW steps (Lyle et al. 2024, "Normalization and
  effective learning rates in reinforcement learning", arXiv:2407.01800; :mod:`.effective`).

Losses: causal LMs use next-token cross-entropy; encoders use their masked-LM head when they have one, and
otherwise (e.g. the bundled all-MiniLM-L6-v2, a sentence encoder without a head) the **masked-view cosine
loss**: 1 - cos(mean-pooled last hidden state of a sequence, the same for a copy with 15% of its tokens
replaced by [MASK]), averaged over sequences (a SimCSE-style self-supervised objective, Gao et al. 2021,
arXiv:2104.08821, with masking as the augmentation).

Accumulation: one forward and one backward pass per batch, no graph kept. Each batch's loss is scaled by its
share of the whole text, so the ``.grad`` the parameters accumulate over batches IS the gradient of the mean
loss over the whole text (not a mean of per-batch norms); for a bfloat16/float16 model that sum is kept in
float32 (:class:`~normscope.analyses.grads.params.Fp32GradSums`), since a half-precision ``.grad`` loses the
later batches' shares. Residual-stream gradients are reduced to per-token
norms inside tensor hooks registered during the forward pass; nothing per token is kept. A batch whose
activations or loss overflow to inf/NaN (fp16/bf16) gets no backward pass, since one NaN would poison every
accumulated gradient: the gradients are rescaled to the mean over the batches kept, and the report names the
first hook point that overflowed and the batches left out.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from normscope.analyses.base import RunContext
from normscope.analyses.grads.effective import EffectiveLR, measure_effective
from normscope.analyses.grads.losses import LOSS_NAMES, Masker, choose_loss, forward_loss, loss_units
from normscope.analyses.grads.metrics import l2, thirds_ratio
from normscope.analyses.grads.options import REFERENCES, GradsOptions
from normscope.analyses.grads.params import Fp32GradSums, grads_enabled, param_groups
from normscope.analyses.grads.reducers import ResidualGrad
from normscope.analyses.grads.report import figures, summary, terminal_table
from normscope.core.capture import Capture
from normscope.core.errors import NormscopeError
from normscope.core.nonfinite import flag_nonfinite, note_nonfinite, watch_residual
from normscope.core.placement import input_device, is_offloaded
from normscope.core.progress import note
from normscope.core.progress import progress_task as _task
from normscope.core.sites import find_layout, find_norm_sites
from normscope.core.text import TokenBatch
from normscope.core.writers import find_writers
from normscope.report import Result
from normscope.report.result import build_meta

__all__ = ["AXES", "LABELS", "GradProfile", "measure", "run", "terminal_table"]

AXES = {"blocks": "block", "residual": "point", "groups": "block", "writers": "block"}  # table: depth column
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
    "writers": "per weight a norm normalizes",
    "updates": "per fine-tune step and weight",
    "weight_norm": "||w||",
    "eff_lr_sgd": "lr / ||w||^2 (SGD)",
    "eff_lr_adam": "lr / ||w|| (Adam)",
    "update_mean": "||dw|| / ||w||, mean per step",
}


# ---- the measurement -----------------------------------------------------------------------------------
@dataclass
class GradProfile:
    """What :func:`measure` found for one model on one text: the input of the Result."""

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
    effective: EffectiveLR | None = None  # effective learning rates of the weights a norm normalizes

    def to_dict(self) -> dict[str, Any]:
        """The profile as the JSON's one entry of ``profiles``."""
        return {"model": self.model, "n_blocks": self.n_blocks, "loss_kind": self.loss_kind,
                "loss_name": self.loss_name, "loss": self.loss, "n_loss_terms": self.n_units,
                "n_tokens": self.n_tokens, "skipped_batches": self.skipped_batches,
                "blocks": self.blocks.to_dict("records"), "groups": self.groups.to_dict("records"),
                "residual": self.residual.to_dict("records"),
                "effective_lr": self.effective.to_dict() if self.effective is not None else None}


def measure(lm: Any, sample: Any, opts: GradsOptions | None = None, progress: Any = None, *,
            layout: Any = None, sites: list[Any] | None = None) -> GradProfile:
    """One forward and one backward pass per batch; returns the gradient profile of ``lm`` on ``sample``.

    ``layout`` and ``sites`` are probed here when not given (a RunContext has them already)."""
    opts = opts or GradsOptions()
    model = lm.model
    layout = layout if layout is not None else find_layout(model)
    sites = sites if sites is not None else find_norm_sites(model, layout)
    if is_offloaded(model):
        raise NormscopeError("grads accumulates a gradient for every weight, so every weight must stay on a device, "
                             "but --max-memory offloads some to the CPU or disk; give the GPUs more --max-memory "
                             "(or drop --device-map).")
    kind = choose_loss(lm, layout, opts.loss)
    batches = list(sample.iter_batches())
    masker = Masker(lm.tokenizer, opts.mask_rate, sample.seed)
    masks = (lambda b, i: masker(b, i)) if kind != "next-token" else (lambda b, i: None)
    units = [int(masker(b, i).sum()) if kind == "mlm" else loss_units(kind, b) for i, b in enumerate(batches)]
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
    dev = input_device(model)
    total_loss = 0.0
    kept_units = kept_tok = 0
    skipped: list[int] = []
    bad_loss: dict[str, dict[str, Any]] = {}  # a loss that overflowed while every hooked activation was finite
    n_tok = sum(int(b.attention_mask.sum()) for b in batches)
    note(progress, f"grads: {len(batches)} forward + backward passes over {n_tok:,} tokens (one per batch)"
         + (f"; fine-tune {opts.steps} AdamW steps, one batch each: {opts.steps} more forward + backward passes, "
            "AdamW's moments and a host copy of the weights (3x the parameters), weights restored after"
            if opts.steps else "; --steps N adds an N-step AdamW fine-tune") + ".")
    t0 = time.perf_counter()
    with grads_enabled(model) as params, Fp32GradSums(params) as sums, cap, \
            _task(progress, f"gradients ({LOSS_NAMES[kind].split(':')[0][:40]})", n_tok) as adv:
        for i, b in enumerate(batches):
            b = TokenBatch(b.input_ids.to(dev), b.attention_mask.to(dev), list(b.categories))
            masked = masks(b, i)
            seen = b if kind != "masked-view" else TokenBatch(
                torch.cat([b.input_ids, b.input_ids]), torch.cat([b.attention_mask, b.attention_mask]),
                list(b.categories) * 2)
            before = _nonfinite_count(cap)
            with cap.batch(seen, index=i):
                loss_sum, _, _ = forward_loss(model, kind, b, masked, masker.mask_id)
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
            grads = [x for x in (sums.grad(p) for p in g.params) if x is not None]
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
    effective = measure_effective(model, find_writers(model, layout, sites), opts.lr, opts.steps, kind, batches,
                                  masks, masker.mask_id, progress)
    return GradProfile(lm.info.spec, layout.n_layers, kind, name, total_loss / kept_units, kept_units, kept_tok,
                       blocks, gdf, residual, seconds, report, skipped, effective)


def _nonfinite_count(cap: Capture) -> int:
    """(hook point, batch) pairs with inf/NaN the capture has noted so far (it reads its device-side sums here)."""
    return sum(r["batches"] for r in cap.nonfinite.values())


def _block_table(gdf: pd.DataFrame, n_blocks: int) -> pd.DataFrame:
    """Per block: the L2 norm of all its parameters' gradients and of its attention, MLP and norm groups (the
    root of the sum of the group norms squared), its parameter norm, and its relative depth (i + 0.5) / L."""
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
def run(ctx: RunContext, opts: GradsOptions) -> Result:
    """Gradient profile of ``ctx.lm``: L2 gradient norms per block and parameter group, and ||dL/dh||.

    ``ctx`` carries the loaded model, its layout and norm sites (probed once) and the text sample; ``ctx.progress``
    is the CLI's progress bar or None (silent). Two models are compared by ``normscope compare A B --only grads``,
    which overlays their results on relative depth.
    """
    profile = measure(ctx.lm, ctx.sample, opts, ctx.progress, layout=ctx.layout, sites=ctx.sites)
    result = _build_result(ctx.lm, ctx.sample, opts, profile)
    flag_nonfinite(result, profile.nonfinite, _skipped_note(profile))
    return result


def _skipped_note(p: GradProfile) -> str:
    """What the inf/NaN note says about the batches the gradients leave out."""
    n = len(p.skipped_batches)
    if not n:
        return "no batch left out of the gradients and the loss"
    return (f"{n} batch{'es' if n != 1 else ''} of {p.model} ({', '.join(map(str, p.skipped_batches))}) left out "
            "of the gradients and the loss")


def _build_result(lm: Any, sample: Any, opts: GradsOptions, p: GradProfile) -> Result:
    r = p.residual["grad_rest"]
    headlines: dict[str, Any] = {
        f"loss ({p.loss_kind})": round(p.loss, 4),
        "block grad, first/last third": round(thirds_ratio(p.blocks["total"]), 3),
        "residual grad, embeddings/last": round(float(r.iloc[0] / r.iloc[-1]), 3),
    }
    tables: dict[str, pd.DataFrame] = {
        "blocks": p.blocks,
        "residual": p.residual.assign(depth=p.residual["point"] / p.n_blocks),
        "groups": p.groups,
    }
    if p.effective is not None:
        tables["writers"] = p.effective.writers
        if p.effective.steps:
            tables["updates"] = p.effective.updates
    payload: dict[str, Any] = {"model": p.model, "profiles": [p.to_dict()],  # one profile: a list for the JSON's sake
                               "accumulation": "gradient of the mean loss over the whole text, accumulated over "
                                               "batches (one backward per batch; in float32 for half-precision "
                                               "models)"}
    return Result(analysis="grads", title="Gradient flow per layer", meta=build_meta(lm, sample, **opts.__dict__),
                  payload=payload, tables=tables, axes=AXES, labels=LABELS, figures=figures(p), headlines=headlines,
                  summary=summary(p), references=REFERENCES, timings={f"forward + backward, {p.model}": p.seconds,
                           **({f"fine-tune, {p.effective.steps} steps": p.effective.seconds}
                              if p.effective is not None and p.effective.steps else {})})

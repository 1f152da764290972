"""Effective learning rates of ``normscope grads``: per weight matrix whose output a norm normalizes, its norm
||w||, the effective step sizes lr/||w||^2 (SGD) and lr/||w|| (Adam), and, over a short AdamW fine-tune
(``--steps N``), the relative update ||dw||/||w|| of every step.

Lyle et al. 2024, "Normalization and effective learning rates in reinforcement learning" (NeurIPS 2024,
arXiv:2407.01800): for a weight the model is invariant to the scale of (its output normalized), the gradient
shrinks as 1/||w||, so the same learning rate turns ``w`` by less as ||w|| grows; their Normalize-and-Project
(NaP) keeps ||w|| fixed to keep that step constant. Which weights, and how far their scale invariance holds
(``exact`` or only ``joint`` with the other writers of the residual stream), is decided in
:mod:`normscope.core.writers`. The numbers mean an effective learning rate only for scale-invariant weights; a
frozen-divisor site (remove-ln, :mod:`normscope.removal.frozen`) divides by a constant, and its writers lose the
invariance: their ||dw||/||w|| is then a raw relative change.

The fine-tune runs on the loaded model itself, in memory, after the gradient measurement: every parameter is
copied to host memory first and copied back afterwards (bit-identical), so later analyses of the same loaded
model (``normscope report``) see the original weights. Memory: that copy plus AdamW's two moments, three times
the parameters, and one copy of the tracked weights for the per-step difference.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch

from normscope.analyses.grads.losses import forward_loss
from normscope.analyses.grads.metrics import effective_lr, relative_update
from normscope.analyses.grads.params import grads_enabled
from normscope.core.progress import progress_task as _task
from normscope.core.text import TokenBatch
from normscope.core.writers import Writer

__all__ = ["ADAMW", "EffectiveLR", "fine_tune", "writer_table"]

ADAMW = {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}  # torch.optim.AdamW's defaults
WRITER_COLUMNS = ["name", "kind", "block", "site", "invariance", "numel", "weight_norm", "eff_lr_sgd",
                  "eff_lr_adam", "lr_over_rms"]
UPDATE_COLUMNS = ["step", "name", "kind", "block", "rel_update"]


@dataclass
class EffectiveLR:
    """What :func:`measure_effective` found: one row per weight, and one per step and weight."""

    lr: float
    steps: int
    writers: pd.DataFrame  # WRITER_COLUMNS (+ update_first, update_mean, update_last with --steps)
    updates: pd.DataFrame  # UPDATE_COLUMNS, one row per step and weight
    losses: list[float] = field(default_factory=list)  # the loss of each step's batch, before its update
    skipped: list[int] = field(default_factory=list)  # steps left out because the loss or a gradient overflowed
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """The JSON's ``effective_lr`` entry."""
        return {"lr": self.lr, "steps": self.steps, "optimizer": {"name": "AdamW", **ADAMW},
                "writers": self.writers.to_dict("records"), "updates": self.updates.to_dict("records"),
                "step_losses": self.losses, "skipped_steps": self.skipped}


def writer_table(writers: list[Writer], lr: float) -> pd.DataFrame:
    """Per weight: where it writes, ||w|| (float64) and the effective step sizes of :func:`effective_lr`."""
    rows = []
    for w in writers:
        norm = float(w.weight.detach().double().norm())
        eff = effective_lr(norm, w.weight.numel(), lr)
        rows.append({"name": w.name, "kind": w.kind, "block": w.block, "site": w.site, "invariance": w.invariance,
                     "numel": w.weight.numel(), "weight_norm": norm, "eff_lr_sgd": eff["sgd"],
                     "eff_lr_adam": eff["adam"], "lr_over_rms": eff["adam_first"]})
    return pd.DataFrame(rows, columns=WRITER_COLUMNS)


def fine_tune(model: torch.nn.Module, kind: str, batches: list[TokenBatch],
              masks: Callable[[TokenBatch, int], torch.Tensor | None], mask_id: int | None, writers: list[Writer],
              lr: float, steps: int, progress: Any = None) -> tuple[pd.DataFrame, list[float], list[int]]:
    """``steps`` AdamW steps on the mean loss of one batch each (batch k mod n at step k), the model put back
    afterwards; returns the per-step ||dw||/||w|| of each writer, each step's loss and the steps skipped."""
    params = list(model.parameters())  # tied parameters once
    saved = [p.detach().to("cpu", copy=True) for p in params]
    before = [w.weight.detach().clone() for w in writers]  # buffers reused every step
    dev = params[0].device
    rows: list[dict[str, Any]] = []
    losses: list[float] = []
    skipped: list[int] = []
    try:
        with grads_enabled(model), _task(progress, f"fine-tune ({steps} AdamW steps)", steps) as adv:
            opt = torch.optim.AdamW(params, lr=lr, **ADAMW)  # type: ignore[arg-type]
            for k in range(steps):
                i = k % len(batches)
                b = batches[i]
                b = TokenBatch(b.input_ids.to(dev), b.attention_mask.to(dev), list(b.categories))
                loss_sum, n, _ = forward_loss(model, kind, b, masks(b, i), mask_id)
                loss = loss_sum / max(n, 1)
                losses.append(float(loss.detach()))
                ok = math.isfinite(losses[-1])
                if ok:
                    loss.backward()
                    ok = all(bool(torch.isfinite(p.grad).all()) for p in params if p.grad is not None)
                if ok:
                    with torch.no_grad():
                        for q, w in zip(before, writers, strict=True):
                            q.copy_(w.weight.detach())
                    opt.step()
                else:  # an overflowing step would poison AdamW's moments: left out
                    skipped.append(k)
                opt.zero_grad(set_to_none=True)
                for q, w in zip(before, writers, strict=True):
                    rel = relative_update(w.weight.detach(), q) if ok else math.nan
                    rows.append({"step": k + 1, "name": w.name, "kind": w.kind, "block": w.block, "rel_update": rel})
                if adv is not None:
                    adv(1)
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)
    return pd.DataFrame(rows, columns=UPDATE_COLUMNS), losses, skipped


def measure_effective(model: torch.nn.Module, writers: list[Writer], lr: float, steps: int, kind: str,
                      batches: list[TokenBatch], masks: Callable[[TokenBatch, int], torch.Tensor | None],
                      mask_id: int | None, progress: Any = None) -> EffectiveLR:
    """The writer table at the loaded weights, and with ``steps`` > 0 the fine-tune's per-step updates folded into
    it (first, mean over the steps kept, last)."""
    t0 = time.perf_counter()
    table = writer_table(writers, lr)
    updates = pd.DataFrame(columns=UPDATE_COLUMNS)
    losses: list[float] = []
    skipped: list[int] = []
    if steps > 0:
        updates, losses, skipped = fine_tune(model, kind, batches, masks, mask_id, writers, lr, steps, progress)
        by = updates.groupby("name", sort=False)["rel_update"]
        table["update_first"] = table["name"].map(by.first())
        table["update_mean"] = table["name"].map(by.mean())
        table["update_last"] = table["name"].map(by.last())
    return EffectiveLR(lr, steps, table, updates, losses, skipped, time.perf_counter() - t0)

"""normscope's own computation of DLA and DE, independent of TransformerLens: forward hooks read the input of
every attention output projection (z, split into per-head outputs z_h @ W_O[h]), every MLP output and the
final residual; :func:`normscope.analyses.dla.metrics.dla_and_de` turns them into DLA and DE for every head and
MLP layer of one batch. The bridge's numbers are checked against this (:mod:`.bridge`), and it is the backend
where the bridge cannot serve a model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from normscope.analyses.dla.metrics import dla_and_de, head_dla_and_de, next_token_targets, predicted_positions
from normscope.analyses.dla.plan import Plan, input_hooks
from normscope.analyses.dla.reducers import AttributionStats, Stash, Totals
from normscope.core.capture import BatchContext, Capture
from normscope.core.nonfinite import watch_residual

__all__ = ["DirectHooks", "direct_attributions", "run_direct"]


class DirectHooks:
    """normscope's own hooks for the independent computation: the input of every attention output projection
    (z), every MLP output, the final residual, and the hidden activations of the last MLP."""

    def __init__(self, lm: Any, plan: Plan, with_acts: bool) -> None:
        self.plan = plan
        self.cap = Capture(lm.model, plan.layout, plan.sites)
        blocks = plan.layout.blocks
        self.mlp = [self.cap.add(f"blocks.{b.index}.mlp.hook_out", Stash()) if b.mlp is not None else None
                    for b in blocks]
        self.diff = {b.index: [self.cap.add(f"blocks.{b.index}.{p}", Stash())
                               for p in ("hook_resid_post", "hook_resid_pre", "attn.hook_out")]
                     for b in blocks if b.mlp is None}
        self.resid = self.cap.add(f"{plan.final.name}.hook_in", Stash())
        watch_residual(self.cap, plan.layout)
        self.modules = [*plan.o_proj] + ([plan.mlp_out] if with_acts and plan.mlp_out is not None else [])
        self.store: dict[int, torch.Tensor] = {}

    @contextmanager
    def active(self) -> Iterator[DirectHooks]:
        with self.cap, input_hooks(self.modules, self.store):
            yield self

    def mlp_out(self, i: int) -> torch.Tensor:
        """``[batch, pos, d]`` what block i's MLP added to the residual (for inline MLPs: post - pre - attn)."""
        stash = self.mlp[i]
        if stash is not None:
            assert stash.x is not None
            return stash.x
        post, pre, attn = (s.x for s in self.diff[i])
        assert post is not None and pre is not None and attn is not None
        return post - pre - attn

    def attributions(self, sel: torch.Tensor, tgt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """DLA and DE ``[C, N]`` of the last batch, components layer by layer (heads, then the MLP)."""
        plan = self.plan
        assert self.resid.x is not None
        r = self.resid.x[sel.to(self.resid.x.device)]  # [N, d]
        sel, tgt = sel.to(r.device), tgt.to(r.device)  # blocks may sit on other devices (--device-map)
        u = plan.gain.to(r.device)[None] * plan.w_u[tgt.to(plan.w_u.device)].to(r.device).float()  # [N, d]
        dlas, des = [], []
        for i in range(plan.layout.n_layers):
            z = self.store[i].to(r.device)  # [batch, pos, n_heads * d_head]
            kw = {"centered": plan.final.centered, "eps": plan.final.eps}
            a_h, e_h = head_dla_and_de(z[sel], plan.w_o[i].to(r.device), plan.n_heads, r, u, **kw)  # [H, N]
            a_m, e_m = dla_and_de(self.mlp_out(i).to(r.device)[sel][None], r, u, **kw)  # [1, N]
            dlas += [a_h, a_m]
            des += [e_h, e_m]
        return torch.cat(dlas).cpu(), torch.cat(des).cpu()


def run_direct(lm: Any, plan: Plan, sample: Any, stats: AttributionStats | None, totals: Totals,
                top: list[int], advance: Any) -> list[dict[str, Any]]:
    """One pass over the sample with normscope's hooks: attributions (when ``stats``), CE, neuron activations.

    Returns the pass's inf/NaN report (:meth:`Capture.nonfinite_report`)."""
    hooks = DirectHooks(lm, plan, with_acts=bool(top))

    def on_out(out: Any, ctx: BatchContext) -> None:
        sel, tgt = next_token_targets(ctx.input_ids, ctx.attention_mask)
        if top:
            totals.add_acts(hooks.store[len(plan.o_proj)][..., top], ctx.attention_mask)
        if stats is None:
            return
        totals.add_logits(out.logits[sel], tgt)
        dla, de = hooks.attributions(sel, tgt)
        pos = predicted_positions(sel)
        stats.add(dla, de, pos)
        stats.sample(dla, de, pos)

    with hooks.active():
        hooks.cap.run(sample.iter_batches(), on_output=on_out, progress=advance)
    return hooks.cap.nonfinite_report()


@dataclass
class _Batch:
    """What :meth:`Capture.batch` reads of a TokenBatch, for one bare batch of ids."""

    input_ids: torch.Tensor  # [batch, pos]
    attention_mask: torch.Tensor  # [batch, pos]
    categories: tuple[str, ...] = ()


def direct_attributions(lm: Any, plan: Plan, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The independent computation on one batch: ``dla``/``de`` ``[C, N]`` in the bridge's component order, and
    the model's own ``logits`` ``[N, vocab]`` at the predicted positions."""
    hooks = DirectHooks(lm, plan, with_acts=False)
    with torch.no_grad(), hooks.active(), hooks.cap.batch(_Batch(ids, mask)):
        out = lm.model(input_ids=ids, attention_mask=mask, use_cache=False)
    sel, tgt = next_token_targets(ids, mask)
    dla, de = hooks.attributions(sel, tgt)
    return {"dla": dla, "de": de, "sel": sel, "tgt": tgt, "logits": out.logits[sel]}


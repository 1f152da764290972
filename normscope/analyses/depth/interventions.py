"""Interventions of the curse-of-depth analysis: hooks that change the forward pass (skip a block, scale the
pre-norm outputs), as opposed to the reducers, which only observe it.

* skipping blocks (identity): layer effectiveness, and Gromov et al. 2024's dropped window (arXiv:2403.17887);
* LayerNorm Scaling at inference: Sun, Yin, Li, Liu et al. 2025 (arXiv:2502.05795);
* residual-branch scaling at inference ("On residual network depth", 2025): each block's attention and MLP
  outputs times a constant, 1/sqrt(L) or 1/sqrt(l) before they join the residual stream.
"""

from __future__ import annotations

from typing import Any

import torch

from normscope.analyses.depth.metrics import lns_factor
from normscope.analyses.depth.reducers import _Call
from normscope.core.capture import BatchContext, Capture

PRE_NORM_ROLES = ("pre_attn", "pre_mlp")


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
            cap.intervene(f"{s.name}.hook_out", _Scale(lns_factor(s.layer)))
            names.append(s.name)
    return names


def residual_scale_interventions(cap: Capture, layout: Any, factors: list[float]) -> int:
    """Residual-branch scaling at inference: block ``l``'s attention and MLP outputs times ``factors[l]`` before
    they join the residual stream. Returns the number of branches scaled."""
    n = 0
    for k, b in enumerate(layout.blocks):
        for hook, present in ((f"blocks.{b.index}.attn.hook_out", b.attn), (f"blocks.{b.index}.mlp.hook_out", b.mlp)):
            if present is not None:
                cap.intervene(hook, _Scale(factors[k]))
                n += 1
    return n


class _Scale:
    """An intervention that multiplies a hook's tensor by a constant."""

    def __init__(self, factor: float) -> None:
        self.factor = factor

    def __call__(self, x: Any, ctx: Any) -> Any:
        return x * self.factor

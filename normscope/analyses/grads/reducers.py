"""The reducer of ``normscope grads``: per residual point, the moments of the per-token norm ||dL/dh|| of the
gradient on the residual stream (position 0 apart), folded inside a tensor hook during the backward pass, so
nothing per token outlives its batch (Xiong et al. 2020, arXiv:2002.04745; Sun et al. 2025, "The Curse of Depth
in Large Language Models", arXiv:2502.05795).
"""

from __future__ import annotations

import torch

from normscope.core.capture import BatchContext, TokenMoments

__all__ = ["ResidualGrad"]


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
        """h: ``[batch, pos, d_model]`` the residual stream at this point, returned unchanged."""
        if h.requires_grad:
            # float32 before the scale: dL_sum/dh can pass float16's 65,504 where dL_mean/dh does not
            h.register_hook(lambda g, ctx=ctx: self.moments.update(g.detach().float() * self.scale, ctx))
        return h

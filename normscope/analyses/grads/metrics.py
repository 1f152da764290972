"""The pure metrics of ``normscope grads``: tensors in, numbers (or tensors of them) out; no hooks, no plotly.

* L2 norms of parameter gradients per block and group (:func:`l2`) and the first-third / last-third ratio of a
  per-block curve (:func:`thirds_ratio`): Li et al. 2024, "Mix-LN: Unleashing the Power of Deeper Layers by
  Combining Pre-LN and Post-LN" (arXiv:2412.13795), after Xiong et al. 2020, "On Layer Normalization in the
  Transformer Architecture" (arXiv:2002.04745);
* the masked-view cosine loss of encoders without a head (:func:`mean_pool`, :func:`masked_view_loss`,
  :func:`mask_positions`): the two-view objective of Gao et al. 2021, "SimCSE: Simple Contrastive Learning of
  Sentence Embeddings" (arXiv:2104.08821), with masking as the augmentation, pooled as sentence-transformers do;
* the effective learning rates of scale-invariant weights (:func:`effective_lr`, :func:`relative_update`):
  Lyle et al. 2024, "Normalization and effective learning rates in reinforcement learning" (NeurIPS 2024,
  arXiv:2407.01800): lr/||w||^2 for SGD, lr/||w|| for Adam, and the relative update ||dw||/||w|| of a step.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

__all__ = ["effective_lr", "l2", "mask_positions", "masked_view_loss", "mean_pool", "relative_update", "thirds_ratio"]


L2_CHUNK = 1 << 22  # elements per piece of :func:`l2`: a float32 copy of a half-precision piece is 16 MiB


def l2(tensors: list[torch.Tensor]) -> float:
    """L2 norm of several tensors (any shapes) taken together: sqrt(sum of squares) (Mix-LN's per-layer gradient
    norm when the tensors are one block's parameter gradients).

    Each tensor is read in pieces of :data:`L2_CHUNK` elements whose norms are taken in float32 on the tensor's
    device (a half-precision piece is cast one piece at a time, never the whole tensor, and never to float64);
    the pieces' squares are summed in float64, one host sync per tensor. Float32 squares bound it to norms
    below ~1e19.
    """
    total = 0.0
    for t in tensors:
        flat = t.detach().reshape(-1)  # [numel], a view for the contiguous parameters and gradients
        if flat.numel() == 0:
            continue
        pieces = torch.stack([torch.linalg.vector_norm(c, dtype=torch.float32) for c in flat.split(L2_CHUNK)])
        total += float(pieces.double().pow(2).sum())
    return math.sqrt(total)


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


def thirds_ratio(values: pd.Series | np.ndarray) -> float:
    """Mean of the first third over the mean of the last third of a per-block curve ``[n_blocks]`` (> 1:
    gradients shrink with depth, as Mix-LN finds for Pre-LN models; < 1: they grow, as for Post-LN)."""
    v = np.asarray(values, dtype=float)
    k = max(1, len(v) // 3)
    return float(np.nanmean(v[:k]) / np.nanmean(v[-k:]))


def effective_lr(weight_norm: float, numel: int, lr: float) -> dict[str, float]:
    """Effective step sizes of a scale-invariant weight of Frobenius norm ``weight_norm`` with ``numel`` entries
    at learning rate ``lr`` (Lyle et al. 2024, arXiv:2407.01800): ``sgd`` = lr/||w||^2 (the gradient of a
    scale-invariant weight shrinks as 1/||w||, so an SGD step turns its direction by lr ||g_unit|| / ||w||^2);
    ``adam`` = lr/||w|| (Adam's step does not scale with the gradient); ``adam_first`` = lr sqrt(numel)/||w|| =
    lr/rms(w), the relative update ||dw||/||w|| of Adam's first step, whose every entry moves by about lr."""
    if not weight_norm > 0:
        return {"sgd": math.inf, "adam": math.inf, "adam_first": math.inf}
    return {"sgd": lr / weight_norm ** 2, "adam": lr / weight_norm, "adam_first": lr * math.sqrt(numel) / weight_norm}


def relative_update(new: torch.Tensor, old: torch.Tensor) -> float:
    """||new - old|| / ||old|| in float64: the relative update of one optimizer step (any shapes, equal)."""
    den = float(old.double().norm())
    return float((new.double() - old.double()).norm()) / den if den > 0 else math.inf

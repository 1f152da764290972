"""Pure metrics of the curse-of-depth analysis: tensors in, numbers out (no hooks, no plotting).

* token norm and variance, the relative update of a block: Sun, Yin, Li, Liu et al. 2025, "The Curse of Depth
  in Large Language Models" (arXiv:2502.05795), code ``lmsdss/LayerNorm-Scaling``;
* angular distance and the cheapest window of blocks to drop: Gromov, Tirumala, Shapourian, Glorioso, Roberts
  2024, "The Unreasonable Ineffectiveness of the Deeper Layers" (arXiv:2403.17887);
* massive activations: Sun, Chen, Kolter, Liu 2024, "Massive Activations in Large Language Models"
  (arXiv:2402.17762);
* LayerNorm Scaling's factor 1/sqrt(l): Sun et al. 2025.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from normscope.core.errors import NormscopeError

MASSIVE_MIN = 100.0  # Sun et al. 2024: a massive activation exceeds 100 in magnitude ...
MASSIVE_RATIO = 1000.0  # ... and about 1,000 times the median magnitude of the hidden state


def token_l2(h: torch.Tensor) -> torch.Tensor:
    """L2 norm of each token's vector (the residual-norm growth of Sun et al. 2025, arXiv:2502.05795).

    h: ``[batch, pos, d]``; returns ``[batch, pos]`` float32.
    """
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
    """Collapse trailing dims of a per-token quantity (a divisor ``[batch, pos, 1]`` or ``[b, p, heads, 1]``):
    the norm divisor that tracks the growing residual norm (Sun et al. 2025, arXiv:2502.05795).
    Returns ``[batch, pos]`` float32."""
    v = v.float()
    while v.ndim > 2:
        v = v.mean(dim=-1)
    return v


def relative_update(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """||after - before|| / ||before|| per token (the relative update of a block, Sun et al. 2025).

    before, after: ``[batch, pos, d]``; returns ``[batch, pos]`` float32.
    """
    b = before.float()
    return (after.float() - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-30)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real (mask 1) token of each row, so a pad is never read (left or right padding); the
    token on which Gromov et al. 2024 (arXiv:2403.17887) measure angular distances.

    attention_mask: ``[batch, pos]``; returns ``[batch]`` long (0 for an all-pad row).
    """
    pos = torch.arange(attention_mask.shape[1], device=attention_mask.device)  # [pos]
    return torch.where(attention_mask.bool(), pos, torch.zeros_like(pos)).max(dim=1).values


def angular_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """arccos(cos(a, b)) / pi over the last dim, in [0, 1] (Gromov et al. 2024, arXiv:2403.17887).

    a, b: ``[..., d]``; returns ``[...]`` float64.
    """
    a, b = a.double(), b.double()
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-300)
    return torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi


def angular_distance_matrix(vecs: torch.Tensor) -> torch.Tensor:
    """Angular distance between every pair of layers, per sequence (Gromov et al. 2024, arXiv:2403.17887).

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
    """For every window size n, the start l minimising d(h_l, h_{l+n}) (Gromov et al. 2024, arXiv:2403.17887:
    the blocks to drop).

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
    """Fit log(y) = a + p log(l + 1) (power law) and log(y) = a + r l (exponential); report both with R^2
    (the growth with depth of Sun et al. 2025, arXiv:2502.05795).

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
    """LayerNorm Scaling (Sun et al. 2025, arXiv:2502.05795): the pre-norm output of block ``layer`` (0-based)
    times 1/sqrt(l + 1)."""
    return 1.0 / math.sqrt(layer + 1)


def massive_tokens(h: torch.Tensor, mask: torch.Tensor, min_abs: float = MASSIVE_MIN,
                   ratio: float = MASSIVE_RATIO) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens that carry a massive activation (Sun, Chen, Kolter, Liu 2024, arXiv:2402.17762, section 2).

    An activation is massive when its magnitude exceeds ``min_abs`` (100) and ``ratio`` (1,000) times the median
    magnitude of the hidden state, the median taken over every dim of every real (mask 1) token of ``h``.
    h: ``[batch, pos, d]``; mask: ``[batch, pos]``. Returns ``(massive [batch, pos] bool, largest |h| of each
    token [batch, pos] float32, its dim [batch, pos] long)``; pads are never massive.
    """
    a = h.float().abs()  # [batch, pos, d]
    top, dim = a.max(dim=-1)  # [batch, pos]
    real = mask.bool().to(a.device)
    if not bool(real.any()):
        return torch.zeros_like(real), top, dim
    med = a[real].median()  # over [n_real, d]: the median magnitude of the hidden state
    return real & (top > min_abs) & (top >= ratio * med), top, dim


def spread_subset(n: int, take: int) -> list[int]:
    """``take`` of the indices ``0..n-1``, evenly spread over them (first and last included when ``take > 1``),
    so that a subset of a sample's sequences keeps its mix of text kinds. ``take >= n`` returns all of them."""
    if take >= n:
        return list(range(n))
    if take <= 1:
        return [0] if take == 1 and n else []
    return sorted({round(i * (n - 1) / (take - 1)) for i in range(take)})


def paired_loss_delta(base_sum: list[float], other_sum: list[float], n_tokens: list[int]) -> tuple[float, float]:
    """Mean loss change per token between two passes over the same sequences, and its standard error.

    ``base_sum``, ``other_sum``: each sequence's summed next-token loss in the two passes; ``n_tokens``: its
    predicted tokens. The change is ``sum(other - base) / sum(n)`` (the token-weighted mean, as the losses
    themselves); its standard error treats sequences as the sampled units (a ratio estimator over clusters,
    because tokens of one sequence are not independent): ``sqrt(m / (m - 1) * sum((d_s - D n_s)^2)) / sum(n)``
    with ``d_s`` the sequence's summed change and ``m`` the number of sequences. NaN for fewer than two.
    """
    d = np.asarray(other_sum, dtype=float) - np.asarray(base_sum, dtype=float)  # [m]
    n = np.asarray(n_tokens, dtype=float)
    total = float(n.sum())
    if not total:
        return float("nan"), float("nan")
    mean = float(d.sum()) / total
    m = len(d)
    if m < 2:
        return mean, float("nan")
    se = math.sqrt(m / (m - 1) * float(((d - mean * n) ** 2).sum())) / total
    return mean, se

"""The functions a norm site can be swapped for: DyT, Derf and SeeDNorm, as modules acting on the last dim.

* **DyT** (Zhu, Chen, He, LeCun, Liu 2025, "Transformers without Normalization", arXiv:2503.10622):
  ``gamma * tanh(alpha * x) + beta`` with one scalar ``alpha`` per site and ``gamma``, ``beta`` in R^d. The
  paper initialises alpha = 0.5 (LLaMA: 0.8 / 0.2 / 0.2 for attention / FFN / final norms at 7B) and trains
  from scratch; its LLaMA variant has no ``beta``. Here ``beta`` exists only where the replaced norm has a
  bias (LayerNorm), so an RMSNorm site becomes the Llama variant.
* **Derf** (Chen, Lu, Zhu, Sun, Liu 2025, "Stronger Normalization-Free Transformers", arXiv:2512.10938):
  ``gamma * erf(alpha * x + s) + beta`` with scalars ``alpha`` and ``s``; ``beta`` as for DyT.
* **SeeDNorm** (Cai, Zhu, Liu, Min 2025, "SeeDNorm: Self-Rescaled Dynamic Normalization", arXiv:2510.22777):
  ``[tanh(x . beta) * alpha + gamma] * x / RMS(x)`` with ``beta``, ``alpha``, ``gamma`` in R^d; ``x . beta`` is
  one scalar per token. With ``beta = 0`` it is RMSNorm with gain ``gamma`` exactly, so a pretrained RMSNorm
  site converts with no error at step 0. ``alpha`` starts at 1 (with ``alpha = 0`` too, neither would get a
  gradient); a LayerNorm site keeps its bias as an added term (SeeDNorm has none) and loses its centring.

BHyT is not offered: no primary source for its formula was found, so it is refused rather than guessed.

Every function computes in float32 and returns the input's dtype. Shapes: ``x`` is ``[..., d]`` (``[batch, pos,
d_model]`` for residual norms, ``[batch, pos, heads, d_head]`` for qk-norms).
"""

from __future__ import annotations

import math

import torch
from torch import nn

TARGETS = ("dyt", "derf", "seednorm")
REFUSED = {
    "bhyt": "BHyT is left out: no primary source for its formula was found, and a guessed formula would not be "
            "BHyT; use --to dyt, derf or seednorm.",
}
NAIVE_ALPHA = 0.5
"""DyT's published default initialisation of alpha (Zhu et al. 2025): the naive transplant the fit is compared with."""


def dyt(x: torch.Tensor, alpha: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor | None = None) -> torch.Tensor:
    """``gamma * tanh(alpha * x) + beta``. x ``[..., d]``, alpha scalar, gamma / beta ``[d]``."""
    y = torch.tanh(alpha * x) * gamma
    return y + beta if beta is not None else y


def derf(x: torch.Tensor, alpha: torch.Tensor, shift: torch.Tensor, gamma: torch.Tensor,
         beta: torch.Tensor | None = None) -> torch.Tensor:
    """``gamma * erf(alpha * x + s) + beta``. x ``[..., d]``, alpha and s scalars, gamma / beta ``[d]``."""
    y = torch.erf(alpha * x + shift) * gamma
    return y + beta if beta is not None else y


def seednorm(x: torch.Tensor, beta: torch.Tensor, alpha: torch.Tensor, gamma: torch.Tensor, eps: float,
             bias: torch.Tensor | None = None) -> torch.Tensor:
    """``[tanh(x . beta) * alpha + gamma] * x / sqrt(mean(x^2) + eps)`` (+ ``bias``).

    x ``[..., d]``, the rest ``[d]``."""
    inv = torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)  # [..., 1]
    scale = torch.tanh(x @ beta)[..., None] * alpha + gamma  # [..., d]: one tanh per token, times alpha
    y = scale * x * inv
    return y + bias if bias is not None else y


class SwapFunction(nn.Module):
    """Base class: the float32 computation and the cast back to the input's dtype."""

    kind = ""

    def compute(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., d] float32
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., d]
        return self.compute(x.float()).to(x.dtype)

    def describe(self) -> dict[str, float]:
        """The scalars of the function (for the per-site table)."""
        return {}


class DyT(SwapFunction):
    """Dynamic Tanh (Zhu et al. 2025): ``gamma * tanh(alpha * x) + beta``, alpha one scalar."""

    kind = "dyt"

    def __init__(self, d: int, alpha: float = NAIVE_ALPHA, gamma: torch.Tensor | None = None,
                 beta: torch.Tensor | None = None, *, with_beta: bool = False) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor(float(alpha)))
        self.gamma = nn.Parameter(gamma.detach().float().clone() if gamma is not None else torch.ones(d))
        self.beta = (nn.Parameter(beta.detach().float().clone() if beta is not None else torch.zeros(d))
                     if with_beta or beta is not None else None)

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        return dyt(x, self.alpha, self.gamma, self.beta)

    def describe(self) -> dict[str, float]:
        return {"alpha": float(self.alpha.detach())}


class Derf(SwapFunction):
    """Dynamic erf (Chen et al. 2025): ``gamma * erf(alpha * x + s) + beta``, alpha and s scalars."""

    kind = "derf"

    def __init__(self, d: int, alpha: float = NAIVE_ALPHA, gamma: torch.Tensor | None = None,
                 beta: torch.Tensor | None = None, *, shift: float = 0.0, with_beta: bool = False) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor(float(alpha)))
        self.shift = nn.Parameter(torch.tensor(float(shift)))
        self.gamma = nn.Parameter(gamma.detach().float().clone() if gamma is not None else torch.ones(d))
        self.beta = (nn.Parameter(beta.detach().float().clone() if beta is not None else torch.zeros(d))
                     if with_beta or beta is not None else None)

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        return derf(x, self.alpha, self.shift, self.gamma, self.beta)

    def describe(self) -> dict[str, float]:
        return {"alpha": float(self.alpha.detach()), "shift": float(self.shift.detach())}


class SeeDNorm(SwapFunction):
    """Self-rescaled dynamic normalization (Cai et al. 2025); ``beta = 0`` makes it RMSNorm with gain ``gamma``."""

    kind = "seednorm"

    def __init__(self, d: int, eps: float, gamma: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                 *, alpha: float = 1.0, beta_init: float = 0.0) -> None:
        super().__init__()
        self.eps = float(eps)
        self.beta = nn.Parameter(torch.full((d,), float(beta_init)))
        self.alpha = nn.Parameter(torch.full((d,), float(alpha)))
        self.gamma = nn.Parameter(gamma.detach().float().clone() if gamma is not None else torch.ones(d))
        self.bias = nn.Parameter(bias.detach().float().clone()) if bias is not None else None

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        return seednorm(x, self.beta, self.alpha, self.gamma, self.eps, self.bias)

    def describe(self) -> dict[str, float]:
        return {"beta_norm": float(self.beta.detach().norm()), "alpha_mean": float(self.alpha.detach().mean())}


def alpha_grid(rms: float, points: int = 33, lo: float = 0.01, hi: float = 10.0) -> torch.Tensor:
    """Candidate alphas for one site, log-spaced in units of 1 / (the site's typical input RMS) ``[points]``
    float64: alpha x is then of order 0.01 (tanh linear) to 10 (saturated) for an ordinary token."""
    r = rms if rms > 0 and math.isfinite(rms) else 1.0
    return torch.logspace(math.log10(lo), math.log10(hi), points, dtype=torch.float64) / r

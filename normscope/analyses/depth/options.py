"""Settings of ``normscope depth-curse`` (no torch here: the CLI builds its options from this class)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from normscope.core import layers
from normscope.core.errors import NormscopeError
from normscope.core.options import opt

REFERENCES = [
    "Sun, Yin, Li, Liu et al. 2025, The Curse of Depth in Large Language Models (arXiv:2502.05795), "
    "code lmsdss/LayerNorm-Scaling",
    "Gromov, Tirumala, Shapourian, Glorioso, Roberts 2024, The Unreasonable Ineffectiveness of the Deeper "
    "Layers (arXiv:2403.17887)",
    "Sun, Chen, Kolter, Liu 2024, Massive Activations in Large Language Models (arXiv:2402.17762)",
    "Li et al. 2024, Mix-LN: Unleashing the Power of Deeper Layers by Combining Pre-LN and Post-LN "
    "(arXiv:2412.13795)",
]


@dataclass
class DepthOptions:
    """Settings of ``normscope depth-curse``."""

    skip: bool | None = None
    """Skip each block in turn (identity) and measure the loss: one more forward pass per skipped block per batch.
    Default: on for causal LMs; encoders have no next-token loss."""
    skip_layers: str | None = None
    """Blocks to skip one at a time (all, none, or e.g. 0-9,20-29; default: all)."""
    skip_tokens: int = opt(512, lo=0)
    """Tokens each skip-one-block loss is measured on: whole sequences spread evenly over the sample, the
    baseline loss measured on the same ones, with a standard error over them (0: every token, one full pass per
    skipped block)."""
    window: int | None = opt(None, lo=0)
    """Drop the n consecutive blocks with the smallest angular distance d(h_l, h_l+n) together (Gromov et al.)
    and measure the loss: one more pass. Default: a quarter of the blocks for causal LMs; 0: off."""
    lns: bool | None = None
    """LayerNorm Scaling what-if (Sun et al. 2025): every pre-norm output times 1/sqrt(layer + 1) at inference,
    no retraining (one more pass). Default: on when the model has pre-norm sites."""

    residual_scale: str = "none"
    """Residual-branch scaling what-if ("On residual network depth", 2025): every block's attention and MLP
    outputs times a factor at inference, no retraining (one more pass): a number (0.5), inv-sqrt-depth
    (1/sqrt(L) for every block) or inv-sqrt-layer (1/sqrt(l+1) for block l); none: off."""

    def check(self) -> None:
        residual_scale_factors(self.residual_scale, 1)  # the spelling, before anything loads
        layers.check_syntax(self.skip_layers, "--skip-layers")
        if self.skip is False and self.skip_layers not in (None, "none"):
            raise NormscopeError("--skip-layers chooses the blocks to skip, so it cannot go with --no-skip; drop one.")


RESIDUAL_SCALES = ("none", "inv-sqrt-depth", "inv-sqrt-layer")


def residual_scale_factors(spec: str, n_blocks: int) -> list[float] | None:
    """The factor of each block's attention and MLP output for ``--residual-scale``; None for ``none``."""
    s = (spec or "none").strip().lower()
    if s == "none":
        return None
    if s == "inv-sqrt-depth":
        return [1.0 / math.sqrt(n_blocks)] * n_blocks
    if s == "inv-sqrt-layer":
        return [1.0 / math.sqrt(i + 1) for i in range(n_blocks)]
    try:
        value = float(s)
    except ValueError:
        raise NormscopeError(f"--residual-scale must be a number or one of {', '.join(RESIDUAL_SCALES)}, not "
                             f"'{spec}'.") from None
    if not math.isfinite(value) or value <= 0:
        raise NormscopeError(f"--residual-scale must be a positive number, got {spec}.")
    return [value] * n_blocks

"""The reducers of ``normscope dla``: what one pass over the text folds per batch (sums, counts, and a bounded
uniform sample of scatter points), never per-token tensors across batches.

* :class:`AttributionStats`: per component, the sums behind mean DLA, mean DE and NMAE = mean|DLA - DE| /
  mean|DE| (Baroni et al. 2025, "Transformers Don't Need LayerNorm at Inference Time", arXiv:2507.02559), split
  into position 0 and the other positions;
* :class:`Totals`: the model's CE and entropy and the chosen neurons' mean activations (the means that
  mean-ablation writes back; Stolfo et al. 2024, arXiv:2406.16254);
* :class:`Stash`: the current batch's tensor of one hook point, for the attributions of that batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from normscope.analyses.dla.metrics import entropy
from normscope.core.capture import BatchContext

__all__ = ["AttributionStats", "Stash", "Totals"]


class Stash:
    """Reducer that keeps only the current batch's tensor (overwritten every batch)."""

    def __init__(self) -> None:
        self.x: torch.Tensor | None = None

    def update(self, x: torch.Tensor, ctx: BatchContext) -> None:
        """x: the hook point's tensor for this batch (``[batch, pos, d]``), replacing the last one."""
        self.x = x


class AttributionStats:
    """Per component: sums of DLA, DE, |DLA|, |DE|, |DLA - DE|, split into position 0 and other positions;
    plus a uniform sample of (component, DLA, DE) triples for the scatter plot. Memory: components x 10."""

    def __init__(self, n_components: int, scatter_points: int, n_predictions: int, seed: int) -> None:
        self.sums = torch.zeros(5, 2, n_components, dtype=torch.float64)  # [stat, pos0/rest, component]
        self.count = torch.zeros(2, dtype=torch.float64)  # predictions at position 0 / elsewhere
        self.rate = scatter_points / max(n_predictions, 1)  # scatter points per predicted token
        self.gen = torch.Generator().manual_seed(seed)
        self.samples: list[torch.Tensor] = []  # rows [component, dla, de, position]

    def add(self, dla: torch.Tensor, de: torch.Tensor, pos: torch.Tensor) -> None:
        """dla, de: ``[C, N]`` for every component; pos: ``[N]`` positions of the predicting tokens."""
        dla, de, pos = dla.double().cpu(), de.double().cpu(), pos.cpu()
        first = pos == 0
        self.count += torch.tensor([int(first.sum()), int((~first).sum())], dtype=torch.float64)
        for j, m in enumerate((first, ~first)):
            if not m.any():
                continue
            a, e = dla[:, m], de[:, m]
            self.sums[0, j] += a.sum(1)
            self.sums[1, j] += e.sum(1)
            self.sums[2, j] += a.abs().sum(1)
            self.sums[3, j] += e.abs().sum(1)
            self.sums[4, j] += (a - e).abs().sum(1)

    def sample(self, dla: torch.Tensor, de: torch.Tensor, pos: torch.Tensor) -> None:
        """Keep a uniform sample of (component, DLA, DE, position) for the scatter plot."""
        c, t = dla.shape
        n = int(round(self.rate * t))
        if not c or not t or n <= 0:
            return
        flat = torch.randint(0, c * t, (n,), generator=self.gen)
        ci, ti = flat // t, flat % t
        self.samples.append(torch.stack([ci.double(), dla.double().cpu()[ci, ti], de.double().cpu()[ci, ti],
                                         pos.cpu()[ti].double()], dim=1))

    def table(self) -> dict[str, torch.Tensor]:
        """Means over all predicted tokens, and NMAE overall / at position 0 / elsewhere, per component."""
        s, n = self.sums.sum(1), max(float(self.count.sum()), 1.0)
        out = {"mean_dla": s[0] / n, "mean_de": s[1] / n, "mean_abs_dla": s[2] / n, "mean_abs_de": s[3] / n,
               "mean_abs_err": s[4] / n, "nmae": 100 * s[4] / s[3].clamp_min(1e-300)}
        for j, key in enumerate(("pos0", "rest")):
            out[f"nmae_{key}"] = 100 * self.sums[4, j] / self.sums[3, j].clamp_min(1e-300)
            if self.count[j] == 0:
                out[f"nmae_{key}"] = torch.full_like(out["nmae"], math.nan)
        return out


class Totals:
    """Running CE and entropy of the model's predictions, and the sum of the chosen neurons' activations."""

    def __init__(self, n_neurons: int) -> None:
        self.ce = 0.0
        self.ent = 0.0
        self.n = 0
        self.act_sum = torch.zeros(n_neurons, dtype=torch.float64)
        self.act_n = 0

    def add_logits(self, logits: torch.Tensor, tgt: torch.Tensor) -> None:
        """logits: ``[N, vocab]`` at the predicted positions; tgt: ``[N]``."""
        logits = logits.float()
        self.ce += float(F.cross_entropy(logits, tgt, reduction="sum"))
        self.ent += float(entropy(logits).double().sum())
        self.n += int(tgt.numel())

    def add_acts(self, acts: torch.Tensor, mask: torch.Tensor) -> None:
        """acts: ``[batch, pos, n_neurons]`` (already restricted to the chosen neurons); mask ``[batch, pos]``."""
        a = acts[mask.to(acts.device).bool()]  # the activations may sit on another device than the mask
        self.act_sum += a.double().sum(dim=0).cpu()
        self.act_n += int(a.shape[0])

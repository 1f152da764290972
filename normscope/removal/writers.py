"""The relative update ||dw||/||w|| per step of the weights writing into each norm site, for remove-ln's per-site
log (``sites.jsonl``, column ``writer_rel_update``).

Which weights write into a site is decided once, in :mod:`normscope.core.writers` (the embeddings into the first
norm, each attention output projection into the next norm, each MLP down projection into the next block's
pre-attention norm or ``ln_final``). While a site is live its writers are scale-invariant and their
||dw||/||w|| is an effective learning rate (Lyle et al. 2024, arXiv:2407.01800); once its divisor is frozen
(:mod:`normscope.removal.frozen`) the invariance is gone, and the same number is a raw relative change, which is
where an update that was harmless before the freeze shows up. Logged for every wrapped site, live or frozen, so
the log shows the step where a site's writers start to move differently.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from normscope.core.writers import find_writers

__all__ = ["WriterUpdates", "site_writers"]


def site_writers(model: nn.Module, layout: Any, sites: list[Any]) -> dict[str, list[nn.Parameter]]:
    """Per site name, the weight matrices whose output the site normalizes (empty for a site with none, such as
    a Gemma2 pre-norm); from the fingerprints of the probe pass that built ``layout``."""
    out: dict[str, list[nn.Parameter]] = {s.name: [] for s in sites}
    for w in find_writers(model, layout, sites):
        out.setdefault(w.site, []).append(w.weight)
    return out


class WriterUpdates:
    """||dw||/||w|| of each site's writers over one optimizer step: :meth:`snapshot` right before the step (copies
    into buffers allocated once), :meth:`relative` after it."""

    def __init__(self, writers: dict[str, list[nn.Parameter]]) -> None:
        self.writers = {k: v for k, v in writers.items() if v}
        self.before: dict[str, list[torch.Tensor]] = {}

    def snapshot(self) -> None:
        """Copy every tracked weight as it is before the optimizer step."""
        with torch.no_grad():
            for k, ps in self.writers.items():
                if k not in self.before:
                    self.before[k] = [p.detach().clone() for p in ps]
                else:
                    for q, p in zip(self.before[k], ps, strict=True):
                        q.copy_(p.detach())

    def relative(self, site: str) -> float | None:
        """sqrt(sum ||w - w_before||^2 / sum ||w_before||^2) over the site's writers; None without writers or
        snapshot."""
        if site not in self.before:
            return None
        with torch.no_grad():
            num = sum(float((p.detach().double() - q.double()).norm()) ** 2
                      for p, q in zip(self.writers[site], self.before[site], strict=True))
            den = sum(float(q.double().norm()) ** 2 for q in self.before[site])
        return math.sqrt(num / den) if den > 0 else None

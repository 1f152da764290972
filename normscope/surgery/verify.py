"""The checks of a rewrite, on the model's own outputs and inside it, streamed batch by batch (memory flat).

* **Logits.** Per token, the relative difference ``||z' - z||_2 / ||z||_2`` of the rewritten model's raw
  logits ``z'`` against the original's ``z`` (raw logits, not log-softmax: the final norm's bias is kept as an
  unembedding bias, so nothing is lost to a softmax shift), its maximum and mean over tokens and per position;
  the largest absolute difference of the log-softmax; each model's next-token CE on the same tokens.
* **Residual mean.** At the input of every norm (where LN = RMSNorm must hold), per token
  ``|mean_d(h)| / rms(h)`` with ``rms(h) = sqrt(mean_d h^2)``, in both models: the rewritten stream must be
  zero-mean (float32 rounding only), the original shows how far LN and RMSNorm would disagree there (the LN
  divisor is the RMS divisor times ``sqrt(1 - r^2)``).

Jiang et al. 2023 (arXiv:2305.14858) prove the equivalence; these numbers check an implementation of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from normscope.core.capture import BatchContext, Capture
from normscope.core.losses import token_losses


def mean_ratio(x: torch.Tensor) -> torch.Tensor:
    """``|mean_d(x)| / rms(x)`` per token. x: ``[..., d]``; returns ``[...]`` float32 (0 where x is all zero)."""
    xf = x.float()
    rms = xf.pow(2).mean(-1).sqrt()  # [...]
    return xf.mean(-1).abs() / rms.clamp_min(torch.finfo(torch.float32).tiny)


class MeanRatio:
    """Reducer: running mean and max of :func:`mean_ratio` over the tokens at one hook point."""

    def __init__(self) -> None:
        self.total = 0.0
        self.n = 0
        self.max = 0.0

    def update(self, x: torch.Tensor, ctx: BatchContext) -> None:
        mask = ctx.attention_mask.to(x.device).bool()  # [batch, pos]
        r = mean_ratio(x)[mask] if x.dim() == 3 else mean_ratio(x).reshape(-1)  # [tokens]
        self.total += float(r.double().sum())
        self.n += int(r.numel())
        self.max = max(self.max, float(r.max())) if r.numel() else self.max

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else float("nan")


@dataclass
class LogitCheck:
    """Running comparison of two models' logits on the same tokens (per position and overall)."""

    seq_len: int
    max_rel: float = 0.0
    sum_rel: float = 0.0
    n: int = 0
    max_abs: float = 0.0
    max_logsoftmax_abs: float = 0.0
    pos_max: list[float] = field(default_factory=list)
    pos_sum: list[float] = field(default_factory=list)
    pos_n: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.pos_max = [0.0] * self.seq_len
        self.pos_sum = [0.0] * self.seq_len
        self.pos_n = [0] * self.seq_len

    def update(self, ref: torch.Tensor, new: torch.Tensor, mask: torch.Tensor) -> None:
        """ref, new: ``[batch, pos, vocab]``; mask: ``[batch, pos]``."""
        r, z = ref.double(), new.double()
        rel = (z - r).norm(dim=-1) / r.norm(dim=-1).clamp_min(1e-300)  # [batch, pos]
        keep = mask.bool()
        self.max_rel = max(self.max_rel, float(rel[keep].max()))
        self.sum_rel += float(rel[keep].sum())
        self.n += int(keep.sum())
        self.max_abs = max(self.max_abs, float((z - r).abs().amax(-1)[keep].max()))
        ls = (F.log_softmax(z, -1) - F.log_softmax(r, -1)).abs().amax(-1)  # [batch, pos]
        self.max_logsoftmax_abs = max(self.max_logsoftmax_abs, float(ls[keep].max()))
        for t in range(min(self.seq_len, rel.shape[1])):
            col = rel[:, t][keep[:, t]]
            if col.numel():
                self.pos_max[t] = max(self.pos_max[t], float(col.max()))
                self.pos_sum[t] += float(col.sum())
                self.pos_n[t] += int(col.numel())

    @property
    def mean_rel(self) -> float:
        return self.sum_rel / self.n if self.n else float("nan")


@dataclass
class Verification:
    """What :func:`verify` measured."""

    logits: LogitCheck
    ce_original: float
    ce_rewritten: float
    resid: list[dict[str, Any]]  # per norm input: point, site, layer, role, original/rewritten mean and max ratio
    compressed: LogitCheck | None = None
    ce_compressed: float | None = None
    n_tokens: int = 0


class _CE:
    def __init__(self) -> None:
        self.total, self.n = 0.0, 0

    def add(self, logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> None:
        ce = token_losses(logits, ids, mask)  # [n_tokens]
        self.total += float(ce.double().sum())
        self.n += int(ce.numel())

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else float("nan")


def verify(original: nn.Module, layout: Any, sites: list[Any], rewritten: nn.Module, new_layout: Any,
           new_sites: list[Any], batches: list[Any], seq_len: int, *, compressed: nn.Module | None = None,
           progress: Any = None) -> Verification:
    """Run every batch through the original, the rewritten (and the compressed) model in lockstep: compare the
    logits, score both, and reduce the residual mean ratio at every norm input of the first two."""
    by_path = {s.path: s for s in new_sites}
    ref_red = {s.path: MeanRatio() for s in sites}
    new_red = {s.path: MeanRatio() for s in sites if s.path in by_path}
    cap_o, cap_n = Capture(original, layout, sites), Capture(rewritten, new_layout, new_sites)
    for s in sites:
        cap_o.add(f"{s.name}.hook_in", ref_red[s.path])
        if s.path in by_path:
            cap_n.add(f"{by_path[s.path].name}.hook_in", new_red[s.path])
    check, ccheck = LogitCheck(seq_len), (LogitCheck(seq_len) if compressed is not None else None)
    ce = {"o": _CE(), "n": _CE(), "c": _CE()}
    dev = next(original.parameters()).device
    n_tokens = 0
    with cap_o, cap_n, torch.no_grad():
        for i, b in enumerate(batches):
            ids, mask = b.input_ids.to(dev), b.attention_mask.to(dev)  # [batch, pos]
            with cap_o.batch(b, i):
                z0 = original(input_ids=ids, attention_mask=mask, use_cache=False).logits  # [batch, pos, vocab]
            with cap_n.batch(b, i):
                z1 = rewritten(input_ids=ids, attention_mask=mask, use_cache=False).logits
            check.update(z0, z1, mask)
            ce["o"].add(z0, ids, mask)
            ce["n"].add(z1, ids, mask)
            if compressed is not None and ccheck is not None:
                z2 = compressed(input_ids=ids, attention_mask=mask, use_cache=False).logits
                ccheck.update(z0, z2, mask)
                ce["c"].add(z2, ids, mask)
            n_tokens += int(mask.sum())
            if progress is not None:
                progress(int(ids.numel()))
    resid = []
    for s in sites:
        o, n = ref_red[s.path], new_red.get(s.path)
        resid.append({"point": f"{s.name}.hook_in", "site": s.name, "layer": s.layer, "role": s.role,
                      "original_mean": o.mean, "original_max": o.max,
                      "rewritten_mean": n.mean if n else float("nan"), "rewritten_max": n.max if n else float("nan")})
    return Verification(check, ce["o"].mean, ce["n"].mean, resid, ccheck,
                        ce["c"].mean if compressed is not None else None, n_tokens)

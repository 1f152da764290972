"""Next-token losses shared by every analysis that measures a loss."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def token_losses(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy per predicted token, masked positions dropped.

    logits: ``[batch, pos, vocab]``; input_ids, attention_mask: ``[batch, pos]``. Returns ``[n_tokens]`` float32.
    """
    pred = logits[:, :-1].float()  # [batch, pos-1, vocab]
    target = input_ids[:, 1:]  # [batch, pos-1]
    keep = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
    ce = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="none")
    return ce[keep.reshape(-1)]


class LossMeter:
    """Running mean of next-token cross-entropy over batches (``on_output`` callback for ``Capture.run``)."""

    def __init__(self) -> None:
        self.total = 0.0
        self.n = 0

    def __call__(self, out: Any, ctx: Any) -> None:
        ce = token_losses(out.logits, ctx.input_ids, ctx.attention_mask)
        self.total += float(ce.double().sum())
        self.n += int(ce.numel())

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else float("nan")

"""Next-token losses shared by every analysis that measures a loss."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def token_losses(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy per predicted token, masked positions dropped.

    logits: ``[batch, pos, vocab]``; input_ids, attention_mask: ``[batch, pos]``. Returns ``[n_tokens]`` float32.
    """
    ce, keep = token_loss_grid(logits, input_ids, attention_mask)
    return ce[keep]


def token_loss_grid(logits: torch.Tensor, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy at every position and which positions count.

    logits: ``[batch, pos, vocab]``; input_ids, attention_mask: ``[batch, pos]``. Returns ``[batch, pos-1]``
    float32 losses and the ``[batch, pos-1]`` bool mask of real (predicting, predicted) pairs.
    """
    pred = logits[:, :-1].float()  # [batch, pos-1, vocab]
    target = input_ids[:, 1:]  # [batch, pos-1]
    keep = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
    ce = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="none")
    return ce.reshape(target.shape), keep


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


class SequenceLossMeter(LossMeter):
    """A :class:`LossMeter` that also keeps each sequence's summed loss and token count, in batch order (two
    floats per sequence, never a token's value), so that two passes over the same sequences can be compared
    sequence by sequence (a paired standard error)."""

    def __init__(self) -> None:
        super().__init__()
        self.seq_sum: list[float] = []
        self.seq_n: list[int] = []

    def __call__(self, out: Any, ctx: Any) -> None:
        ce, keep = token_loss_grid(out.logits, ctx.input_ids, ctx.attention_mask)  # [batch, pos-1] each
        self.total += float(ce[keep].double().sum())  # the same sum, in the same order, as LossMeter's
        self.n += int(keep.sum())
        per_seq = torch.where(keep, ce.double(), torch.zeros((), dtype=torch.float64, device=ce.device)).sum(1)
        self.seq_sum += per_seq.tolist()
        self.seq_n += keep.sum(1).tolist()

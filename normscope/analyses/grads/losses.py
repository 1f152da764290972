"""The losses ``normscope grads`` differentiates: next-token cross-entropy for causal LMs, masked-LM
cross-entropy for encoders with an MLM head, and otherwise the masked-view cosine loss (1 - cos of the mean-pooled
last hidden state of a sequence and of a copy with some tokens masked; Gao et al. 2021, "SimCSE",
arXiv:2104.08821, with masking as the augmentation), and which of them a model can take.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from normscope.analyses.grads.metrics import mask_positions, masked_view_loss
from normscope.analyses.grads.options import LOSSES
from normscope.core.errors import NormscopeError
from normscope.core.text import TokenBatch

__all__ = ["LOSS_NAMES", "Masker", "choose_loss", "forward_loss", "loss_units"]

LOSS_NAMES = {
    "next-token": "next-token cross-entropy",
    "mlm": "masked-LM cross-entropy ({rate:.0%} of tokens replaced by [MASK])",
    "masked-view": "masked-view cosine loss: 1 - cos(mean-pooled last hidden state of a sequence, of a copy with "
                   "{rate:.0%} of its tokens replaced by [MASK])",
}


def choose_loss(lm: Any, layout: Any, requested: str) -> str:
    """The loss to use, or a one-line NormscopeError when the model cannot take the requested one."""
    if requested not in LOSSES:
        raise NormscopeError(f"--loss must be one of {', '.join(LOSSES)}, not '{requested}'.")
    causal = bool(lm.info.is_causal and layout.is_causal)
    has_head = layout.unembed is not None
    if requested == "auto":
        return "next-token" if causal else ("mlm" if has_head else "masked-view")
    if requested == "next-token" and not causal:
        raise NormscopeError("--loss next-token needs a causal LM and this model is an encoder; use --loss auto.")
    if requested == "mlm" and (causal or not has_head):
        raise NormscopeError("--loss mlm needs an encoder with a masked-LM head; use --loss auto.")
    if requested == "masked-view" and causal:
        raise NormscopeError("--loss masked-view is for encoders; causal LMs use next-token loss (--loss auto).")
    if requested in ("mlm", "masked-view") and getattr(lm.tokenizer, "mask_token_id", None) is None:
        raise NormscopeError(f"--loss {requested} needs a [MASK] token and this tokenizer has none.")
    return requested


def _special_ids(tok: Any) -> list[int]:
    """The tokenizer's special token ids ([CLS], [SEP], ...), never masked."""
    return sorted({int(i) for i in (getattr(tok, "all_special_ids", None) or []) if i is not None})


def loss_units(kind: str, b: TokenBatch) -> int:
    """How many terms batch ``b`` adds to the mean loss (tokens predicted, masked tokens or sequences)."""
    m = b.attention_mask.bool()
    if kind == "next-token":
        return int((m[:, 1:] & m[:, :-1]).sum())
    return len(b)


class Masker:
    """The seeded choice of masked positions of batch ``index`` (the same for every run with one seed)."""

    def __init__(self, tok: Any, rate: float, seed: int) -> None:
        self.mask_id = getattr(tok, "mask_token_id", None)
        self.special = _special_ids(tok)
        self.rate, self.seed = rate, seed

    def __call__(self, b: TokenBatch, index: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        return mask_positions(b.input_ids, b.attention_mask, self.special, self.rate, gen)  # [batch, pos] bool


def forward_loss(model: nn.Module, kind: str, b: TokenBatch, masked: torch.Tensor | None,
                  mask_id: int | None) -> tuple[torch.Tensor, int, TokenBatch]:
    """Summed loss of one batch, the number of its terms, and the batch the model actually saw."""
    ids, att = b.input_ids, b.attention_mask
    if kind == "next-token":
        logits = model(input_ids=ids, attention_mask=att, use_cache=False).logits  # [batch, pos, vocab]
        keep = att[:, 1:].bool() & att[:, :-1].bool()
        ce = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                             reduction="none")
        return ce[keep.reshape(-1)].sum(), int(keep.sum()), b
    assert masked is not None and mask_id is not None
    ids_m = torch.where(masked, torch.full_like(ids, mask_id), ids)
    if kind == "mlm":
        logits = model(input_ids=ids_m, attention_mask=att).logits  # [batch, pos, vocab]
        ce = F.cross_entropy(logits[masked].float(), ids[masked], reduction="sum")
        return ce, int(masked.sum()), TokenBatch(ids_m, att, list(b.categories))
    both = TokenBatch(torch.cat([ids, ids_m]), torch.cat([att, att]), list(b.categories) * 2)
    out = model(input_ids=both.input_ids, attention_mask=both.attention_mask)
    h = out.last_hidden_state.float()  # [2 * batch, pos, d]
    n = ids.shape[0]
    return masked_view_loss(h[:n], h[n:], att).sum(), n, both

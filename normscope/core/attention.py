"""Attention-sink quantities that more than one analysis needs (Gu et al. 2024, "When Attention Sink Emerges
in Language Models: An Empirical View", arXiv:2410.10781, code ``sail-sg/Attention-Sink``)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch

SINK_EPS = 0.3  # Gu et al.'s threshold on alpha_k
MIN_QUERIES = 16  # a later key counts as a sink only if this many queries can see it


def sink_scores(pattern: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """alpha_k: the mean attention key position k receives from the queries that can see it (Gu et al.).

    pattern: ``[batch, head, query, key]`` attention probabilities. Returns ``[batch, head, key]``.
    Causal models average over queries i >= k; encoders over all queries.
    """
    return sink_scores_from_col_sum(pattern.float().sum(dim=2), pattern.shape[-2], causal)


def sink_scores_from_col_sum(col: torch.Tensor, t_q: int, causal: bool = True) -> torch.Tensor:
    """alpha_k from the pattern's column sums ``col`` ``[batch, head, key]`` (the attention each key receives, summed
    over the ``t_q`` queries): divided by the number of queries that see key k (``t_q - k`` for causal models, all
    ``t_q`` for encoders). Returns ``[batch, head, key]``."""
    t_k = col.shape[-1]
    if causal:
        n_q = (t_q - torch.arange(t_k, device=col.device) - (t_k - t_q)).clamp(min=1).float()  # [key]
    else:
        n_q = torch.full((t_k,), float(t_q), device=col.device)
    return col.float() / n_q


def sink_hits(alpha: torch.Tensor, causal: bool, eps: float = SINK_EPS,
              min_queries: int = MIN_QUERIES) -> torch.Tensor:
    """``[batch, head, key]`` bool: alpha_k above ``eps`` at keys that at least ``min_queries`` queries see."""
    t = alpha.shape[-1]
    n_q = t - torch.arange(t, device=alpha.device) if causal else torch.full((t,), t, device=alpha.device)
    return (alpha > eps) & (n_q >= min_queries)


class SinkTokens:
    """Counts the token ids that act as sinks, by position class ("first" for position 0, "later" otherwise)."""

    def __init__(self, causal: bool, eps: float = SINK_EPS, min_queries: int = MIN_QUERIES) -> None:
        self.causal, self.eps, self.min_queries = causal, eps, min_queries
        self.counts: Counter[tuple[str, int]] = Counter()  # (pos class, token id) -> (sequence, head) hits

    def update(self, pattern: torch.Tensor, ctx: Any) -> None:
        """pattern: ``[batch, head, query, key]``; ``ctx.input_ids``: ``[batch, pos]``."""
        self.add(sink_scores(pattern, self.causal), ctx.input_ids)

    def add(self, alpha: torch.Tensor, input_ids: torch.Tensor) -> None:
        """Fold in the hits of ``alpha`` ``[batch, head, key]`` for the tokens ``input_ids`` ``[batch, pos]``."""
        ids = input_ids.cpu()
        for bi, _hi, k in sink_hits(alpha, self.causal, self.eps, self.min_queries).nonzero().tolist():
            self.counts[("first" if k == 0 else "later", int(ids[bi, k]))] += 1

    def later_ids(self) -> set[int]:
        """Token ids that were a sink at some position > 0."""
        return {tid for (pc, tid) in self.counts if pc == "later"}

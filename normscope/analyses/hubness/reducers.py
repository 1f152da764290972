"""Hook reducers of the hubness analysis.

Unlike every other normscope reducer, :class:`MatrixCollector` keeps what it sees across batches: the k-NN
search needs all token vectors of a hook point at once (Radovanovic et al. 2010). Its memory is one
``[n_tokens, d_model]`` float32 matrix per point, on the device of the hook (where the search then runs), which
``HubnessOptions.memory_mb`` caps per pass. :class:`SinkColumns` reads the attention pattern's column sums
(``hook_col_sum``), so the pass keeps SDPA and never builds a T x T pattern.
"""

from __future__ import annotations

import torch

from normscope.core.attention import SinkTokens, sink_scores_from_col_sum
from normscope.core.capture import BatchContext


class MatrixCollector:
    """Copies every (unmasked) token's vector at one hook point into a preallocated ``[n_tokens, d]`` matrix.

    The only reducer in normscope whose memory grows with the number of tokens: hubness needs all points at
    once. Tokens are stored in batch order (sequence-major, then position).
    """

    def __init__(self, n_tokens: int) -> None:
        self.n_tokens = n_tokens
        self.matrix: torch.Tensor | None = None  # [n_tokens, d] float32
        self.n = 0

    def update(self, x: torch.Tensor, ctx: BatchContext) -> None:
        rows = x[token_mask(ctx, x)].float()  # [kept tokens in batch, d], on the hook's device
        if self.matrix is None:
            self.matrix = torch.empty(self.n_tokens, rows.shape[-1], dtype=torch.float32, device=rows.device)
        self.matrix[self.n:self.n + rows.shape[0]] = rows
        self.n += rows.shape[0]

    def take(self) -> torch.Tensor:
        """The filled matrix (``[n, d]``); the collector lets go of it."""
        assert self.matrix is not None
        m, self.matrix = self.matrix[: self.n], None
        return m


class SinkColumns:
    """Feeds :class:`~normscope.core.attention.SinkTokens` from ``blocks.{l}.attn.hook_col_sum`` (the pattern's column
    sums ``[batch, head, key]``, from the chunked or the eager path): the sink tokens of Gu et al. 2024
    (arXiv:2410.10781) without whole T x T patterns."""

    def __init__(self, tokens: SinkTokens) -> None:
        self.tokens = tokens

    def update(self, col: torch.Tensor, ctx: BatchContext) -> None:
        self.tokens.add(sink_scores_from_col_sum(col, ctx.input_ids.shape[1], self.tokens.causal), ctx.input_ids)


def token_mask(ctx: BatchContext, x: torch.Tensor | None = None) -> torch.Tensor:
    """``[batch, pos]`` bool: the tokens hubness looks at (every unmasked token of the sample), on ``x``'s device
    when given (blocks may sit on different devices under ``--device-map``)."""
    return (ctx.attention_mask if x is None else ctx.on(x)[1]).bool()


"""Settings of ``normscope sinks`` (no torch here: the CLI builds its options from this class)."""

from __future__ import annotations

from dataclasses import dataclass

from normscope.core.options import opt

REFERENCES = [
    "Gu et al. 2024, When Attention Sink Emerges in Language Models: An Empirical View (arXiv:2410.10781)",
    "Sun, Chen, Kolter, Liu 2024, Massive Activations in Large Language Models (arXiv:2402.17762)",
    "Xiao et al. 2023, Efficient Streaming Language Models with Attention Sinks (arXiv:2309.17453)",
    "Qiu, Huang, Wen et al. 2026, A Unified View of Attention and Residual Sinks: Outlier-Driven "
    "Rescaling is Essential for Transformer Training (arXiv:2601.22966): residual sinks, outlier-driven rescaling",
]


@dataclass
class SinksOptions:
    """Settings of ``normscope sinks``."""

    eps: float = opt(0.3, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
    """Sink threshold: a (sequence, layer, head) is a sink when alpha_1 exceeds it (Gu et al. use 0.3)."""
    massive_threshold: float = opt(100.0, lo=0.0)
    """Absolute magnitude a massive activation must exceed (Sun et al.: 100)."""
    massive_ratio: float = opt(1000.0, lo=1.0)
    """...and its ratio to the median |h| of its hidden state (Sun et al.: about 1000)."""
    min_queries: int = opt(16, lo=1)
    """A later key position k counts as a sink only if at least this many queries can see it."""
    top_k: int = opt(3, lo=1)
    """Outlier dims per token used for the divisor share."""
    attention: str = opt("auto", choices=("auto", "chunked", "eager"))
    """How alpha_k is computed: chunked (SDPA forward, each key's attention summed in query chunks from the queries
    and keys, memory bounded in T), eager (whole T x T patterns), or auto (chunked where the model allows)."""
    ablate: bool = False
    """Also run the causal checks: zero / mean the massive dims and cut attention to position 0 (three more
    forward passes over the same text)."""

"""Settings of ``normscope hubness`` (no torch here: the CLI builds its options from this class)."""

from __future__ import annotations

from dataclasses import dataclass

from normscope.core import layers as _layers
from normscope.core.options import opt

METRICS = ("euclidean", "cosine")


REFERENCES = [
    "Radovanovic, Nanopoulos, Ivanovic 2010, Hubs in Space: Popular Nearest Neighbors in High-Dimensional Data "
    "(JMLR 11:2487-2531)",
    "Feldbauer, Leodolter, Plant, Flexer 2018, Fast approximate hubness reduction for large high-dimensional data "
    "(IEEE ICBK); scikit-hubness conventions",
    "Nielsen, Macocco, Baroni 2025, Prediction hubs are context-informed frequent tokens in LLMs (arXiv:2502.10201)",
    "Gu et al. 2024, When Attention Sink Emerges in Language Models: An Empirical View (arXiv:2410.10781)",
]


@dataclass
class HubnessOptions:
    """Settings of ``normscope hubness``."""

    k: int = opt(10, lo=1)
    """Neighbourhood size k of the k-NN lists (scikit-hubness default: 10)."""
    metric: str = opt("both", choices=(*METRICS, "both"))
    """Distance between token representations: euclidean, cosine or both."""
    layers: str | None = None
    """Blocks to analyse (all, or e.g. 0,12,-1). Default: 6 blocks spread from the first to the last (each block
    adds 5 points, two k-NN searches each)."""
    sites: bool = True
    """Also analyse the input and output of every norm site of those blocks (and the final norm)."""
    unembed: bool = True
    """Also measure the hubness of contexts against the unembedding (causal LMs only)."""
    top_hubs: int = opt(10, lo=1)
    """Hubs named per point and metric (largest N_k)."""
    memory_mb: float = opt(1024.0, lo=0.0, lo_open=True)
    """Most memory the captured representation matrices of one forward pass may take (MB); more points mean
    more passes."""
    block_size: int = opt(1024, lo=1)
    """Query rows per block of the exact k-NN search (never an N x N matrix)."""
    hist_points: int = opt(3, lo=0)
    """Layers whose N_k histograms are drawn."""
    hub_size: float = opt(2.0, lo=0.0, lo_open=True)
    """A hub has N_k >= hub_size * k (scikit-hubness: 2)."""

    @property
    def metrics(self) -> tuple[str, ...]:
        """The distances to measure, in a fixed order."""
        return METRICS if self.metric == "both" else (self.metric,)

    def check(self) -> None:
        _layers.check_syntax(self.layers, "--layers")

"""Settings of ``normscope grads`` (no torch here: the CLI builds its options from this class)."""

from __future__ import annotations

from dataclasses import dataclass

from normscope.core.options import opt

LOSSES = ("auto", "next-token", "mlm", "masked-view")


REFERENCES = [
    "Li, Yin, Liu et al. 2024, Mix-LN: Unleashing the Power of Deeper Layers by Combining Pre-LN and Post-LN "
    "(arXiv:2412.13795)",
    "Xiong et al. 2020, On Layer Normalization in the Transformer Architecture (arXiv:2002.04745)",
    "Sun, Yin, Li, Liu et al. 2025, The Curse of Depth in Large Language Models (arXiv:2502.05795)",
    "Lyle, Zheng, Khetarpal, Martens, van Hasselt, Pascanu, Dabney 2024, Normalization and effective learning "
    "rates in reinforcement learning (NeurIPS 2024, arXiv:2407.01800): lr/||w||^2 (SGD) and lr/||w|| (Adam) for "
    "weights whose output is normalized",
    "Gao, Yao, Chen 2021, SimCSE: Simple Contrastive Learning of Sentence Embeddings (arXiv:2104.08821): the "
    "two-view idea behind the masked-view loss used for encoders without a head",
]


@dataclass
class GradsOptions:
    """Settings of ``normscope grads``."""

    loss: str = opt("auto", choices=LOSSES)
    """auto (next-token for causal LMs; mlm for encoders with an MLM head; masked-view otherwise: 1 - cos of the
    mean-pooled output of a sequence and of a copy with tokens masked), next-token, mlm or masked-view."""
    mask_rate: float = opt(0.15, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
    """Share of (non-special) tokens replaced by [MASK] for the mlm and masked-view losses (seeded by --seed)."""
    lr: float = opt(2e-4, lo=0.0, lo_open=True)
    """Learning rate of the effective step sizes lr/||w||^2 (SGD) and lr/||w|| (Adam) of every weight whose output
    a norm normalizes (Lyle et al. 2024), and of the --steps fine-tune; 2e-4 is remove-ln's default."""
    steps: int = opt(0, lo=0)
    """AdamW steps (torch defaults, weight decay 0.01; one text batch a step, cycling) of a short fine-tune after
    the gradients are measured, logging ||dw||/||w|| per step of those weights; every parameter is put back in
    memory afterwards, no checkpoint is written (0: off)."""

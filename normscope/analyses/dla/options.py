"""Settings of ``normscope dla`` (no torch here: the CLI builds its options from this class)."""

from __future__ import annotations

from dataclasses import dataclass

from normscope.core.options import opt

BACKENDS = ("auto", "bridge", "direct")


REFERENCES = [
    "Heimersheim 2024, You can remove GPT2's LayerNorm by fine-tuning (arXiv:2409.13710)",
    "Baroni, Khara, Schaeffer, Subkhankulov, Heimersheim 2025, Transformers Don't Need LayerNorm at Inference "
    "Time (arXiv:2507.02559); code submarat/removing-layer-norm",
    "Elhage et al. 2021, A Mathematical Framework for Transformer Circuits (direct logit attribution)",
    "Stolfo, Wu, Gurnee, Belinkov, Song, Sachan, Nanda 2024, Confidence Regulation Neurons in Language Models "
    "(arXiv:2406.16254)",
    "TransformerLens 4.x: TransformerBridge and ActivationCache (decompose_resid, stack_head_results, "
    "apply_ln_to_stack, logit_attrs)",
]


@dataclass
class DlaOptions:
    """Settings of ``normscope dla``."""

    neurons: int = opt(5, lo=0)
    """Entropy-neuron candidates of the last MLP to mean-ablate (0: skip)."""
    backend: str = opt("auto", choices=BACKENDS)
    """bridge: TransformerLens' TransformerBridge computes DLA; direct: normscope's own hooks; auto: the bridge
    where it supports the model, else direct (with a note in the report)."""
    scatter_points: int = opt(4000, lo=1)
    """(component, token) pairs kept for the DLA-against-DE scatter plot."""
    top_components: int = opt(15, lo=1)
    """Components listed as the ones where the frozen scale misleads most."""
    micro_batch_tokens: int = opt(512, lo=1)
    """Tokens per forward pass of the bridge (its per-head stack holds heads x tokens x d_model floats)."""

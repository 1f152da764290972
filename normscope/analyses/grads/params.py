"""Parameter groups of ``normscope grads``: every parameter of a model sorted once into (block, group), the
grouping of Mix-LN's per-layer gradient norms (Li et al. 2024, arXiv:2412.13795), and the switch that turns
gradients on for a measurement and leaves the shared model as it was.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["GROUPS", "Fp32GradSums", "ParamGroup", "grads_enabled", "param_groups"]

GROUPS = ("attention", "mlp", "norm", "embeddings", "unembedding", "other")


@dataclass
class ParamGroup:
    """A named set of parameters: one group of one block (``block`` set) or of the model outside the blocks."""

    block: int | None
    group: str
    params: list[nn.Parameter] = field(default_factory=list)
    names: list[str] = field(default_factory=list)

    @property
    def n_params(self) -> int:
        """Number of scalar parameters in the group."""
        return sum(p.numel() for p in self.params)


def param_groups(model: nn.Module, layout: Any, sites: list[Any]) -> list[ParamGroup]:
    """Sort every parameter (tied ones once) into (block, group).

    Inside a block: parameters of a norm site are ``norm``; those under the attention module, or whose path
    names an attention (``attn``, ``attention``; BERT's output projection lives beside its self-attention)
    are ``attention``; the rest of the block is ``mlp``. Outside the blocks: norms (final, embedding norm) are
    ``norm``; ``nn.Embedding`` weights (tokens, positions, token types) are ``embeddings``; an untied output
    projection is ``unembedding``; anything else (a pooler) is ``other``.
    """
    norm_params = {id(p) for s in sites for p in s.module.parameters()}
    block_of: dict[int, Any] = {}
    for b in layout.blocks:
        for p in b.module.parameters():
            block_of[id(p)] = b
    attn_params = {id(p) for b in layout.blocks if b.attn is not None for p in b.attn.parameters()}
    embed_params = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    embed_params |= {id(p) for p in layout.embed.parameters()}
    unembed_params = {id(p) for p in layout.unembed.parameters()} if layout.unembed is not None else set()
    groups: dict[tuple[int | None, str], ParamGroup] = {}
    for name, p in model.named_parameters():
        b = block_of.get(id(p))
        rel = name[len(b.path) + 1:] if b is not None else name
        if id(p) in norm_params:
            g = "norm"
        elif b is not None:
            g = "attention" if id(p) in attn_params or "attn" in rel or "attention" in rel else "mlp"
        elif id(p) in embed_params:
            g = "embeddings"
        elif id(p) in unembed_params:
            g = "unembedding"
        else:
            g = "other"
        key = (b.index if b is not None else None, g)
        pg = groups.setdefault(key, ParamGroup(*key))
        pg.params.append(p)
        pg.names.append(name)
    return list(groups.values())


@contextmanager
def grads_enabled(model: nn.Module) -> Iterator[list[nn.Parameter]]:
    """requires_grad on every parameter and no stale .grad; both restored afterwards (shared models stay clean)."""
    params = list(model.parameters())
    saved = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
        p.grad = None
    try:
        with torch.enable_grad():
            yield params
    finally:
        for p, r in zip(params, saved, strict=True):
            p.grad = None
            p.requires_grad_(r)


class Fp32GradSums:
    """Gradients of half-precision parameters summed in float32 over many backward passes.

    A bfloat16 ``.grad`` that accumulates one batch's share after another rounds every sum to 8 bits of
    mantissa: once the sum is 2^8 times a batch's share, further shares are lost whole (with 512 batches the
    total stops near half its value). Here a post-accumulate hook moves each half-precision parameter's
    gradient into a float32 sum after every backward and frees ``.grad``; float32 parameters keep their own
    ``.grad``. Use as a context manager around the backward passes; :meth:`grad` reads the total.
    """

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.sums: dict[int, torch.Tensor] = {}
        half = [p for p in params if p.dtype in (torch.float16, torch.bfloat16)]
        self._handles = [p.register_post_accumulate_grad_hook(self._fold) for p in half]

    def _fold(self, p: torch.Tensor) -> None:
        assert p.grad is not None
        s = self.sums.get(id(p))
        if s is None:
            self.sums[id(p)] = p.grad.float()  # a new float32 tensor, same shape as p
        else:
            s.add_(p.grad)  # float32 += half: the sum happens in float32
        p.grad = None

    def grad(self, p: nn.Parameter) -> torch.Tensor | None:
        """The summed gradient of ``p`` (float32 for half-precision parameters), or None if it got none."""
        return self.sums.get(id(p), p.grad)

    def __enter__(self) -> Fp32GradSums:
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

"""Where the pieces of the attribution sit in a model: the unembedding, the final norm's gain, each block's
attention output projection W_O (per-head outputs are z_h @ W_O[h], as TransformerLens' ``stack_head_results``)
and the last MLP's output projection (the entropy neurons' W_out); and forward pre-hooks that read the inputs
of those projections. Every model dla cannot serve is refused here in one line, before any forward pass.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from normscope.core.errors import NormscopeError
from normscope.core.placement import resident
from normscope.core.sites import find_layout, find_norm_sites

__all__ = ["Plan", "find_out_projection", "input_hooks", "plan_model", "projection_matrix"]


def _linear_io(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) features of an nn.Linear or a transformers Conv1D, else None."""
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        return None
    if type(module).__name__ == "Conv1D":
        return int(w.shape[0]), int(w.shape[1])
    if isinstance(module, nn.Linear):
        return int(module.in_features), int(module.out_features)
    return None


def projection_matrix(module: nn.Module) -> torch.Tensor:
    """``[in, out]`` matrix W with ``module(x) = x @ W + b`` (Linear stores W transposed, Conv1D does not)."""
    w = resident(module)  # read from accelerate's offload when the weight is on the meta device
    assert w is not None
    return w if type(module).__name__ == "Conv1D" else w.T


_OUT_NAMES = ("o_proj", "c_proj", "out_proj", "dense", "wo", "o", "dense_4h_to_h", "down_proj", "fc2", "fc_out",
              "w2", "c_proj")


def find_out_projection(parent: nn.Module, d_model: int) -> nn.Module | None:
    """The linear map that writes a block's attention (or MLP) result into the residual stream.

    Known names first (``o_proj``, ``c_proj``, ``out_proj``, ``dense``, ``down_proj``, ``fc2`` ...), else the last
    Linear/Conv1D child whose output size is ``d_model``.
    """
    children = dict(parent.named_children())
    for name in _OUT_NAMES:
        m = children.get(name)
        if m is not None and (io := _linear_io(m)) is not None and io[1] == d_model:
            return m
    last = None
    for _, m in parent.named_modules():
        io = _linear_io(m)
        if io is not None and io[1] == d_model:
            last = m
    return last


def _gain(site: Any) -> torch.Tensor | None:
    """The norm's effective gain ``[d]`` (weight + gain offset, Gemma's 1 + w), or None when it has none."""
    w = resident(site.module) if site.has_gain else None
    if w is None:
        return None
    return w.float() + site.gain_offset


@dataclass
class Plan:
    """Where each piece of the attribution is in the model."""

    layout: Any
    sites: list[Any]
    final: Any  # NormSite of the final norm
    w_u: torch.Tensor  # [vocab, d]
    gain: torch.Tensor  # [d]
    o_proj: list[nn.Module]  # per block
    w_o: list[torch.Tensor]  # per block, [n_heads * d_head, d]
    mlp_out: nn.Module | None  # out projection of the last MLP (entropy neurons)
    n_heads: int


def plan_model(lm: Any, layout: Any = None, sites: list[Any] | None = None) -> Plan:
    """Check that DLA is defined for the model and find its parts; every refusal is one clear line.

    ``layout`` and ``sites`` are probed here when not given (a RunContext has them already)."""
    info = lm.info
    layout = layout if layout is not None else find_layout(lm.model)
    sites = sites if sites is not None else find_norm_sites(lm.model, layout)
    if not info.is_causal or not layout.is_causal:
        raise NormscopeError(f"{info.name} is an encoder: dla attributes next-token logits, so it needs a causal LM "
                             "(for example smollm2-135m or gpt2).")
    if layout.unembed is None or not isinstance(getattr(layout.unembed, "weight", None), torch.Tensor):
        raise NormscopeError(f"{info.name} has no unembedding (LM head), so there are no logits to attribute; load "
                             "a causal LM with its head.")
    if layout.final_norm is None:
        raise NormscopeError(f"{info.name} has no final norm before the unembedding, so DLA and the direct effect "
                             "coincide by construction; there is nothing for dla to measure.")
    post = [s.name for s in sites if s.role in ("post_attn", "post_mlp")]
    if post:
        raise NormscopeError(f"{info.name} normalizes the attention/MLP outputs before adding them to the residual "
                             f"stream ({post[0]}, ...), so per-component DLA is not defined; dla supports pre-norm "
                             "models.")
    n_heads = layout.n_heads
    o_proj, w_o = [], []
    for b in layout.blocks:
        m = find_out_projection(b.attn, layout.d_model) if b.attn is not None else None
        io = _linear_io(m) if m is not None else None
        if m is None or io is None or io[0] % n_heads:
            raise NormscopeError(f"Could not find the attention output projection of block {b.index} of {info.name}; "
                                 "dla needs a standard attention module (o_proj, c_proj, out_proj or dense).")
        o_proj.append(m)
        w_o.append(projection_matrix(m))
    last = layout.blocks[-1]
    mlp_out = find_out_projection(last.mlp, layout.d_model) if last.mlp is not None else None
    final = layout.final_norm
    gain = _gain(final)
    w_u = resident(layout.unembed)
    assert w_u is not None
    return Plan(layout, sites, final, w_u, gain if gain is not None else torch.ones(w_u.shape[1]), o_proj, w_o,
                 mlp_out, n_heads)


@contextmanager
def input_hooks(modules: list[nn.Module], store: dict[int, torch.Tensor]) -> Iterator[None]:
    """Forward pre-hooks that store each module's input (``store[i]``) for the current batch."""
    handles = []
    for i, m in enumerate(modules):
        def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], i: int = i) -> None:
            store[i] = (args[0] if args else next(iter(kwargs.values()))).detach()
        handles.append(m.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()

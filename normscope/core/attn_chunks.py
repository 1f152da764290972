"""Attention statistics without the T x T pattern: column sums of the attention pattern, computed in query chunks
from the queries and keys that an SDPA forward pass uses.

The sink score alpha_k of Gu et al. 2024 ("When Attention Sink Emerges in Language Models: An Empirical View",
arXiv:2410.10781, code ``sail-sg/Attention-Sink``) needs, per head, only the pattern's column sums
``sum_i A[i, k]``. Each row of ``A`` is ``softmax(q_i K^T * scale + mask_i)``; a chunk of rows needs only its queries,
all the keys they may see, and its own rows' normalizer (the log-sum-exp over the allowed keys), so the column sums
come out of a loop over query chunks whose size is chosen from a memory budget, not from ``T``. At T = 4096 a
32-head layer's eager pattern is 2 GiB in fp32; a chunk here is :data:`CHUNK_ELEMENTS` scores.

How the queries and keys are caught: transformers routes every attention module of a model that follows its
attention interface through one function looked up by name (``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``,
https://huggingface.co/docs/transformers/en/attention_interface). :func:`chunked_attention` registers one more name,
:data:`IMPL`, whose function hands ``(query, key, mask, scaling, is_causal)`` to a per-module callback and then runs
transformers' own ``sdpa_attention_forward``, so the model's output is exactly its SDPA output. The queries and keys
are the ones the module really attends with (after RoPE, Q/K norms, GPT-2's split, BERT's projections; keys not yet
repeated for grouped-query attention), and the mask is the one transformers builds for SDPA (with its padding and
sliding windows), interpreted as SDPA interprets it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

__all__ = ["CHUNK_ELEMENTS", "IMPL", "attention_implementation", "chunked_attention", "pattern_col_sum",
           "unsupported"]

IMPL = "normscope_sdpa"  # the attention implementation name registered with transformers
CHUNK_ELEMENTS = 1 << 22  # scores per query chunk (16 MiB in fp32), whatever T is

# callback(query, key, mask, scaling, is_causal, position_bias): query [batch, head, q, d_head],
# key [batch, kv_head, k, d_head], mask and position_bias [batch|1, head|1, q, k] or None
QKCallback = Callable[..., None]
_CALLBACKS: dict[int, QKCallback] = {}  # id(attention module) -> callback, while chunked_attention is active


def pattern_col_sum(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None = None,
                    scaling: float | None = None, is_causal: bool = False,
                    position_bias: torch.Tensor | None = None,
                    chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """Column sums over queries of the attention pattern ``softmax(q k^T * scaling + mask)``, in query chunks.

    query: ``[batch, head, q, d_head]``; key: ``[batch, kv_head, k, d_head]`` with ``head`` a multiple of
    ``kv_head`` (grouped-query attention: query head ``h`` reads key head ``h // (head // kv_head)``, as
    transformers' ``repeat_kv``). ``mask``: ``[batch|1, head|1, q, k]``, bool (True = may attend, as SDPA) or
    additive float; None with ``is_causal`` is the causal mask, None without it is full attention (SDPA's
    convention). ``position_bias``: an additive ``[batch|1, head|1, q, k]`` bias (T5-style), or None.
    Returns ``[batch, head, k]`` in fp32, equal to ``eager_pattern.sum(dim=2)``.

    Memory: one chunk of ``batch * head * rows * keys <= chunk_elements`` scores (at least one row) and its
    softmax, whatever the sequence length. A masked-out score is set to fp32's most negative number, as the eager
    mask does, so a row with no key to see comes out uniform there as in eager attention.
    """
    b, h, t_q, d = query.shape
    h_kv, t_k = key.shape[1], key.shape[2]
    g = h // h_kv  # query heads per key head
    scale = d ** -0.5 if scaling is None else scaling
    q = query.float().reshape(b, h_kv, g, t_q, d)  # [batch, kv_head, group, q, d_head]
    k = key.float().unsqueeze(2).transpose(-1, -2)  # [batch, kv_head, 1, d_head, k]
    neg = torch.finfo(torch.float32).min
    out = torch.zeros(b, h, t_k, dtype=torch.float32, device=query.device)  # [batch, head, key]
    rows = max(1, min(t_q, chunk_elements // max(b * h * t_k, 1)))
    causal = is_causal and mask is None  # SDPA's convention: an explicit mask replaces the causal flag
    for i0 in range(0, t_q, rows):
        i1 = min(i0 + rows, t_q)
        n_k = min(t_k, i1 + (t_k - t_q)) if causal else t_k  # a causal chunk sees no key past its last row
        s = torch.matmul(q[:, :, :, i0:i1], k[..., :n_k]).mul_(scale).reshape(b, h, i1 - i0, n_k)  # [b, h, rows, k]
        if causal:
            qi = torch.arange(i0, i1, device=s.device)[:, None] + (t_k - t_q)  # [rows, 1] query positions
            s.masked_fill_(torch.arange(n_k, device=s.device) > qi, neg)  # [rows, k] future keys
        if mask is not None:
            m = mask[:, :, i0:i1]  # [batch|1, head|1, rows, k]
            s = s.masked_fill(~m, neg) if m.dtype == torch.bool else s.add_(m.float()).clamp_(min=neg)
        if position_bias is not None:
            s = s.add_(position_bias[:, :, i0:i1, :n_k].float())
        out[..., :n_k] += torch.softmax(s, dim=-1).sum(dim=2)  # [batch, head, k]
    return out


def unsupported(model: nn.Module) -> str | None:
    """Why ``model`` cannot run the chunked path (one sentence), or None when it can: it must route its attention
    through transformers' attention interface and support SDPA."""
    can_set = getattr(model, "_can_set_attn_implementation", None)
    if can_set is None or not callable(can_set):
        return f"{type(model).__name__} is not a transformers model with a switchable attention implementation"
    if not can_set():
        return f"{type(model).__name__}'s attention does not go through transformers' attention interface"
    if not getattr(model, "_supports_sdpa", False):
        return f"{type(model).__name__} does not support SDPA attention"
    return None


def _attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The function registered as :data:`IMPL`: the callback sees the queries and keys, SDPA computes the output."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cb = _CALLBACKS.get(id(module))
    if cb is not None:
        causal_kw = kwargs.get("is_causal")
        is_causal = bool(causal_kw if causal_kw is not None else getattr(module, "is_causal", True))
        scaling = kwargs.get("scaling", args[1] if len(args) > 1 else None)
        is_causal = query.shape[2] > 1 and attention_mask is None and is_causal  # as sdpa_attention_forward decides
        cb(query, key, attention_mask, scaling, is_causal, kwargs.get("position_bias"))
    return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)


def _register_impl() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if IMPL not in AttentionInterface._global_mapping:
        AttentionInterface.register(IMPL, _attention)
        AttentionMaskInterface.register(IMPL, sdpa_mask)  # the masks SDPA gets: bool, None when purely causal


@contextmanager
def attention_implementation(model: nn.Module, impl: str) -> Iterator[None]:
    """Run ``model`` (a transformers ``PreTrainedModel``) with attention implementation ``impl`` inside the block,
    restoring its own afterwards."""
    m: Any = model
    before = m.config._attn_implementation
    if impl == before:
        yield
        return
    m.set_attn_implementation(impl)
    try:
        yield
    finally:
        m.set_attn_implementation(before)


@contextmanager
def chunked_attention(model: nn.Module, callbacks: dict[nn.Module, QKCallback]) -> Iterator[None]:
    """Inside the block ``model`` runs SDPA attention, and each module of ``callbacks`` hands its queries and keys to
    its callback first. Modules are matched by identity; the innermost module that calls the attention function
    (e.g. BERT's ``BertSelfAttention`` under ``BertAttention``) is found among each given module's descendants."""
    _register_impl()
    ids: dict[int, QKCallback] = {}
    for mod, cb in callbacks.items():
        for sub in mod.modules():
            ids.setdefault(id(sub), cb)
    _CALLBACKS.update(ids)
    try:
        with attention_implementation(model, IMPL):
            yield
    finally:
        for i in ids:
            _CALLBACKS.pop(i, None)

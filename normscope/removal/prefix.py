"""The exact BOS treatment's export: a fixed prefix replaced by its per-layer keys and values.

With a fixed BOS (or a fixed prefix of k tokens) at the start of every window and causal attention, the prefix
attends only to itself (RoPE is the identity at position 0, and a relative rotation for the rest), so its
residual trajectory, and with it every layer's keys and values at those positions, is the same for every input.
A run in exact-BOS mode keeps those positions on their own (live) divisors, which no plain ``LlamaConfig``
can express; the export therefore is

* a plain checkpoint in which every norm is frozen (the ordinary-token divisors folded into the gains), and
* ``bos_prefix.safetensors``: the prefix's keys and values at every layer (``layers.{i}.key`` /
  ``layers.{i}.value``, ``[1, n_kv_heads, k, d_head]``, keys after RoPE), its token ids and its logits,
  computed once from the trained model.

Fed the prefix as a key/value cache, the plain model reproduces the trained model on every position after the
prefix (checked to ~1e-5 on the logits at export). Plain transformers::

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, DynamicCache
    m = AutoModelForCausalLM.from_pretrained(path)
    p = load_file(f"{path}/bos_prefix.safetensors")
    cache = DynamicCache()
    for i in range(m.config.num_hidden_layers):
        cache.update(p[f"layers.{i}.key"].expand(B, -1, -1, -1), p[f"layers.{i}.value"].expand(B, -1, -1, -1), i)
    logits = m(input_ids=ids_without_prefix, cache=cache).logits    # [B, T, vocab]; older: past_key_values=

:class:`PrefixModel` does the same behind a model-like ``forward(input_ids)`` that takes the prefix in
``input_ids`` (as the trained model does), so scoring code needs no change.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

PREFIX_FILE = "bos_prefix.safetensors"


@dataclass
class Prefix:
    """A fixed prefix's keys and values per layer, plus its token ids and logits."""

    ids: torch.Tensor  # [k] long
    keys: list[torch.Tensor]  # per layer [1, n_kv_heads, k, d_head] (after RoPE)
    values: list[torch.Tensor]  # per layer [1, n_kv_heads, k, d_head]
    logits: torch.Tensor  # [k, vocab]

    @property
    def length(self) -> int:
        return int(self.ids.numel())

    def cache(self, batch: int) -> Any:
        """A fresh :class:`transformers.DynamicCache` holding the prefix for ``batch`` rows (forward mutates it)."""
        from transformers import DynamicCache

        c = DynamicCache()
        for i, (k, v) in enumerate(zip(self.keys, self.values, strict=True)):
            c.update(k.expand(batch, -1, -1, -1).contiguous(), v.expand(batch, -1, -1, -1).contiguous(), i)
        return c

    def save(self, folder: Path) -> Path:
        from safetensors.torch import save_file

        t = {"ids": self.ids.cpu(), "logits": self.logits.float().cpu().contiguous()}
        for i, (k, v) in enumerate(zip(self.keys, self.values, strict=True)):
            t[f"layers.{i}.key"] = k.float().cpu().contiguous()
            t[f"layers.{i}.value"] = v.float().cpu().contiguous()
        path = Path(folder) / PREFIX_FILE
        save_file(t, str(path))
        return path

    @classmethod
    def load(cls, folder: Path, device: torch.device | str = "cpu") -> Prefix:
        from safetensors.torch import load_file

        t = load_file(str(Path(folder) / PREFIX_FILE), device=str(device))
        n = sum(1 for k in t if k.endswith(".key"))
        return cls(t["ids"], [t[f"layers.{i}.key"] for i in range(n)], [t[f"layers.{i}.value"] for i in range(n)],
                   t["logits"])


def compute_prefix(model: nn.Module, ids: list[int]) -> Prefix:
    """Run ``model`` (the trained one, wrappers installed) on the prefix alone and keep its cache and logits."""
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    with torch.no_grad():
        x = torch.tensor([ids], dtype=torch.long, device=device)  # [1, k]
        out = model(input_ids=x, use_cache=True)
    model.train(was)
    cache = getattr(out, "cache", None) or out.past_key_values
    keys = [layer.keys.detach().clone() for layer in cache.layers]
    values = [layer.values.detach().clone() for layer in cache.layers]
    return Prefix(torch.tensor(ids, dtype=torch.long), keys, values, out.logits[0].detach().float().clone())


def cache_kwarg(model: nn.Module) -> str:
    """``cache`` (transformers >= 5.2x) or ``past_key_values`` (earlier): the name forward takes a cache under."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@dataclass
class _Out:
    logits: torch.Tensor


class PrefixModel(nn.Module):
    """A plain model plus a :class:`Prefix`: ``forward(input_ids)`` with the prefix at the start of every row
    gives the logits of the prefix-trained model (prefix positions get the stored prefix logits)."""

    def __init__(self, model: nn.Module, prefix: Prefix) -> None:
        super().__init__()
        self.model = model
        self.prefix = prefix

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                use_cache: bool = False, **kw: Any) -> _Out:
        k = self.prefix.length
        b = input_ids.shape[0]
        head = input_ids[:, :k].cpu()
        if input_ids.shape[1] <= k or not bool((head == self.prefix.ids[None, :]).all()):
            raise ValueError(f"every row must start with the fixed prefix {self.prefix.ids.tolist()}")
        rest = input_ids[:, k:]  # [batch, T - k]
        mask = None if attention_mask is None else attention_mask  # [batch, T]: prefix + rest, as HF expects
        out = self.model(input_ids=rest, attention_mask=mask, use_cache=True,
                         **{cache_kwarg(self.model): self.prefix.cache(b)})
        pl = self.prefix.logits.to(out.logits.device, out.logits.dtype)[None].expand(b, -1, -1)  # [batch, k, vocab]
        return _Out(torch.cat([pl, out.logits], dim=1))  # [batch, T, vocab]

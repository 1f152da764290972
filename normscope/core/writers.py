"""The weight matrices whose output a norm normalizes: the weights an effective learning rate is defined for.

Lyle et al. 2024, "Normalization and effective learning rates in reinforcement learning" (NeurIPS 2024,
arXiv:2407.01800; the Normalize-and-Project paper): when a weight ``w`` only reaches the loss through a
normalization, the network is invariant to its scale, the gradient is orthogonal to ``w`` and shrinks as
1/||w||, so a step of learning rate ``lr`` turns ``w``'s direction by about lr/||w||^2 under SGD and lr/||w||
under Adam (whose step does not scale with the gradient). A growing weight norm is then a decaying learning
rate.

Which weights, decided here once (by :func:`find_writers`) for the grads analysis and for remove-ln's per-site
log:

* each norm site, in forward order, is fed by **the last weight matrix to run before it** (an ``nn.Linear``,
  GPT-2's ``Conv1D`` or an ``nn.Embedding``: any module with a 2-D ``weight``; the unembedding never);
* the **first site to run** (``blocks.0.ln1`` of a pre-norm model, ``embed.ln`` of BERT) is fed by every weight
  that ran before it: the token embedding, and position and token-type embeddings where the model has them;
* a qk-norm is fed by the projection whose output is its input (matched by value in the probe pass);
* a weight feeds only its first site: a site whose last weight already feeds an earlier norm (Gemma2's
  pre-norms, whose residual stream the post-norms' gains write) gets none, and so does a site that reads the
  same tensor as an earlier one (the second norm of a parallel-residual block).

So in a pre-norm transformer the weights are the **writers of the residual stream**: the embeddings (into
``blocks.0.ln1``), each attention output projection (into the block's ``ln2``) and each MLP down projection
(into the next ``ln1`` or ``ln_final``); in a post-LN encoder (BERT) they are the embeddings (into
``embed.ln``) and the dense layer right before each LayerNorm; with sandwich norms (Gemma2) the output
projections feed their post-norms; with qk-norms (Qwen3, OLMo2) the query and key projections feed them. For
parallel-residual blocks (GPT-NeoX, GPT-J) only the MLP's output projection is found, not the attention's.

**Scale invariance** (``invariance``) is what makes an effective learning rate meaningful:

* ``exact``: the norm reads this weight's output alone and nothing else reads it (qk-norms, sandwich post-norms,
  an embedding norm over a single embedding): the model does not change when ``w`` is scaled (up to the norm's
  eps and a bias of the writer);
* ``joint``: the norm reads a sum this weight's output is one term of (the residual stream of pre-norm models,
  which also flows on past the norm; ``x + Wh`` in post-LN, where ``x`` is the previous norm's output): the model
  is invariant only when every term of the sum is scaled together (all writers of the stream; in post-LN the
  previous norm's gain and bias too), so lr/||w||^2 and lr/||w|| are the step sizes of the stream's direction
  only approximately.

A site whose divisor is frozen (remove-ln, :mod:`normscope.removal.frozen`) divides by a constant, so its
writers lose that scale invariance: their effective learning rate is then their raw relative update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

from normscope.core.sites import ModelLayout, NormSite, _trace

__all__ = ["Writer", "find_writers"]

Invariance = Literal["exact", "joint"]
EXACT_ROLES = ("qk_norm", "post_attn", "post_mlp", "embedding")  # a norm whose output replaces its input


@dataclass
class Writer:
    """One weight matrix whose output a norm site normalizes."""

    name: str  # "embed", "embed.wpe", "blocks.3.self_attn.o_proj": the module path, blocks named as sites are
    kind: str  # "embedding", "input projection", "attention output", "MLP output", "query", "key"
    block: int | None  # None outside the blocks
    path: str  # the module path inside the model, e.g. "model.layers.3.self_attn.o_proj"
    site: str  # the norm site that normalizes its output (canonical name, e.g. "blocks.3.ln2")
    invariance: Invariance
    has_bias: bool
    weight: nn.Parameter = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (without the parameter)."""
        return {"name": self.name, "kind": self.kind, "block": self.block, "path": self.path, "site": self.site,
                "invariance": self.invariance, "has_bias": self.has_bias, "numel": self.weight.numel()}


def _weight_modules(model: nn.Module, layout: ModelLayout) -> dict[str, nn.Module]:
    """Every module with a 2-D weight Parameter except the unembedding: path -> module."""
    return {p: m for p, m in model.named_modules() if m is not layout.unembed
            and isinstance(getattr(m, "weight", None), nn.Parameter) and m.weight.dim() == 2}


def _same_values(a: Any, b: Any) -> bool:
    """Whether two probe fingerprints (shape, sum, ramp-weighted sum, abs sum) hold the same values in the same
    order, whatever their shapes (a qk-norm reads its projection's output viewed as [..., heads, head_dim])."""
    if a is None or b is None or math.prod(a[0]) != math.prod(b[0]):
        return False
    tol = 1e-9 * max(a[3], b[3]) + 1e-30
    return all(abs(x - y) <= tol for x, y in zip(a[1:], b[1:], strict=True))


def find_writers(model: nn.Module, layout: ModelLayout, sites: list[NormSite]) -> list[Writer]:
    """The weight matrices whose output a norm site normalizes, in forward order (the rules in the module
    docstring). Reads the fingerprints of the probe pass that built ``layout`` (one 1x4 forward pass of its own
    when the layout carries none)."""
    mods = _weight_modules(model, layout)
    ev = layout.events  # a weight that did not run in the probe pass writes nothing a norm reads
    if ev is None:
        ev = _trace(model, {**{m: p for p, m in mods.items()}, **{s.module: s.path for s in sites}})
    ran = sorted((ev[p].end, p) for p in mods if p in ev)  # [(order, path)] weights in forward order
    by_block = [(b.path + ".", b) for b in layout.blocks]
    placed = sorted((ev[s.path].end, s) for s in sites if s.path in ev)
    out: list[Writer] = []
    claimed: set[str] = set()
    seen_inputs: list[Any] = []
    for k, (end, site) in enumerate(placed):
        e = ev[site.path]
        before = [p for t, p in ran if t < end and p not in claimed]
        same_stream = any(_same_values(e.inp, s) for s in seen_inputs)
        seen_inputs.append(e.inp)
        if not before or same_stream:
            continue
        if k == 0:  # the first norm: everything that ran before it builds its input (token + position embeddings)
            chosen = [p for p in before if not any(p.startswith(bp) for bp, _ in by_block)]
        elif site.role == "qk_norm":
            chosen = [p for p in before if _same_values(ev[p].out, e.inp)][-1:] or before[-1:]
        else:  # the last weight before it; none when that one already feeds a norm (Gemma2's stream is
            # written by its post-norms' gains)
            last = [p for t, p in ran if t < end][-1:]
            chosen = [p for p in last if p not in claimed]
        for p in chosen:
            blk = next((b for bp, b in by_block if p.startswith(bp)), None)
            m = mods[p]
            weight: nn.Parameter = m.weight  # type: ignore[assignment]  # a 2-D Parameter (_weight_modules)
            exact = site.role in EXACT_ROLES and (len(chosen) == 1 and _same_values(ev[p].out, e.inp))
            out.append(Writer(name=_name(p, blk, layout, m), kind=_kind(p, blk, site, m),
                              block=None if blk is None else blk.index,
                              path=p, site=site.name, invariance="exact" if exact else "joint",
                              has_bias=isinstance(getattr(m, "bias", None), nn.Parameter), weight=weight))
            claimed.add(p)
    return out


def _name(path: str, blk: Any, layout: ModelLayout, m: nn.Module) -> str:
    if blk is not None:
        return f"blocks.{blk.index}.{path[len(blk.path) + 1:]}"
    if m is layout.embed:
        return "embed"
    return f"embed.{path.rsplit('.', 1)[-1]}"


def _kind(path: str, blk: Any, site: NormSite, m: nn.Module) -> str:
    if site.role == "qk_norm":
        return "key" if site.name.endswith("k_norm") else "query"
    if blk is None:
        return "embedding" if isinstance(m, nn.Embedding) else "input projection"
    rel = path[len(blk.path) + 1:]
    in_attn = blk.attn_path is not None and path.startswith(blk.attn_path + ".")
    return "attention output" if in_attn or "attn" in rel or "attention" in rel else "MLP output"

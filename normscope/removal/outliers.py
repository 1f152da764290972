"""Which tokens after position 0 a shared frozen divisor must serve: massive activations and divisor outliers.

With a fixed BOS at position 0, position 0's trajectory is a constant of the model (see
:mod:`normscope.removal.frozen`), so the removal only has to fit positions >= 1. Whether those can share one
divisor per site depends on how far their per-token RMS spreads. This module measures, in one pass over a
text, with no activations kept:

* **massive activations at positions >= 1** in the residual stream after every block, by Sun et al.'s rule
  (|h| > ``threshold`` and > ``ratio`` x the median |h| of that sequence's [positions >= 1 x d_model]
  entries): which token types carry them, at which layers and dims, how large, how often;
* **divisor spread per site**: for every norm site's input, the per-token divisor (RMS, or std for
  LayerNorm) at positions >= 1 relative to the site's mean over positions >= 1 (the value a shared frozen
  divisor takes): its maximum, its 99.9th percentile, and the token types above ``spread_bar`` x the mean.

The reducers are the removal's own (not :mod:`normscope.analyses.sinks`' ``ResidualReducer``): they skip position 0,
keep a per-token-type tally, and hook the model directly (block outputs and norm-site inputs), so they work
on a wrapped (partly frozen) model too.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from torch import nn

MASSIVE_THRESHOLD = 100.0
MASSIVE_RATIO = 1000.0
SPREAD_BAR = 4.0


@dataclass
class _TokenTally:
    """One token type's massive activations at positions >= 1."""

    hits: int = 0  # occurrences (sequence, position) with at least one massive entry in some layer
    layers: set[int] = field(default_factory=set)
    dims: Counter[int] = field(default_factory=Counter)
    max_abs: float = 0.0
    positions: list[int] = field(default_factory=list)


class MassiveAfterBos:
    """Massive activations at positions >= 1 of every block's output (residual stream), per token type."""

    def __init__(self, n_layers: int, threshold: float = MASSIVE_THRESHOLD, ratio: float = MASSIVE_RATIO) -> None:
        self.n_layers, self.threshold, self.ratio = n_layers, threshold, ratio
        self.tally: dict[int, _TokenTally] = defaultdict(_TokenTally)
        self.occurrences: Counter[int] = Counter()  # token id -> occurrences at positions >= 1
        self.n_tokens = 0
        self.pos0_max: list[float] = [0.0] * n_layers  # largest |h| at position 0 per layer (for contrast)
        self.max_rest: list[float] = [0.0] * n_layers  # largest |h| at positions >= 1 per layer
        self._hit_keys: set[tuple[int, int, int]] = set()  # (batch serial, row, pos) already counted
        self._serial = 0
        self._ids: torch.Tensor | None = None

    def begin(self, input_ids: torch.Tensor) -> None:
        """Start a batch: ``input_ids`` ``[batch, pos]``."""
        self._serial += 1
        self._ids = input_ids.detach().cpu()
        rest = self._ids[:, 1:].reshape(-1).tolist()
        self.occurrences.update(rest)
        self.n_tokens += len(rest)

    def update(self, layer: int, h: torch.Tensor) -> None:
        """h: ``[batch, pos, d_model]``, the residual stream after block ``layer``."""
        assert self._ids is not None
        a = h.detach().float().abs()  # [batch, pos, d]
        self.pos0_max[layer] = max(self.pos0_max[layer], float(a[:, 0].max()))
        rest = a[:, 1:]  # [batch, pos-1, d]
        if rest.numel() == 0:
            return
        self.max_rest[layer] = max(self.max_rest[layer], float(rest.max()))
        med = rest.flatten(1).median(dim=1).values  # [batch]
        bar = torch.clamp(self.ratio * med, min=self.threshold)  # [batch]
        mask = rest > bar[:, None, None]  # [batch, pos-1, d]
        if not bool(mask.any()):
            return
        for bi, p, dim in mask.nonzero().tolist():
            pos = p + 1
            tok = int(self._ids[bi, pos])
            t = self.tally[tok]
            key = (self._serial, bi, pos)
            if key not in self._hit_keys:
                self._hit_keys.add(key)
                t.hits += 1
                t.positions.append(pos)
            t.layers.add(layer)
            t.dims[dim] += 1
            t.max_abs = max(t.max_abs, float(rest[bi, p, dim]))

    def table(self, tokenizer: Any) -> pd.DataFrame:
        """One row per token type with a massive activation at positions >= 1, most frequent first."""
        rows = []
        for tok, t in self.tally.items():
            layers = sorted(t.layers)
            rows.append({
                "token": _decode(tokenizer, tok),
                "token_id": tok,
                "hits": t.hits,
                "occurrences": self.occurrences[tok],
                "share_of_its_occurrences": t.hits / max(self.occurrences[tok], 1),
                "share_of_all_tokens": t.hits / max(self.n_tokens, 1),
                "layers": f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0]),
                "n_layers": len(layers),
                "dims": ",".join(str(d) for d, _ in t.dims.most_common(3)),
                "max_abs": t.max_abs,
                "positions": _positions(t.positions),
            })
        cols = ["token", "token_id", "hits", "occurrences", "share_of_its_occurrences", "share_of_all_tokens",
                "layers", "n_layers", "dims", "max_abs", "positions"]
        return pd.DataFrame(rows, columns=cols).sort_values(["hits", "max_abs"], ascending=False, ignore_index=True)


class DivisorSpread:
    """Per site: the per-token divisor at positions >= 1 over the site's mean divisor there, and who is above
    ``bar`` x the mean (the tokens a shared frozen divisor serves worst)."""

    def __init__(self, bar: float = SPREAD_BAR, keep: int = 50_000) -> None:
        self.bar, self.keep = bar, keep
        self.values: dict[str, list[torch.Tensor]] = defaultdict(list)  # site -> [n] divisors, positions >= 1
        self.ids: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.pos0: dict[str, list[float]] = defaultdict(list)

    def update(self, site: str, div: torch.Tensor, input_ids: torch.Tensor) -> None:
        """div: ``[batch, pos, 1]`` per-token divisors of ``site``'s input; input_ids ``[batch, pos]``."""
        d = div.detach().float().squeeze(-1).cpu()  # [batch, pos]
        self.pos0[site].extend(d[:, 0].tolist())
        self.values[site].append(d[:, 1:].reshape(-1))
        self.ids[site].append(input_ids[:, 1:].detach().cpu().reshape(-1))

    def table(self, tokenizer: Any) -> pd.DataFrame:
        rows = []
        for site, vals in self.values.items():
            v = torch.cat(vals).double()  # [n]
            ids = torch.cat(self.ids[site])
            mean = float(v.mean())
            r = v / mean
            over = r > self.bar
            tops = Counter(ids[over].tolist()).most_common(3)
            rows.append({
                "site": site,
                "mean_divisor": mean,
                "position0_over_mean": float(torch.tensor(self.pos0[site]).double().mean()) / mean,
                "p99_over_mean": float(torch.quantile(r, 0.99)),
                "p99_9_over_mean": float(torch.quantile(r, 0.999)),
                "max_over_mean": float(r.max()),
                "min_over_mean": float(r.min()),
                "share_over_bar": float(over.double().mean()),
                "tokens_over_bar": ", ".join(f"{_decode(tokenizer, t)!r} x{n}" for t, n in tops),
            })
        return pd.DataFrame(rows)


def measure(model: nn.Module, layout: Any, sites: list[Any], batches: list[Any], *, spread_bar: float = SPREAD_BAR,
            threshold: float = MASSIVE_THRESHOLD,
            ratio: float = MASSIVE_RATIO) -> tuple[MassiveAfterBos, DivisorSpread]:
    """One no-grad pass over ``batches`` (:class:`normscope.core.text.TokenBatch`, BOS at position 0): massive
    activations after every block and the divisor spread at every site's input, at positions >= 1."""
    massive = MassiveAfterBos(len(layout.blocks), threshold, ratio)
    spread = DivisorSpread(spread_bar)
    handles: list[torch.utils.hooks.RemovableHandle] = []
    current: dict[str, torch.Tensor] = {}

    def block_hook(i: int) -> Any:
        def hook(module: nn.Module, args: tuple, out: Any) -> None:
            h = out[0] if isinstance(out, tuple) else out  # [batch, pos, d]
            massive.update(i, h)
        return hook

    def site_hook(site: Any) -> Any:
        def hook(module: nn.Module, args: tuple) -> None:
            spread.update(site.name, site.divisor(args[0]), current["ids"])
        return hook

    for b in layout.blocks:
        handles.append(b.module.register_forward_hook(block_hook(b.index)))
    for s in sites:
        if s.role in ("pre_attn", "pre_mlp", "final"):
            handles.append(model.get_submodule(s.path).register_forward_pre_hook(site_hook(s)))
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for b in batches:
                ids = b.input_ids.to(device)  # [batch, pos]
                current["ids"] = ids
                massive.begin(ids)
                model(input_ids=ids, attention_mask=b.attention_mask.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return massive, spread


def _decode(tokenizer: Any, tok: int) -> str:
    try:
        return tokenizer.decode([tok])
    except Exception:
        return str(tok)


def _positions(pos: list[int]) -> str:
    if not pos:
        return ""
    c = Counter(pos)
    return ", ".join(str(p) for p, _ in c.most_common(5)) + (" ..." if len(c) > 5 else "")

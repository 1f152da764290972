"""Which hook points the hubness analysis reads, how they are grouped into passes under the memory cap, and
the token bookkeeping (id, position, sequence, next token) of the rows of every captured matrix."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from normscope.analyses.hubness.reducers import token_mask
from normscope.core.capture import BatchContext


@dataclass
class Point:
    """One hook point whose token representations are analysed."""

    hook: str  # capture point, e.g. "blocks.3.ln1.hook_out"
    layer: int  # block index (the final norm counts as the last block)
    kind: str  # "resid_post", "norm_in", "norm_out"
    site: str | None = None  # norm site name, e.g. "blocks.3.ln1"
    role: str | None = None
    order: int = 0  # position in the forward pass, for plots

    @property
    def label(self) -> str:
        if self.kind == "resid_post":
            return f"blocks.{self.layer}.resid_post"
        return f"{self.site}.{'in' if self.kind == 'norm_in' else 'out'}"


@dataclass
class TokenMeta:
    """Per row of a captured matrix: the token, where it sits, and the token after it."""

    ids: torch.Tensor  # [n] token ids
    pos: torch.Tensor  # [n] position in the sequence
    seq: torch.Tensor  # [n] sequence index
    next_ids: torch.Tensor  # [n] the next token (-1 at the last position)
    sink_ids: set[int] = field(default_factory=set)  # token ids that act as attention sinks after position 0


DEFAULT_N_LAYERS = 6  # blocks analysed by default: each costs 5 points (two norms' input and output, its output)


def default_layers(n_layers: int, n: int = DEFAULT_N_LAYERS) -> list[int]:
    """``n`` blocks spread evenly from the first to the last (every block when the model has no more):
    0, 6, 12, 17, 23, 29 of 30."""
    if n_layers <= n:
        return list(range(n_layers))
    return sorted({round(i * (n_layers - 1) / (n - 1)) for i in range(n)})


def plan_points(layout: Any, sites: list[Any], layers: list[int], with_sites: bool) -> list[Point]:
    """The hook points of the chosen blocks: each norm site's input and output, then the block's output.

    qk-norm sites act on per-head vectors and are skipped; the final norm belongs to the last block.
    """
    n = layout.n_layers
    points: list[Point] = []
    order = 0
    chosen = set(layers)
    for layer in layers:
        if with_sites:
            for s in sites:
                if s.role in ("qk_norm", "embedding", "other", "final") or s.layer != layer:
                    continue
                for kind, hook in (("norm_in", "hook_in"), ("norm_out", "hook_out")):
                    points.append(Point(f"{s.name}.{hook}", layer, kind, s.name, s.role, order))
                    order += 1
        points.append(Point(f"blocks.{layer}.hook_resid_post", layer, "resid_post", order=order))
        order += 1
    if with_sites and layout.final_norm is not None and (n - 1) in chosen:
        s = layout.final_norm
        for kind, hook in (("norm_in", "hook_in"), ("norm_out", "hook_out")):
            points.append(Point(f"{s.name}.{hook}", n - 1, kind, s.name, "final", order))
            order += 1
    return points


def group_points(points: list[Point], bytes_per_point: int, memory_mb: float) -> list[list[Point]]:
    """Split the points into passes whose matrices together stay under ``memory_mb`` (at least one each)."""
    per_pass = max(1, int(memory_mb * 2**20 // max(bytes_per_point, 1)))
    return [points[i:i + per_pass] for i in range(0, len(points), per_pass)]



def token_meta(sample: Any) -> TokenMeta:
    """Token id, position, sequence and next token of every token hubness looks at, in collector order."""
    ids, pos, seq, nxt = [], [], [], []
    s0 = 0
    for b in sample.iter_batches():
        ctx = BatchContext(b.input_ids, b.attention_mask, list(b.categories), 0)
        mask = token_mask(ctx).cpu()  # [batch, pos]
        bsz, t = b.input_ids.shape
        p = torch.arange(t).expand(bsz, t)
        sq = (torch.arange(bsz) + s0)[:, None].expand(bsz, t)
        nx = torch.cat([b.input_ids[:, 1:], torch.full((bsz, 1), -1, dtype=b.input_ids.dtype)], dim=1)
        ids.append(b.input_ids[mask])
        pos.append(p[mask])
        seq.append(sq[mask])
        nxt.append(nx[mask])
        s0 += bsz
    return TokenMeta(torch.cat(ids), torch.cat(pos), torch.cat(seq), torch.cat(nxt))




_TokenMeta = TokenMeta  # the older private names, kept for tests and benchmarks
_token_meta = token_meta

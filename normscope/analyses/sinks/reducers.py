"""The hook reducers of ``normscope sinks``: each folds one hook point's tensor per batch into running sums
and counts (nothing per token is kept across batches), and turns them into a table row at the end.

* :class:`AttentionSinkReducer` (``blocks.{l}.attn.hook_col_sum``): alpha_k sums and sink counts per head (Gu
  et al. 2024, "When Attention Sink Emerges in Language Models: An Empirical View", arXiv:2410.10781);
* :class:`ResidualReducer` (``blocks.{l}.hook_resid_post``): top-1/2/3 and median |h|, mean |h| per dim and the
  massive activations (Sun et al. 2024, "Massive Activations in Large Language Models", arXiv:2402.17762);
* :class:`OutlierReducer` (``<site>.hook_in``): the divisor of position 0 against ordinary tokens and the share
  of it carried by the top dims (Qiu et al. 2026, "A Unified View of Attention and Residual Sinks", arXiv:2601.22966).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

import torch

from normscope.analyses.sinks.metrics import row_median, site_outliers, top3_entries
from normscope.core.attention import SinkTokens, sink_scores_from_col_sum
from normscope.core.capture import BatchContext

__all__ = ["AttentionSinkReducer", "OutlierReducer", "ResidualReducer"]


class AttentionSinkReducer:
    """Per layer: sum of alpha_k per head and key, sink counts per category, and the tokens that act as sinks.

    Reads ``blocks.{l}.attn.hook_col_sum`` (the pattern's column sums, from either attention path). The sums and
    counts stay on the hook's device; only the sink-token hits are read on the host, once per batch.
    """

    def __init__(self, layer: int, eps: float, causal: bool, min_queries: int,
                 tokens: SinkTokens | None = None) -> None:
        self.layer, self.eps, self.causal, self.min_queries = layer, eps, causal, min_queries
        self._alpha_sum: torch.Tensor | None = None  # [head, key] float64, on the hook's device
        self._above: torch.Tensor | None = None  # [head] sequences with alpha_1 > eps
        self._cat_above: dict[str, torch.Tensor] = {}  # category -> (sequence, head) pairs with alpha_1 > eps
        self.n_seq = 0
        self.cat_n: Counter[str] = Counter()
        self.tokens = tokens if tokens is not None else SinkTokens(causal, eps, min_queries)

    def update(self, col: torch.Tensor, ctx: BatchContext) -> None:
        """col: ``[batch, head, key]`` attention summed over the queries of one batch."""
        alpha = sink_scores_from_col_sum(col, ctx.input_ids.shape[1], self.causal)  # [batch, head, key]
        b, h, t = alpha.shape
        if self._alpha_sum is None:
            self._alpha_sum = torch.zeros(h, t, dtype=torch.float64, device=alpha.device)
            self._above = torch.zeros(h, dtype=torch.float64, device=alpha.device)
        assert self._above is not None
        self._alpha_sum += alpha.double().sum(0)
        first = alpha[:, :, 0] > self.eps  # [batch, head]
        self._above += first.double().sum(0)
        self.n_seq += b
        for cat in dict.fromkeys(ctx.categories):
            rows = torch.tensor([i for i, c in enumerate(ctx.categories) if c == cat], device=first.device)
            hits = first.index_select(0, rows).sum()  # stays on the device
            self._cat_above[cat] = self._cat_above[cat] + hits if cat in self._cat_above else hits
            self.cat_n[cat] += h * int(rows.numel())
        self.tokens.add(alpha, ctx.input_ids)

    @property
    def alpha_sum(self) -> torch.Tensor | None:
        """``[head, key]`` sum of alpha_k over sequences (float64, on the host)."""
        return None if self._alpha_sum is None else self._alpha_sum.cpu()

    @property
    def above(self) -> torch.Tensor | None:
        """``[head]`` number of sequences whose alpha_1 exceeds eps (on the host)."""
        return None if self._above is None else self._above.cpu()

    @property
    def cat_above(self) -> Counter[str]:
        """Category -> (sequence, head) pairs whose alpha_1 exceeds eps."""
        return Counter({c: int(v) for c, v in self._cat_above.items()})

    def alpha_mean(self) -> torch.Tensor:
        """``[head, key]`` mean alpha_k over sequences."""
        assert self._alpha_sum is not None
        return self._alpha_sum.cpu() / max(self.n_seq, 1)


class ResidualReducer:
    """Per layer: mean top-1/2/3 and median |h| per sequence, mean |h| per dim, and massive activations."""

    def __init__(self, layer: int, threshold: float, ratio: float, max_entries: int = 20000) -> None:
        self.layer, self.threshold, self.ratio, self.max_entries = layer, threshold, ratio, max_entries
        self.n_seq = 0
        self.top_sum = torch.zeros(3, dtype=torch.float64)
        self.median_sum = 0.0
        self.abs_sum: torch.Tensor | None = None  # [d_model]
        self.n_tok = 0
        # (dim, position) -> [count, max |h|, signed value at max, token at max]
        self.massive: dict[tuple[int, int], list[Any]] = {}
        self.massive_value_sum: defaultdict[int, float] = defaultdict(float)  # dim -> sum of signed massive values
        self.massive_count: Counter[int] = Counter()
        self.top1_where: Counter[tuple[int, int]] = Counter()  # (dim, position) of each sequence's top-1 |h|

    def update(self, h: torch.Tensor, ctx: BatchContext) -> None:
        """h: ``[batch, pos, d_model]`` the block's output (residual stream after the block)."""
        a = h.float().abs()  # [batch, pos, d_model]
        flat = a.flatten(1)  # [batch, pos*d_model]
        top_vals, top_pos, top_dim = top3_entries(a)  # [batch, 3] each
        self.top_sum += top_vals.double().sum(0).cpu()
        for dim, pos in zip(top_dim[:, 0].tolist(), top_pos[:, 0].tolist(), strict=True):
            self.top1_where[(dim, pos)] += 1
        med = row_median(flat)  # [batch]
        self.median_sum += float(med.double().sum())
        self.n_seq += h.shape[0]
        s = a.sum(dim=(0, 1)).double().cpu()  # [d_model]
        self.abs_sum = s if self.abs_sum is None else self.abs_sum + s
        self.n_tok += h.shape[0] * h.shape[1]
        bar = torch.clamp(self.ratio * med.to(a.device), min=self.threshold)  # [batch]
        if not bool((top_vals[:, 0] > bar).any()):  # no sequence's top-1 passes: nothing is massive
            return
        mask = a > bar[:, None, None]  # massive_mask, median reused
        where = mask.nonzero()  # [n, 3] (sequence, position, dim)
        vals = h[where[:, 0], where[:, 1], where[:, 2]].double()  # [n] signed values
        tids = ctx.input_ids[where[:, 0], where[:, 1]].to(vals.device).double()  # [n] token ids (exact below 2^53)
        entries = torch.cat([where.to(vals.device).double(), vals[:, None], tids[:, None]], dim=1)  # [n, 5]
        for _bi, pos_f, dim_f, v, tid_f in entries.tolist():  # one host read for all the entries of the batch
            pos, dim, tid = int(pos_f), int(dim_f), int(tid_f)
            self.massive_value_sum[dim] += v
            self.massive_count[dim] += 1
            key = (dim, pos)
            e = self.massive.get(key)
            if e is None:
                if len(self.massive) >= self.max_entries:
                    continue
                self.massive[key] = [1, abs(v), v, tid]
            else:
                e[0] += 1
                if abs(v) > e[1]:
                    e[1:] = [abs(v), v, tid]

    @property
    def top(self) -> list[float]:
        """Mean top-1, top-2 and top-3 |h| of a sequence."""
        return (self.top_sum / max(self.n_seq, 1)).tolist()

    @property
    def median(self) -> float:
        """Mean over sequences of the median |h| of the sequence."""
        return self.median_sum / max(self.n_seq, 1)

    def top1_location(self) -> tuple[int, int, float]:
        """(dim, position) that most often holds a sequence's top-1 |h|, and how often (0..1)."""
        (dim, pos), n = self.top1_where.most_common(1)[0]
        return dim, pos, n / max(self.n_seq, 1)

    def massive_dims(self) -> list[int]:
        """Dims with a massive activation, most frequent first."""
        return sorted(self.massive_count, key=lambda d: -self.massive_count[d])


class OutlierReducer:
    """Per norm site: divisor of position 0 vs ordinary tokens, and the share of it carried by the top dims."""

    def __init__(self, site: Any, k: int) -> None:
        self.site, self.k = site, k
        self.n = {"first": 0, "rest": 0}
        self.div = {"first": 0.0, "rest": 0.0}
        self.share = {"first": torch.zeros(k, dtype=torch.float64), "rest": torch.zeros(k, dtype=torch.float64)}
        self.shrink = {"first": 0.0, "rest": 0.0}  # sum of sqrt(1 - r^2), r = |x_top1| / ||x||
        self.top_dim: torch.Tensor | None = None  # [d] how often each dim is a token's largest

    def update(self, x: torch.Tensor, ctx: BatchContext) -> None:
        """x: ``[batch, pos, d]`` the norm's input."""
        div, share, top_dim = site_outliers(x, self.k, self.site.centered, self.site.eps)  # [b, p], [b, p, k]
        counts = torch.bincount(top_dim.flatten(), minlength=x.shape[-1]).cpu()  # [d]
        self.top_dim = counts if self.top_dim is None else self.top_dim + counts
        shrink = torch.sqrt((1 - share[..., 0]).clamp_min(0))  # [batch, pos]
        for key, sl in (("first", slice(0, 1)), ("rest", slice(1, None))):
            self.n[key] += div[:, sl].numel()
            self.div[key] += float(div[:, sl].double().sum())
            self.share[key] += share[:, sl].double().sum(dim=(0, 1)).cpu()
            self.shrink[key] += float(shrink[:, sl].double().sum())

    def row(self) -> dict[str, Any]:
        """The site's row of the ``sites`` table: means over tokens at position 0 (``_first``) and after it."""
        out: dict[str, Any] = {"site": self.site.name, "layer": self.site.layer, "role": self.site.role}
        for key in ("first", "rest"):
            n = max(self.n[key], 1)
            out[f"divisor_{key}"] = self.div[key] / n
            for j in range(self.k):
                out[f"top{j + 1}_share_{key}"] = float(self.share[key][j]) / n
            out[f"shrink_{key}"] = self.shrink[key] / n
        out["divisor_ratio_first_to_rest"] = out["divisor_first"] / max(out["divisor_rest"], 1e-30)
        dim, cnt = (int(self.top_dim.argmax()), int(self.top_dim.max())) if self.top_dim is not None else (-1, 0)
        out["top_dim"] = dim
        out["top_dim_frequency"] = cnt / max(self.n["first"] + self.n["rest"], 1)
        return out

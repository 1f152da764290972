"""Pure hubness metrics: tensors in, numbers out (no hooks, no plotting).

* k-occurrence N_k and k-skewness (biased, as ``scipy.stats.skew``): Radovanovic, Nanopoulos, Ivanovic 2010,
  "Hubs in Space: Popular Nearest Neighbors in High-Dimensional Data" (JMLR 11:2487-2531);
* Robin Hood index, antihub occurrence, hub occurrence (N_k >= 2k), Gini and Atkinson (eps 0.5) indices, with
  the conventions of scikit-hubness (Feldbauer, Leodolter, Plant, Flexer 2018, "Fast approximate hubness
  reduction for large high-dimensional data", IEEE ICBK; code ``VarIr/scikit-hubness``);
* position-0 islands and delimiter hubs: Nielsen, Macocco, Baroni 2025 (arXiv:2502.10201) and the massive
  activation of Sun, Chen, Kolter, Liu 2024 (arXiv:2402.17762).
"""

from __future__ import annotations

import math
import unicodedata

import pandas as pd
import torch


def knn_indices(
    x: torch.Tensor,
    k: int,
    metric: str = "euclidean",
    *,
    gallery: torch.Tensor | None = None,
    block_size: int = 1024,
) -> torch.Tensor:
    """Exact k nearest neighbours of every row of ``x``, computed in blocks of query rows (the k-NN lists of
    Radovanovic et al. 2010; self excluded and ties shuffled as in scikit-hubness, Feldbauer et al. 2018).

    x: ``[n, d]`` queries. gallery: ``[m, d]`` items to search (None: ``x`` itself, self excluded, as in
    scikit-hubness). metric: ``euclidean``, ``cosine`` or ``dot`` (largest inner product, e.g. logits).
    Returns ``[n, k]`` gallery indices, nearest first. Memory: one ``[block_size, m]`` block at a time.
    Computes in the dtype of ``x`` (float32 or float64); Euclidean points are centred first, which leaves
    distances unchanged and keeps the ``|q|^2 + |g|^2 - 2 q.g`` expansion accurate.
    """
    if metric not in ("euclidean", "cosine", "dot"):
        raise ValueError(f"unknown metric {metric!r}")
    self_search = gallery is None
    q = x if x.is_floating_point() else x.float()
    g = q if gallery is None else gallery.to(q.dtype)
    n, m = q.shape[0], g.shape[0]
    if k < 1 or k > m - (1 if self_search else 0):
        raise ValueError(f"k={k} needs at least {k + (1 if self_search else 0)} items, got {m}")
    if metric == "euclidean":
        center = g.mean(dim=0, keepdim=True)  # [1, d]
        q = q - center
        g = q if self_search else g - center
        g_sq = g.pow(2).sum(dim=1)  # [m]
    elif metric == "cosine":
        q = q / q.norm(dim=1, keepdim=True).clamp_min(1e-30)
        g = q if self_search else g / g.norm(dim=1, keepdim=True).clamp_min(1e-30)
    gen = torch.Generator().manual_seed(0)
    out = torch.empty(n, k, dtype=torch.long)
    for start in range(0, n, block_size):
        qb = q[start:start + block_size]  # [b, d]
        sim = qb @ g.T  # [b, m]
        if metric == "euclidean":
            # minus the squared distance up to |q|^2 (constant per row): larger is nearer for every metric
            sim.mul_(2).sub_(g_sq[None, :])
        if self_search:
            rows = torch.arange(qb.shape[0], device=sim.device)
            sim[rows, rows + start] = -math.inf
        out[start:start + qb.shape[0]] = _topk_random_ties(sim, k, gen).cpu()
    return out


def _topk_random_ties(sim: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Indices of the k largest entries per row; where ties straddle the cut (identical vectors, e.g. repeated
    tokens in the embeddings) the tied items are drawn at random, as scikit-hubness' ``shuffle_equal`` does,
    so that ties create no artificial hubs. sim: ``[b, m]``; returns ``[b, k]``."""
    vals, idx = sim.topk(k, dim=1)
    kth = vals[:, -1:]  # [b, 1]
    # equal up to rounding (identical vectors can differ in the last bits of a blocked matmul)
    tol = 8 * torch.finfo(sim.dtype).eps * (kth.abs() + 1)  # [b, 1]
    amb = ((sim >= kth - tol).sum(dim=1) > k).nonzero().flatten()  # more than k items reach the cut
    if amb.numel():
        s, t, lo = sim[amb], tol[amb], kth[amb]
        noise = torch.rand(s.shape, generator=gen).to(s.device)
        key = torch.where(s > lo + t, 2.0, torch.where(s >= lo - t, noise, -1.0))
        idx[amb] = key.topk(k, dim=1).indices
    return idx


def k_occurrence(indices: torch.Tensor, n_items: int) -> torch.Tensor:
    """N_k: how many k-NN lists contain each item (Radovanovic et al. 2010).

    indices: ``[n_queries, k]``; returns ``[n_items]`` long.
    """
    return torch.bincount(indices.reshape(-1), minlength=n_items)


def skewness(nk: torch.Tensor) -> float:
    """Biased sample skewness m3 / m2^1.5, as ``scipy.stats.skew`` (Radovanovic et al. 2010).

    nk: ``[n]``. A distribution with zero variance has no asymmetry: returns 0.0 (scipy returns NaN).
    """
    x = nk.double()
    d = x - x.mean()
    m2 = d.pow(2).mean()
    if float(m2) <= 1e-24 * max(float(x.abs().max()), 1.0) ** 2:
        return 0.0
    return float(d.pow(3).mean() / m2.pow(1.5))


def robin_hood(nk: torch.Tensor) -> float:
    """Robin Hood (Hoover) index 0.5 * sum|N_k - mean| / sum N_k: the share of occurrences that would have to
    move for every item to be a neighbour equally often (Feldbauer et al. 2018)."""
    x = nk.double()
    total = float(x.sum())
    return 0.5 * float((x - x.mean()).abs().sum()) / total if total else 0.0


def gini(nk: torch.Tensor) -> float:
    """Gini index sum_ij |N_i - N_j| / (2 n sum N), via the sorted form sum_i (2i - n - 1) N_(i) / (n sum N)
    (scikit-hubness, Feldbauer et al. 2018). nk: ``[n]``."""
    x = nk.double().sort().values
    n, total = x.numel(), float(x.sum())
    if not n or not total:
        return 0.0
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return float(((2 * i - n - 1) * x).sum()) / (n * total)


def atkinson(nk: torch.Tensor, eps: float = 0.5) -> float:
    """Atkinson index 1 - mean(N^(1-eps))^(1/(1-eps)) / mean(N) (scikit-hubness, Feldbauer et al. 2018, eps 0.5).
    nk: ``[n]``."""
    x = nk.double()
    mean = float(x.mean())
    if not mean:
        return 0.0
    if eps == 1:
        return 1.0 - float(torch.exp(torch.log(x).mean())) / mean
    return 1.0 - float(x.pow(1 - eps).mean().pow(1 / (1 - eps))) / mean


def hubness_scores(nk: torch.Tensor, k: int, hub_size: float = 2.0) -> dict[str, float]:
    """All hubness measures of one k-occurrence vector ``[n]`` (scikit-hubness conventions).

    ``antihub_share``: items with N_k = 0; ``hub_occurrence``: share of all occurrences that go to hubs
    (N_k >= hub_size * k); ``n_hubs``: how many hubs; ``max_nk``: the largest N_k.
    """
    x = nk.double()
    total = float(x.sum())
    hubs = x >= hub_size * k
    return {
        "skewness": skewness(nk),
        "robin_hood": robin_hood(nk),
        "antihub_share": float((x == 0).double().mean()),
        "hub_occurrence": float(x[hubs].sum()) / total if total else 0.0,
        "gini": gini(nk),
        "atkinson": atkinson(nk),
        "n_hubs": int(hubs.sum()),
        "max_nk": int(x.max()) if x.numel() else 0,
    }


def position0_stats(indices: torch.Tensor, pos: torch.Tensor) -> float | None:
    """Share of the neighbours of position-0 tokens that are position-0 tokens themselves (the island a massive
    activation makes, Sun, Chen, Kolter, Liu 2024, arXiv:2402.17762).

    indices: ``[n, k]`` k-NN lists; pos: ``[n]`` positions. Near 1 (or (n_seq - 1) / k when there are fewer
    sequences than k) when the first tokens form an island apart from the text, as a massive activation does.
    """
    first = pos == 0
    if not first.any():
        return None
    return float((pos[indices[first]] == 0).double().mean())


def is_delimiter(text: str) -> bool:
    """A token whose text is only whitespace and punctuation (``.``, ``,``, ``\\n``, ``:`` ...): the frequent
    tokens Nielsen, Macocco, Baroni 2025 (arXiv:2502.10201) find among hubs."""
    s = text.strip()
    return not s or all(unicodedata.category(c)[0] in "PZ" or c in "\n\r\t" for c in s)


def norm_effect_table(pts: pd.DataFrame) -> pd.DataFrame:
    """One row per (norm site, metric): each hubness measure (Radovanovic et al. 2010, Feldbauer et al. 2018) on
    the site's input and output, side by side. pts: the per-point table of the analysis."""
    cols = ["site", "role", "layer", "metric"]
    measures = ["skewness", "robin_hood", "antihub_share", "hub_occurrence", "gini"]
    if not len(pts) or not (pts["kind"] == "norm_in").any():
        return pd.DataFrame(columns=cols + [f"{m}_{s}" for m in measures for s in ("in", "out")])
    a = pts[pts["kind"] == "norm_in"].set_index(["site", "metric"])
    b = pts[pts["kind"] == "norm_out"].set_index(["site", "metric"])
    rows = []
    for key in a.index:
        if key not in b.index:
            continue
        ra, rb = a.loc[key], b.loc[key]
        row = {"site": key[0], "role": ra["role"], "layer": int(ra["layer"]), "metric": key[1],
               "order": int(ra["order"])}
        for m in measures:
            row[f"{m}_in"] = float(ra[m])
            row[f"{m}_out"] = float(rb[m])
        row["skewness_change"] = row["skewness_out"] - row["skewness_in"]
        rows.append(row)
    return pd.DataFrame(rows).sort_values(["metric", "order"]).drop(columns="order").reset_index(drop=True)


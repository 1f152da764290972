"""Per-site initialisation of the swapped function from activation statistics, and its error before training.

The fit (one pass over calibration text, no gradient): for every site, with ``x`` its input and ``y`` the norm's
output on the same token, DyT and Derf take the alpha (one scalar per site, on a log grid of 33 values from
0.01 to 10 over the site's typical input RMS) and the per-dimension ``gamma`` (and ``beta`` where the norm has a
bias) that minimise ``sum_t ||f(x_t) - y_t||^2`` over every calibration token. For a fixed
alpha this is an ordinary least-squares problem per dimension with the closed form

    gamma_j = S_yt / S_tt                              (no beta)
    gamma_j = (n S_yt - S_t S_y) / (n S_tt - S_t^2),   beta_j = (S_y - gamma_j S_t) / n

where ``t = tanh(alpha x_j)`` (``erf`` for Derf, whose shift ``s`` starts at 0) and ``S`` are sums over tokens, so
the hooks keep only ``[grid, d]`` running sums per site and the grid is searched exactly afterwards. The first
calibration batch sets each site's grid from its input RMS. SeeDNorm needs no fit: with ``beta = 0`` it is the
RMSNorm site itself (``gamma`` = the norm's weight).

Position 0 stays in the fit. On SmolLM2 it carries a massive activation (about 24,000 in dim 507, an RMS about
170x that of other tokens), where ``tanh(alpha x)`` saturates. Fitted on the ordinary tokens alone, the middle
layers' alpha falls to the linear end of the grid (alpha x RMS about 0.01): the best fit for 127 ordinary tokens,
but every large token then comes out tens of times too large (measured: the whole model swapped at once, CE 281
against 3.76). With position 0 in the sums alpha x RMS rises to 0.4-0.7 there, saturating, and that CE falls to
175 (45 with ``--exact-bos``). Its error is also reported on its own.

The error table: on held-out calibration tokens (the first batches of the held-out text), the relative error
``sqrt(sum ||f(x) - y||^2 / sum ||y||^2)`` of each site alone (its input from the original model), for the fitted
function and for the naive transplant (alpha = 0.5 as DyT initialises it, gamma = the norm's weight, beta = its
bias), at positions >= 1 and at position 0 apart.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch import nn

from normscope.core.capture import BatchContext, Capture
from normscope.swap.functions import NAIVE_ALPHA, Derf, DyT, SeeDNorm, SwapFunction, alpha_grid


def _tokens(x: torch.Tensor, ctx: BatchContext) -> tuple[torch.Tensor, torch.Tensor]:
    """The site tensor as ``[tokens, d]`` float32 rows split into (position 0, positions >= 1), padding dropped.
    x: ``[batch, pos, d]`` or ``[batch, pos, heads, d_head]`` (each head's vector is one row)."""
    mask = ctx.on(x)[1].bool()  # [batch, pos]
    d = x.shape[-1]
    xf = x.detach().float().reshape(x.shape[0], x.shape[1], -1, d)  # [batch, pos, k, d]
    first = xf[:, :1][mask[:, :1]].reshape(-1, d)  # [rows0, d]
    rest = xf[:, 1:][mask[:, 1:]].reshape(-1, d)  # [rows, d]
    return first, rest


class _Pair:
    """Pairs a site's input (``hook_in``) with its output (``hook_out``) on the same forward pass."""

    def __init__(self) -> None:
        self.x: torch.Tensor | None = None
        self.inp = _Stash(self)
        self.out = _Consume(self)

    def add(self, x: torch.Tensor, y: torch.Tensor, ctx: BatchContext) -> None:
        raise NotImplementedError


class _Stash:
    def __init__(self, pair: _Pair) -> None:
        self.pair = pair

    def update(self, x: torch.Tensor, ctx: BatchContext) -> None:
        self.pair.x = x  # held until the norm's output arrives on this same forward pass, then dropped


class _Consume:
    def __init__(self, pair: _Pair) -> None:
        self.pair = pair

    def update(self, y: torch.Tensor, ctx: BatchContext) -> None:
        x, self.pair.x = self.pair.x, None
        assert x is not None, "hook_out fired without hook_in"
        self.pair.add(x, y, ctx)


class GridSums(_Pair):
    """Running least-squares sums of one site for every alpha of its grid (see the module docstring)."""

    def __init__(self, fn: str, with_beta: bool, points: int = 33, skip_first: bool = False) -> None:
        super().__init__()
        self.fn, self.with_beta, self.points, self.skip_first = fn, with_beta, points, skip_first
        self.grid: torch.Tensor | None = None  # [G] float64
        self.st: torch.Tensor | None = None  # [G, d] sum of t
        self.stt: torch.Tensor | None = None  # [G, d] sum of t^2
        self.syt: torch.Tensor | None = None  # [G, d] sum of y t
        self.sy: torch.Tensor | None = None  # [d]
        self.syy: torch.Tensor | None = None  # [d]
        self.n = 0
        self.rms_sum, self.rms_n = 0.0, 0

    def add(self, x: torch.Tensor, y: torch.Tensor, ctx: BatchContext) -> None:
        (x0, xr), (y0, yr) = _tokens(x, ctx), _tokens(y, ctx)  # [n0, d], [n, d]
        if not self.skip_first:  # every token counts, position 0 included
            xr, yr = torch.cat([x0, xr]), torch.cat([y0, yr])
        if xr.shape[0] == 0:
            return
        rms = _tokens(x, ctx)[1].pow(2).mean(dim=-1).sqrt()  # [n] the grid's scale: ordinary tokens
        self.rms_sum += float(rms.double().sum())
        self.rms_n += int(rms.numel())
        if self.grid is None:
            self.grid = alpha_grid(self.rms_sum / self.rms_n, self.points)
            d = xr.shape[-1]
            z = torch.zeros(self.points, d, dtype=torch.float64)
            self.st, self.stt, self.syt = z.clone(), z.clone(), z.clone()
            self.sy, self.syy = torch.zeros(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)
        assert self.st is not None and self.stt is not None and self.syt is not None
        assert self.sy is not None and self.syy is not None
        act = torch.tanh if self.fn == "tanh" else torch.erf
        for g, a in enumerate(self.grid.tolist()):  # one alpha at a time: [n, d] temporaries, not [G, n, d]
            t = act(a * xr)  # [n, d]
            self.st[g] += t.sum(0).double()
            self.stt[g] += t.pow(2).sum(0).double()
            self.syt[g] += (yr * t).sum(0).double()
        self.sy += yr.sum(0).double()
        self.syy += yr.pow(2).sum(0).double()
        self.n += int(xr.shape[0])

    def solve(self) -> tuple[float, torch.Tensor, torch.Tensor | None, float, int]:
        """(alpha, gamma ``[d]``, beta ``[d]`` or None, relative error on the fit tokens, grid index)."""
        assert self.grid is not None and self.st is not None and self.stt is not None and self.syt is not None
        assert self.sy is not None and self.syy is not None
        n = float(self.n)
        if self.with_beta:
            den = n * self.stt - self.st.pow(2)  # [G, d]
            gamma = torch.where(den > 0, (n * self.syt - self.st * self.sy) / den.clamp_min(1e-300), 0.0)
            beta = (self.sy - gamma * self.st) / n  # [G, d]
            sse = self.syy - gamma * self.syt - beta * self.sy  # [G, d]
        else:
            gamma = torch.where(self.stt > 0, self.syt / self.stt.clamp_min(1e-300), 0.0)
            beta = None
            sse = self.syy - gamma * self.syt
        total = sse.clamp_min(0.0).sum(-1)  # [G]
        g = int(total.argmin())
        rel = float((total[g] / self.syy.sum().clamp_min(1e-300)).sqrt())
        return (float(self.grid[g]), gamma[g].float(), beta[g].float() if beta is not None else None, rel, g)


class ErrorSums(_Pair):
    """Squared error of candidate functions against the norm's output, and the norm's squared output,
    summed over held-out tokens at position 0 and at positions >= 1."""

    def __init__(self, fns: dict[str, SwapFunction]) -> None:
        super().__init__()
        self.fns = fns
        self.err = {k: [0.0, 0.0] for k in fns}  # name -> [position 0, positions >= 1]
        self.ref = [0.0, 0.0]
        self.rms = [0.0, 0.0]
        self.n = [0, 0]

    def add(self, x: torch.Tensor, y: torch.Tensor, ctx: BatchContext) -> None:
        for i, (xr, yr) in enumerate(zip(_tokens(x, ctx), _tokens(y, ctx), strict=True)):  # [n, d] each
            if xr.shape[0] == 0:
                continue
            self.ref[i] += float(yr.double().pow(2).sum())
            self.rms[i] += float(xr.pow(2).mean(-1).sqrt().double().sum())
            self.n[i] += int(xr.shape[0])
            with torch.no_grad():
                for k, f in self.fns.items():
                    f.to(xr.device)
                    self.err[k][i] += float((f(xr) - yr).double().pow(2).sum())

    def relative(self, name: str, i: int) -> float:
        return (self.err[name][i] / self.ref[i]) ** 0.5 if self.ref[i] > 0 else float("nan")


@dataclass
class SiteInit:
    """One site's swapped function as initialised, with its fit diagnostics."""

    site: str
    fn: SwapFunction
    fit_error: float | None  # relative error on the fit tokens (None: no fit)
    grid_edge: bool = False  # the best alpha is at an end of the grid


def make_function(target: str, site: Any, weight: torch.Tensor | None, bias: torch.Tensor | None,
                  d: int, alpha: float = NAIVE_ALPHA, gamma: torch.Tensor | None = None,
                  beta: torch.Tensor | None = None) -> SwapFunction:
    """The target function for one site. ``gamma`` / ``beta`` default to the norm's weight / bias (times its
    Gemma-style offset), which is the naive transplant for DyT and Derf and the exact one for SeeDNorm."""
    w = None if weight is None else weight.detach().float() + float(site.gain_offset)
    g = gamma if gamma is not None else (w if w is not None else torch.ones(d))
    b = beta if beta is not None else (bias.detach().float() if bias is not None else None)
    if target == "dyt":
        return DyT(d, alpha, g, b, with_beta=bias is not None)
    if target == "derf":
        return Derf(d, alpha, g, b, with_beta=bias is not None)
    if target == "seednorm":
        return SeeDNorm(d, site.eps, g, b)
    raise ValueError(target)


def _params(site: Any) -> tuple[torch.Tensor | None, torch.Tensor | None, int]:
    w = getattr(site.module, "weight", None)
    b = getattr(site.module, "bias", None)
    w = w if isinstance(w, torch.Tensor) else None
    b = b if isinstance(b, torch.Tensor) else None
    d = int(site.dim or (w.numel() if w is not None else 0))
    return w, b, d


def fit_sites(model: nn.Module, layout: Any, sites: list[Any], target: str, batches: Iterable[Any],
              progress: Any = None) -> dict[str, SiteInit]:
    """Initialise every site's function from one pass over ``batches`` (see the module docstring)."""
    inits: dict[str, SiteInit] = {}
    if target == "seednorm":  # exact at beta = 0: nothing to fit
        for s in sites:
            w, b, d = _params(s)
            inits[s.name] = SiteInit(s.name, make_function(target, s, w, b, d), None)
        return inits
    cap = Capture(model, layout, sites)
    sums: dict[str, GridSums] = {}
    for s in sites:
        _, b, _ = _params(s)
        g = GridSums("tanh" if target == "dyt" else "erf", with_beta=b is not None)
        cap.add(f"{s.name}.hook_in", g.inp)
        cap.add(f"{s.name}.hook_out", g.out)
        sums[s.name] = g
    with cap:
        cap.run(batches, progress=progress)
    for s in sites:
        w, b, d = _params(s)
        alpha, gamma, beta, rel, gi = sums[s.name].solve()
        fn = make_function(target, s, w, b, d, alpha=alpha, gamma=gamma, beta=beta)
        inits[s.name] = SiteInit(s.name, fn, rel, grid_edge=gi in (0, sums[s.name].points - 1))
    return inits


def error_table(model: nn.Module, layout: Any, sites: list[Any], target: str, inits: dict[str, SiteInit],
                batches: Iterable[Any], progress: Any = None) -> pd.DataFrame:
    """Each site's relative error against the norm on held-out ``batches``, fitted and naive (module docstring)."""
    cap = Capture(model, layout, sites)
    sums: dict[str, ErrorSums] = {}
    for s in sites:
        w, b, d = _params(s)
        fns: dict[str, SwapFunction] = {"fitted": inits[s.name].fn}
        if target != "seednorm":
            fns["naive"] = make_function(target, s, w, b, d)
        e = ErrorSums(fns)
        cap.add(f"{s.name}.hook_in", e.inp)
        cap.add(f"{s.name}.hook_out", e.out)
        sums[s.name] = e
    with cap:
        cap.run(batches, progress=progress)
    rows = []
    for s in sites:
        e, ini = sums[s.name], inits[s.name]
        row: dict[str, Any] = {"site": s.name, "layer": s.layer, "role": s.role, **ini.fn.describe(),
                               "rel_error": e.relative("fitted", 1), "rel_error_pos0": e.relative("fitted", 0)}
        if "naive" in e.fns:
            row["rel_error_naive"] = e.relative("naive", 1)
            row["rel_error_naive_pos0"] = e.relative("naive", 0)
        row["fit_error"] = ini.fit_error
        row["alpha_at_grid_edge"] = ini.grid_edge
        row["input_rms"] = e.rms[1] / e.n[1] if e.n[1] else float("nan")
        row["input_rms_pos0"] = e.rms[0] / e.n[0] if e.n[0] else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)

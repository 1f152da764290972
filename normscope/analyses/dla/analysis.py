"""Direct logit attribution with the cached final-norm scale, against the true direct effect; entropy neurons.

For a component c (one attention head, one MLP layer) that writes ``c`` into the residual stream, with the final
residual ``r``, target token ``t``, the final norm's gain ``g`` and divisor ``s(x)`` (RMS, or std after centring
for LayerNorm), and the unembedding row ``W_U[t]``:

* DLA_c = (c / s(r)) . (g * W_U[t])   - the component's share of the logit with the norm's scale frozen at its
  cached value (TransformerLens' ``apply_ln_to_stack`` + ``logit_attrs``; c is centred first for LayerNorm);
* DE_c  = logit_t(r) - logit_t(r - c) - the true direct effect: the logit when the component's output is removed
  from the final residual and the final norm is recomputed on what is left (no other component changes).

Both come from the final residual and the component outputs of ONE forward pass, vectorised over components.
The normalised mean absolute error NMAE = mean|DLA - DE| / mean|DE| x 100 says how far the frozen-scale
reading is from the truth: ~150% for the heads of GPT-2 small's last layers, ~0 for a model whose final norm is
a fixed scale (Heimersheim 2024, "You can remove GPT2's LayerNorm by fine-tuning"; Baroni et al. 2025,
"Transformers Don't Need LayerNorm at Inference Time", code ``submarat/removing-layer-norm``).

Confidence (entropy) neurons (Stolfo et al. 2024, "Confidence Regulation Neurons in Language Models"; Gurnee et
al. 2024, "Universal Neurons in GPT2 Language Models"): last-layer MLP neurons with a large output weight that
writes almost nothing onto the unembedding, ranked by ||W_out|| / var_vocab cos(W_out, W_U); they act on the
output entropy through the final norm's scale. Each of the top ones is mean-ablated and |delta CE| and
|delta entropy| are measured on the text.

Logits here are raw (the unembedding is not centred over the vocabulary), so DLA and DE are in the units of the
target token's logit.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import torch
import torch.nn.functional as F
from torch import nn

from normscope.analyses.base import RunContext
from normscope.analyses.dla.options import REFERENCES, DlaOptions
from normscope.core.capture import BatchContext, Capture
from normscope.core.errors import NormscopeError
from normscope.core.nonfinite import flag_nonfinite, note_nonfinite, watch_residual
from normscope.core.progress import progress_task as _task
from normscope.core.sites import find_layout, find_norm_sites
from normscope.report import Figure, Result, heatmap_layer_head
from normscope.report.result import build_meta

AXES = {"layers": "layer"}  # each per-depth table: its depth column
LABELS = {
    "layers": "per layer", "nmae_heads": "NMAE of the heads (%)", "nmae_mlp": "NMAE of the MLP (%)",
    "nmae_all": "NMAE of all components (%)", "nonfinite_points": "hook points with inf/NaN",
}


# ---- pure metric functions -----------------------------------------------------------------------------
def dla_and_de(comps: torch.Tensor, resid: torch.Tensor, u: torch.Tensor, *, centered: bool,
               eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DLA (cached final-norm scale) and direct effect (final norm recomputed) of every component.

    comps: ``[C, N, d]`` component outputs at N predicted tokens; resid: ``[N, d]`` the final residual (input
    of the final norm); u: ``[N, d]`` gain * W_U[target] of each token's target. ``centered``/``eps``: the
    final norm (LayerNorm centres, RMSNorm not). Returns ``(dla, de)``, each ``[C, N]`` float64. Bias terms
    of the norm and of the unembedding cancel in the direct effect and are not part of any component's DLA.
    """
    c, r, uu = comps.double(), resid.double(), u.double()
    if centered:
        c = c - c.mean(dim=-1, keepdim=True)
        r = r - r.mean(dim=-1, keepdim=True)
    d = r.shape[-1]
    rr = r.pow(2).sum(dim=-1)  # [N]
    s = torch.sqrt(rr / d + eps)  # [N]
    cu = torch.einsum("cnd,nd->cn", c, uu)  # [C, N]
    cr = torch.einsum("cnd,nd->cn", c, r)  # [C, N]
    cc = torch.einsum("cnd,cnd->cn", c, c)  # [C, N]
    ru = (r * uu).sum(dim=-1)  # [N]
    s_without = torch.sqrt(((rr - 2 * cr + cc) / d).clamp_min(0) + eps)  # [C, N]: |r - c|^2 expanded
    dla = cu / s
    de = ru / s - (ru - cu) / s_without
    return dla, de


def nmae(dla: torch.Tensor, de: torch.Tensor) -> float:
    """Normalised mean absolute error mean|DLA - DE| / mean|DE| x 100 (Baroni et al. 2025), any shape."""
    den = float(de.double().abs().mean())
    return 100.0 * float((dla.double() - de.double()).abs().mean()) / den if den > 0 else math.nan


def head_outputs(z: torch.Tensor, w_o: torch.Tensor, n_heads: int) -> torch.Tensor:
    """What each attention head writes into the residual stream: z_h @ W_O[h] (output bias not included).

    z: ``[N, n_heads * d_head]`` the input of the attention output projection; w_o: ``[n_heads * d_head, d]``
    (x @ w_o is the projection). Returns ``[n_heads, N, d]``.
    """
    n, hd = z.shape
    d_head = hd // n_heads
    zh = z.reshape(n, n_heads, d_head)  # [N, H, d_head]
    wh = w_o.reshape(n_heads, d_head, -1)  # [H, d_head, d]
    return torch.einsum("nhe,hed->hnd", zh, wh.to(z.dtype))


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of softmax(logits) over the last dim: ``[..., vocab]`` -> ``[...]``."""
    lp = F.log_softmax(logits.float(), dim=-1)
    return -(lp.exp() * lp).sum(dim=-1)


def entropy_neuron_scores(w_out: torch.Tensor, w_u: torch.Tensor, gain: torch.Tensor | None = None,
                          centered: bool = False, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """||W_out[:, n]|| and the variance over the vocabulary of cos(W_out[:, n], W_U[v]) per neuron.

    w_out: ``[d, n_neurons]`` (column n is what neuron n writes); w_u: ``[vocab, d]`` unembedding rows; gain:
    ``[d]`` final-norm gain, folded into W_U as TransformerLens' fold_ln does; ``centered``: LayerNorm, so only
    the centred parts of both matter. Entropy neurons (Stolfo et al. 2024) have a large norm and a small
    variance: they write into directions the unembedding ignores. Returns ``(norm, var_cos)``, each ``[n]``.
    """
    wo = w_out.float()
    wu = w_u.float() * (gain.float()[None] if gain is not None else 1.0)  # [vocab, d]: float32 (a big matrix)
    if centered:
        wo = wo - wo.mean(dim=0, keepdim=True)
        wu = wu - wu.mean(dim=1, keepdim=True)
    norm = wo.norm(dim=0)  # [n]
    wu_n = wu / wu.norm(dim=1, keepdim=True).clamp_min(1e-30)  # [vocab, d]
    var = torch.empty(wo.shape[1], dtype=torch.float32)
    for s in range(0, wo.shape[1], chunk):
        cols = wo[:, s:s + chunk]  # [d, c]
        cos = wu_n @ (cols / cols.norm(dim=0, keepdim=True).clamp_min(1e-30))  # [vocab, c]
        var[s:s + chunk] = cos.var(dim=0, unbiased=False)
    return norm, var


# ---- model plumbing ------------------------------------------------------------------------------------
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
    w = module.weight.detach()
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
    w = getattr(site.module, "weight", None)
    if not site.has_gain or not isinstance(w, torch.Tensor):
        return None
    return w.detach().float() + site.gain_offset


@dataclass
class _Plan:
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


def plan_model(lm: Any, layout: Any = None, sites: list[Any] | None = None) -> _Plan:
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
    w_u = layout.unembed.weight.detach()
    return _Plan(layout, sites, final, w_u, gain if gain is not None else torch.ones(w_u.shape[1]), o_proj, w_o,
                 mlp_out, n_heads)


class _Stash:
    """Reducer that keeps only the current batch's tensor (overwritten every batch)."""

    def __init__(self) -> None:
        self.x: torch.Tensor | None = None

    def update(self, x: torch.Tensor, ctx: BatchContext) -> None:
        self.x = x


@contextmanager
def _input_hooks(modules: list[nn.Module], store: dict[int, torch.Tensor]) -> Iterator[None]:
    """Forward pre-hooks that store each module's input (``store[i]``) for the current batch."""
    handles = []
    for i, m in enumerate(modules):
        def hook(mod: nn.Module, args: tuple, kwargs: dict, i: int = i) -> None:
            store[i] = (args[0] if args else next(iter(kwargs.values()))).detach()
        handles.append(m.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _targets(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions that predict a next token (``[batch, pos]`` bool, last position excluded) and their targets."""
    sel = torch.zeros_like(mask, dtype=torch.bool)
    sel[:, :-1] = mask[:, :-1].bool() & mask[:, 1:].bool()
    nxt = torch.zeros_like(ids)
    nxt[:, :-1] = ids[:, 1:]
    return sel, nxt[sel]


# ---- accumulation --------------------------------------------------------------------------------------
class AttributionStats:
    """Per component: sums of DLA, DE, |DLA|, |DE|, |DLA - DE|, split into position 0 and other positions;
    plus a uniform sample of (component, DLA, DE) triples for the scatter plot. Memory: components x 10."""

    def __init__(self, n_components: int, scatter_points: int, n_predictions: int, seed: int) -> None:
        self.sums = torch.zeros(5, 2, n_components, dtype=torch.float64)  # [stat, pos0/rest, component]
        self.count = torch.zeros(2, dtype=torch.float64)  # predictions at position 0 / elsewhere
        self.rate = scatter_points / max(n_predictions, 1)  # scatter points per predicted token
        self.gen = torch.Generator().manual_seed(seed)
        self.samples: list[torch.Tensor] = []  # rows [component, dla, de, position]

    def add(self, dla: torch.Tensor, de: torch.Tensor, pos: torch.Tensor) -> None:
        """dla, de: ``[C, N]`` for every component; pos: ``[N]`` positions of the predicting tokens."""
        dla, de, pos = dla.double().cpu(), de.double().cpu(), pos.cpu()
        first = pos == 0
        self.count += torch.tensor([int(first.sum()), int((~first).sum())], dtype=torch.float64)
        for j, m in enumerate((first, ~first)):
            if not m.any():
                continue
            a, e = dla[:, m], de[:, m]
            self.sums[0, j] += a.sum(1)
            self.sums[1, j] += e.sum(1)
            self.sums[2, j] += a.abs().sum(1)
            self.sums[3, j] += e.abs().sum(1)
            self.sums[4, j] += (a - e).abs().sum(1)

    def sample(self, dla: torch.Tensor, de: torch.Tensor, pos: torch.Tensor) -> None:
        """Keep a uniform sample of (component, DLA, DE, position) for the scatter plot."""
        c, t = dla.shape
        n = int(round(self.rate * t))
        if not c or not t or n <= 0:
            return
        flat = torch.randint(0, c * t, (n,), generator=self.gen)
        ci, ti = flat // t, flat % t
        self.samples.append(torch.stack([ci.double(), dla.double().cpu()[ci, ti], de.double().cpu()[ci, ti],
                                         pos.cpu()[ti].double()], dim=1))

    def table(self) -> dict[str, torch.Tensor]:
        """Means over all predicted tokens, and NMAE overall / at position 0 / elsewhere, per component."""
        s, n = self.sums.sum(1), max(float(self.count.sum()), 1.0)
        out = {"mean_dla": s[0] / n, "mean_de": s[1] / n, "mean_abs_dla": s[2] / n, "mean_abs_de": s[3] / n,
               "mean_abs_err": s[4] / n, "nmae": 100 * s[4] / s[3].clamp_min(1e-300)}
        for j, key in enumerate(("pos0", "rest")):
            out[f"nmae_{key}"] = 100 * self.sums[4, j] / self.sums[3, j].clamp_min(1e-300)
            if self.count[j] == 0:
                out[f"nmae_{key}"] = torch.full_like(out["nmae"], math.nan)
        return out


# ---- the analysis -------------------------------------------------------------------------------------
def run(ctx: RunContext, opts: DlaOptions) -> Result:
    """DLA against the direct effect for every head and MLP layer, and the entropy neurons of the last MLP.

    ``ctx`` carries the loaded model, its layout and norm sites (probed once) and the text sample; ``ctx.progress``
    is the CLI's progress bar or None (silent).
    """
    lm, sample, progress = ctx.lm, ctx.sample, ctx.progress
    plan = plan_model(lm, ctx.layout, ctx.sites)
    n_layers, n_heads = plan.layout.n_layers, plan.n_heads
    timings: dict[str, float] = {}
    notes: list[str] = []

    neuron_rows: list[dict[str, Any]] = []
    top: list[int] = []
    if opts.neurons and plan.mlp_out is not None:
        t0 = time.perf_counter()
        w_out = projection_matrix(plan.mlp_out).T.float().cpu()  # [d, n_neurons]
        norm, var = entropy_neuron_scores(w_out, plan.w_u.float().cpu(), plan.gain.cpu(), plan.final.centered)
        score = norm / var.clamp_min(1e-30)
        top = torch.argsort(score, descending=True)[: opts.neurons].tolist()
        neuron_rows = [{"rank": i + 1, "neuron": n, "label": f"L{n_layers - 1}N{n}", "w_out_norm": float(norm[n]),
                        "var_cos_vocab": float(var[n]), "score": float(score[n])} for i, n in enumerate(top)]
        timings["entropy-neuron ranking"] = time.perf_counter() - t0
    elif opts.neurons:
        notes.append("The last MLP has no separable output projection, so entropy neurons were not measured.")

    n_pred = sum(int(_targets(b.input_ids, b.attention_mask)[0].sum()) for b in sample.iter_batches())
    stats = AttributionStats(n_layers * (n_heads + 1), opts.scatter_points, n_pred, sample.seed)
    totals = _Totals(len(top))
    bridge = None
    if opts.backend in ("auto", "bridge"):
        t0 = time.perf_counter()
        try:
            bridge = boot_bridge(lm)
        except Exception as exc:  # an architecture the bridge does not support, or TransformerLens missing
            if opts.backend == "bridge":
                raise NormscopeError(f"TransformerLens' TransformerBridge cannot wrap {lm.info.name} "
                                     f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); rerun with "
                                     "--backend direct.") from exc
            notes.append(f"TransformerLens' TransformerBridge does not support this model ({type(exc).__name__}); "
                         "the numbers come from normscope's own hooks.")
        timings["booting the TransformerLens bridge"] = time.perf_counter() - t0
    cross: dict[str, float] = {}
    passes = 1 + (1 if top else 0)
    nonfinite: dict[str, dict[str, Any]] = {}  # inf/NaN in the bridge's cache, by TransformerLens hook name
    with _task(progress, "dla", sample.n_tokens * passes) as advance:
        t0 = time.perf_counter()
        accepted = False
        if bridge is not None:
            cross, accepted = _run_bridge(bridge, lm, plan, sample, stats, totals, top, opts, advance, nonfinite)
            del bridge
            if accepted:
                timings["attributions (TransformerLens bridge)"] = time.perf_counter() - t0
                if cross and not cross["agrees"]:
                    notes.append(f"Warning: TransformerLens' bridge disagrees with the model (largest logit difference "
                                 f"{cross['max_abs_logit_diff']:.3g}); --backend direct gives the model's numbers.")
                if top and not totals.act_n:  # the bridge exposed no MLP hidden activations: one more pass
                    _run_direct(lm, plan, sample, None, totals, top, None)
            else:
                notes.append(
                    f"TransformerLens' bridge disagreed with the model on the first batch (largest logit difference "
                    f"{cross['max_abs_logit_diff']:.3g}, largest DLA difference {cross['max_abs_dla_diff']:.3g}; "
                    "it reads norm eps values from the config, not from the modules), so the numbers come from "
                    "normscope's own hooks.")
        if not accepted:
            t0 = time.perf_counter()
            nonfinite = {r["point"]: r for r in _run_direct(lm, plan, sample, stats, totals, top, advance)}
            timings["attributions (normscope hooks)"] = time.perf_counter() - t0
        if top:
            t0 = time.perf_counter()
            means = totals.act_sum / max(totals.act_n, 1)
            abl = _ablate_neurons(lm, plan, sample, top, means.float(), advance)
            for row, m, res in zip(neuron_rows, means.tolist(), abl, strict=True):
                row["mean_activation"] = m
                row.update(res)
            timings["entropy-neuron ablations"] = time.perf_counter() - t0
    backend = "bridge" if "attributions (TransformerLens bridge)" in timings else "direct"
    result = _build_result(lm, sample, opts, plan, stats, backend, cross, neuron_rows, totals, notes, timings)
    flag_nonfinite(result, list(nonfinite.values()))
    return result



class _Totals:
    """Running CE and entropy of the model's predictions, and the sum of the chosen neurons' activations."""

    def __init__(self, n_neurons: int) -> None:
        self.ce = 0.0
        self.ent = 0.0
        self.n = 0
        self.act_sum = torch.zeros(n_neurons, dtype=torch.float64)
        self.act_n = 0

    def add_logits(self, logits: torch.Tensor, tgt: torch.Tensor) -> None:
        """logits: ``[N, vocab]`` at the predicted positions; tgt: ``[N]``."""
        logits = logits.float()
        self.ce += float(F.cross_entropy(logits, tgt, reduction="sum"))
        self.ent += float(entropy(logits).double().sum())
        self.n += int(tgt.numel())

    def add_acts(self, acts: torch.Tensor, mask: torch.Tensor) -> None:
        """acts: ``[batch, pos, n_neurons]`` (already restricted to the chosen neurons); mask ``[batch, pos]``."""
        a = acts[mask.bool()]
        self.act_sum += a.double().sum(dim=0).cpu()
        self.act_n += int(a.shape[0])


class _DirectHooks:
    """normscope's own hooks for the independent computation: the input of every attention output projection
    (z), every MLP output, the final residual, and the hidden activations of the last MLP."""

    def __init__(self, lm: Any, plan: _Plan, with_acts: bool) -> None:
        self.plan = plan
        self.cap = Capture(lm.model, plan.layout, plan.sites)
        blocks = plan.layout.blocks
        self.mlp = [self.cap.add(f"blocks.{b.index}.mlp.hook_out", _Stash()) if b.mlp is not None else None
                    for b in blocks]
        self.diff = {b.index: [self.cap.add(f"blocks.{b.index}.{p}", _Stash())
                               for p in ("hook_resid_post", "hook_resid_pre", "attn.hook_out")]
                     for b in blocks if b.mlp is None}
        self.resid = self.cap.add(f"{plan.final.name}.hook_in", _Stash())
        watch_residual(self.cap, plan.layout)
        self.modules = [*plan.o_proj] + ([plan.mlp_out] if with_acts and plan.mlp_out is not None else [])
        self.store: dict[int, torch.Tensor] = {}

    @contextmanager
    def active(self) -> Iterator[_DirectHooks]:
        with self.cap, _input_hooks(self.modules, self.store):
            yield self

    def mlp_out(self, i: int) -> torch.Tensor:
        """``[batch, pos, d]`` what block i's MLP added to the residual (for inline MLPs: post - pre - attn)."""
        if self.mlp[i] is not None:
            return self.mlp[i].x
        post, pre, attn = (s.x for s in self.diff[i])
        return post - pre - attn

    def attributions(self, sel: torch.Tensor, tgt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """DLA and DE ``[C, N]`` of the last batch, components layer by layer (heads, then the MLP)."""
        plan = self.plan
        r = self.resid.x[sel]  # [N, d]
        u = plan.gain.to(r.device)[None] * plan.w_u[tgt].to(r.device).float()  # [N, d]
        dlas, des = [], []
        for i in range(plan.layout.n_layers):
            heads = head_outputs(self.store[i][sel].float(), plan.w_o[i].float().to(r.device), plan.n_heads)
            comps = torch.cat([heads, self.mlp_out(i)[sel].float()[None]], dim=0)  # [H + 1, N, d]
            a, e = dla_and_de(comps, r, u, centered=plan.final.centered, eps=plan.final.eps)
            dlas.append(a)
            des.append(e)
        return torch.cat(dlas).cpu(), torch.cat(des).cpu()


def _positions(sel: torch.Tensor) -> torch.Tensor:
    return torch.arange(sel.shape[1], device=sel.device).expand_as(sel)[sel]


def _run_direct(lm: Any, plan: _Plan, sample: Any, stats: AttributionStats | None, totals: _Totals,
                top: list[int], advance: Any) -> list[dict[str, Any]]:
    """One pass over the sample with normscope's hooks: attributions (when ``stats``), CE, neuron activations.

    Returns the pass's inf/NaN report (:meth:`Capture.nonfinite_report`)."""
    hooks = _DirectHooks(lm, plan, with_acts=bool(top))

    def on_out(out: Any, ctx: BatchContext) -> None:
        sel, tgt = _targets(ctx.input_ids, ctx.attention_mask)
        if top:
            totals.add_acts(hooks.store[len(plan.o_proj)][..., top], ctx.attention_mask)
        if stats is None:
            return
        totals.add_logits(out.logits[sel], tgt)
        dla, de = hooks.attributions(sel, tgt)
        pos = _positions(sel)
        stats.add(dla, de, pos)
        stats.sample(dla, de, pos)

    with hooks.active():
        hooks.cap.run(sample.iter_batches(), on_output=on_out, progress=advance)
    return hooks.cap.nonfinite_report()


def boot_bridge(lm: Any) -> Any:
    """A TransformerLens ``TransformerBridge`` around a deep copy of the model (the bridge rewrites the model it
    wraps), with only the final norm's gain folded into W_U: ``fold_ln`` without centring the writing weights
    or the unembedding, so that the residual stream, the cached scales and the raw logits stay as they are."""
    import transformer_lens.model_bridge.sources.transformers  # noqa: F401  (registers boot_transformers)
    from transformer_lens.model_bridge import TransformerBridge

    own = copy.deepcopy(lm.model)
    # The bridge reloads a tokenizer from its name_or_path unless it already adds BOS; token ids go in directly
    # here, so a copy marked that way keeps it off the disk and the hub (and works for in-memory tokenizers).
    tok = copy.deepcopy(lm.tokenizer)
    tok.init_kwargs = {**tok.init_kwargs, "add_bos_token": True,
                       "name_or_path": tok.init_kwargs.get("name_or_path", "")}
    name = getattr(lm.model.config, "_name_or_path", "") or lm.info.name
    param = next(lm.model.parameters())
    bridge = TransformerBridge.boot_transformers(name, hf_model=own, tokenizer=tok, device=str(param.device),
                                                 dtype=param.dtype)
    bridge.enable_compatibility_mode(disable_warnings=True, fold_ln=True, center_writing_weights=False,
                                     center_unembed=False, fold_value_biases=False)
    bridge.eval()
    return bridge


def bridge_attributions(bridge: Any, ids: torch.Tensor, mask: torch.Tensor, plan: _Plan,
                        act_hook: str | None = None, nonfinite: dict[str, dict[str, Any]] | None = None,
                        batch: int = 0) -> dict[str, Any]:
    """DLA of every head and MLP layer as a TransformerLens user computes it, and the DE from the same cache.

    Uses the ActivationCache helpers: ``stack_head_results`` (per-head outputs from hook_z and W_O),
    ``decompose_resid(mode="mlp")`` (MLP outputs), ``logit_attrs`` (``apply_ln_to_stack`` with the cached
    ``ln_final.hook_scale``, dotted with the gain-folded W_U). Returns ``dla``/``de`` ``[C, N]`` (components
    layer by layer: heads, then the MLP), ``sel``/``tgt`` (predicted positions and their targets), ``logits``
    ``[N, vocab]`` and, when ``act_hook`` names a cached hook, ``acts`` ``[batch, pos, n_neurons]``. When
    ``nonfinite`` is given, the inf/NaN values of every cached activation are counted into it (see
    :func:`note_nonfinite`; ``batch`` is the batch number recorded for a point's first one).
    """
    n_layers, n_heads = plan.layout.n_layers, plan.n_heads
    wanted = ("attn.hook_z", "hook_mlp_out", "ln_final.hook_scale", "ln_final.hook_in", "hook_embed")

    def names_filter(name: str) -> bool:
        return name.endswith(wanted) or name == act_hook

    with torch.no_grad():
        logits, cache = bridge.run_with_cache(ids, names_filter=names_filter)
        heads = cache.stack_head_results(layer=-1)  # [L*H, batch, pos, d]
        mlps = cache.decompose_resid(mode="mlp", incl_embeds=False)  # [L, batch, pos, d]
        b, t = ids.shape
        stack = torch.cat([heads.reshape(n_layers, n_heads, b, t, -1), mlps[:, None]], dim=1)  # [L, H+1, b, t, d]
        stack = stack.reshape(n_layers * (n_heads + 1), b, t, -1)
        del heads, mlps
        nxt = ids[:, 1:]
        # float64, one layer at a time: the same component values then give DLA and DE to float64 precision
        dla_grid = torch.cat([cache.logit_attrs(stack[s:s + n_heads + 1, :, :-1].double(), tokens=nxt,
                                                pos_slice=slice(0, -1))
                              for s in range(0, stack.shape[0], n_heads + 1)])  # [C, b, t-1]
        sel, tgt = _targets(ids, mask)
        r = cache["ln_final.hook_in"][sel]  # [N, d]
        u = plan.gain.to(r.device)[None] * plan.w_u[tgt].to(r.device).float()
        de = torch.empty(stack.shape[0], r.shape[0], dtype=torch.float64)
        for s in range(0, stack.shape[0], n_heads + 1):
            _, de[s:s + n_heads + 1] = dla_and_de(stack[s:s + n_heads + 1][:, sel], r, u,
                                                  centered=plan.final.centered, eps=plan.final.eps)
        out: dict[str, Any] = {"dla": dla_grid[:, sel[:, :-1]].double().cpu(), "de": de, "sel": sel, "tgt": tgt,
                               "logits": logits[sel]}
        if nonfinite is not None:
            for name, x in cache.cache_dict.items():
                note_nonfinite(nonfinite, name, x, batch)
        if act_hook is not None and act_hook in cache.cache_dict:
            out["acts"] = cache[act_hook]
    return out


def _run_bridge(bridge: Any, lm: Any, plan: _Plan, sample: Any, stats: AttributionStats, totals: _Totals,
                top: list[int], opts: DlaOptions, advance: Any,
                nonfinite: dict[str, dict[str, Any]] | None = None) -> tuple[dict[str, float], bool]:
    """Attributions with the bridge over the sample, in micro-batches of ``opts.micro_batch_tokens``.

    The first micro-batch also runs through normscope's own hooks: when the bridge's logits or DLA disagree
    with the model's (relative difference above ``BRIDGE_TOLERANCE``, e.g. a norm whose eps differs from the
    config's, which the bridge reads), backend ``auto`` stops and returns ``(crosscheck, False)`` so that the
    caller falls back to the direct computation. Returns ``(crosscheck, accepted)``. Every cached activation is
    checked for inf/NaN into ``nonfinite`` (by TransformerLens hook name, as :func:`note_nonfinite` records them).
    """
    dev = next(lm.model.parameters()).device
    act_hook = f"blocks.{plan.layout.n_layers - 1}.mlp.out.hook_in" if top else None
    cross: dict[str, float] = {}
    for bi, b in enumerate(sample.iter_batches()):
        step = max(1, opts.micro_batch_tokens // b.input_ids.shape[1])
        for s in range(0, b.input_ids.shape[0], step):
            ids = b.input_ids[s:s + step].to(dev)
            mask = b.attention_mask[s:s + step].to(dev)
            res = bridge_attributions(bridge, ids, mask, plan, act_hook, nonfinite, bi)
            if bi == 0 and s == 0:
                cross = crosscheck_direct(lm, plan, ids, mask, res)
                if not cross["agrees"] and opts.backend == "auto":
                    return cross, False
            pos = _positions(res["sel"])
            stats.add(res["dla"], res["de"], pos)
            stats.sample(res["dla"], res["de"], pos)
            totals.add_logits(res["logits"], res["tgt"])
            if top and "acts" in res:
                totals.add_acts(res["acts"][..., top], mask)
        if advance:
            advance(int(b.input_ids.numel()))
    return cross, True


def direct_attributions(lm: Any, plan: _Plan, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The independent computation on one batch: ``dla``/``de`` ``[C, N]`` in the bridge's component order, and
    the model's own ``logits`` ``[N, vocab]`` at the predicted positions."""
    hooks = _DirectHooks(lm, plan, with_acts=False)
    with torch.no_grad(), hooks.active(), hooks.cap.batch(_Batch(ids, mask)):
        out = lm.model(input_ids=ids, attention_mask=mask, use_cache=False)
    sel, tgt = _targets(ids, mask)
    dla, de = hooks.attributions(sel, tgt)
    return {"dla": dla, "de": de, "sel": sel, "tgt": tgt, "logits": out.logits[sel]}


@dataclass
class _Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    categories: tuple[str, ...] = ()


BRIDGE_TOLERANCE = 1e-3  # largest relative difference between the bridge and the model that is accepted


def crosscheck_direct(lm: Any, plan: _Plan, ids: torch.Tensor, mask: torch.Tensor,
                      bridge_res: dict[str, Any]) -> dict[str, Any]:
    """Largest differences between the bridge's logits and DLA and the model's own on one batch.

    ``agrees`` is False when either differs by more than ``BRIDGE_TOLERANCE`` of its largest magnitude.
    """
    d = direct_attributions(lm, plan, ids, mask)
    max_dla = float(d["dla"].abs().max()) or 1.0
    max_logit = float(d["logits"].abs().max()) or 1.0
    out: dict[str, Any] = {
        "max_abs_dla_diff": float((d["dla"] - bridge_res["dla"]).abs().max()),
        "max_abs_de_diff": float((d["de"] - bridge_res["de"]).abs().max()),
        "max_abs_dla": max_dla,
        "max_abs_logit_diff": float((d["logits"].float() - bridge_res["logits"].float()).abs().max()),
        "max_abs_logit": max_logit,
        "tokens": int(bridge_res["sel"].sum()),
    }
    out["agrees"] = (out["max_abs_dla_diff"] <= BRIDGE_TOLERANCE * max_dla
                     and out["max_abs_logit_diff"] <= BRIDGE_TOLERANCE * max_logit)
    return out


def _ablate_neurons(lm: Any, plan: _Plan, sample: Any, neurons: list[int], means: torch.Tensor,
                    advance: Any) -> list[dict[str, float]]:
    """Mean-ablate each neuron of the last MLP in turn; |delta CE| and |delta entropy| per predicted token.

    Replacing neuron n's activation a by its mean m changes only the final residual, by (m - a) W_out[:, n], so
    the ablated logits are unembed(final_norm(r + (m - a) W_out[:, n])): exact, and one forward pass in total.
    """
    assert plan.mlp_out is not None
    w_out = projection_matrix(plan.mlp_out).float()  # [n_neurons, d]
    cap = Capture(lm.model, plan.layout, plan.sites)
    resid = cap.add(f"{plan.final.name}.hook_in", _Stash())
    store: dict[int, torch.Tensor] = {}
    d_ce: list[list[torch.Tensor]] = [[] for _ in neurons]
    d_h: list[list[torch.Tensor]] = [[] for _ in neurons]
    d_ce_signed = torch.zeros(len(neurons), dtype=torch.float64)
    norm, unembed = plan.final.module, plan.layout.unembed
    with cap, _input_hooks([plan.mlp_out], store):
        def on_out(out: Any, ctx: BatchContext) -> None:
            sel, tgt = _targets(ctx.input_ids, ctx.attention_mask)
            r = resid.x[sel]  # [N, d]
            acts = store[0][sel][:, neurons].float()  # [N, n_top]
            with torch.no_grad():
                base = unembed(norm(r)).float()  # [N, vocab]
                ce0 = F.cross_entropy(base, tgt, reduction="none")
                h0 = entropy(base)
                for j, n in enumerate(neurons):
                    delta = (means[j].to(r.device) - acts[:, j])[:, None] * w_out[n].to(r.device)[None]
                    logits = unembed(norm(r + delta.to(r.dtype))).float()
                    dce = F.cross_entropy(logits, tgt, reduction="none") - ce0
                    d_ce[j].append(dce.abs().cpu())
                    d_ce_signed[j] += float(dce.double().sum())
                    d_h[j].append((entropy(logits) - h0).abs().cpu())

        cap.run(sample.iter_batches(), on_output=on_out, progress=advance)
    out = []
    for j in range(len(neurons)):
        ce_abs, h_abs = torch.cat(d_ce[j]), torch.cat(d_h[j])
        out.append({"mean_abs_delta_ce": float(ce_abs.double().mean()),
                    "mean_delta_ce": float(d_ce_signed[j]) / max(ce_abs.numel(), 1),
                    "mean_abs_delta_entropy": float(h_abs.double().mean()),
                    "median_abs_delta_entropy": float(h_abs.median())})
    return out


# ---- result --------------------------------------------------------------------------------------------
def _component_frame(stats: AttributionStats, n_layers: int, n_heads: int) -> pd.DataFrame:
    t = stats.table()
    rows = []
    for i in range(n_layers):
        for h in range(n_heads + 1):
            c = i * (n_heads + 1) + h
            is_mlp = h == n_heads
            row = {"component": f"L{i}MLP" if is_mlp else f"L{i}H{h}", "layer": i, "head": None if is_mlp else h,
                   "type": "mlp" if is_mlp else "head"}
            row.update({k: float(v[c]) for k, v in t.items()})
            rows.append(row)
    return pd.DataFrame(rows)


def _layer_frame(stats: AttributionStats, n_layers: int, n_heads: int) -> pd.DataFrame:
    s = stats.sums.sum(1)  # [stat, component]
    rows = []
    for i in range(n_layers):
        base = i * (n_heads + 1)
        heads, mlp = slice(base, base + n_heads), base + n_heads
        err_h, de_h = float(s[4, heads].sum()), float(s[3, heads].sum())
        err_m, de_m = float(s[4, mlp]), float(s[3, mlp])
        rows.append({"layer": i, "nmae_heads": 100 * err_h / de_h if de_h else math.nan,
                     "nmae_mlp": 100 * err_m / de_m if de_m else math.nan,
                     "nmae_all": 100 * (err_h + err_m) / (de_h + de_m) if de_h + de_m else math.nan})
    return pd.DataFrame(rows)


def _overall(stats: AttributionStats, sl: slice | list[int] | None = None) -> float:
    s = stats.sums.sum(1)
    idx = slice(None) if sl is None else sl
    den = float(s[3, idx].sum())
    return 100 * float(s[4, idx].sum()) / den if den else math.nan


def _build_result(lm: Any, sample: Any, opts: DlaOptions, plan: _Plan, main: AttributionStats, backend: str,
                  cross: dict[str, float], neuron_rows: list[dict[str, Any]], totals: _Totals, notes: list[str],
                  timings: dict[str, float]) -> Result:
    info = lm.info
    n_layers, n_heads = plan.layout.n_layers, plan.n_heads
    comps = _component_frame(main, n_layers, n_heads)
    layers = _layer_frame(main, n_layers, n_heads)
    head_idx = [i * (n_heads + 1) + h for i in range(n_layers) for h in range(n_heads)]
    mlp_idx = [i * (n_heads + 1) + n_heads for i in range(n_layers)]
    overall = {"all": _overall(main), "heads": _overall(main, head_idx), "mlp": _overall(main, mlp_idx)}
    first, rest = main.sums[:, 0].sum(1), main.sums[:, 1].sum(1)
    overall["position_0"] = 100 * float(first[4] / first[3]) if float(first[3]) else math.nan
    overall["other_positions"] = 100 * float(rest[4] / rest[3]) if float(rest[3]) else math.nan
    worst = comps.sort_values("mean_abs_err", ascending=False).head(opts.top_components).reset_index(drop=True)
    neurons = pd.DataFrame(neuron_rows)
    mean_ce = totals.ce / max(totals.n, 1)
    mean_ent = totals.ent / max(totals.n, 1)

    headlines: dict[str, Any] = {
        "NMAE, all components (%)": round(overall["all"], 3),
        "NMAE, heads (%)": round(overall["heads"], 3),
        "NMAE, MLPs (%)": round(overall["mlp"], 3),
        "most misleading component": worst.iloc[0]["component"] if len(worst) else None,
        "backend": "TL bridge" if backend == "bridge" else "own hooks",
        "CE (nats/token)": round(mean_ce, 4),
    }
    if cross:
        headlines["bridge vs own max |dDLA|"] = float(f"{cross['max_abs_dla_diff']:.3g}")
    if len(neurons) and "median_abs_delta_entropy" in neurons:
        top = neurons.sort_values("mean_abs_delta_entropy", ascending=False).iloc[0]
        headlines["top entropy neuron"] = top["label"]
        headlines["its median |d entropy|"] = round(float(top["median_abs_delta_entropy"]), 4)

    scatter = torch.cat(main.samples) if main.samples else torch.zeros(0, 4, dtype=torch.float64)
    labels = comps["component"].tolist()
    payload: dict[str, Any] = {
        "model": info.spec,
        "backend": backend,
        "n_predictions": int(main.count.sum()),
        "nmae": overall,
        "crosscheck": cross or None,
        "ce": mean_ce,
        "entropy": mean_ent,
        "layers": layers.to_dict("records"),
        "components": comps.to_dict("records"),
        "entropy_neurons": neuron_rows,
        "notes": notes,
        "final_norm": plan.final.to_dict(),
    }
    summary = _summary(overall, layers, worst, neurons, backend, cross, notes, main, mean_ce)
    figures = _figures(comps, layers, scatter, labels, n_layers, n_heads, neurons)
    tables = {"layers": layers, "components": comps, "most_misleading": worst}
    if len(neurons):
        tables["entropy_neurons"] = neurons
    return Result(
        analysis="dla",
        title="Direct logit attribution against the direct effect",
        meta=build_meta(lm, sample, **dict(opts.__dict__)),
        payload=payload,
        tables=tables,
        axes=AXES,
        labels=LABELS,
        figures=figures,
        headlines=headlines,
        summary=summary,
        references=REFERENCES,
        timings=timings,
    )


def _summary(overall: dict[str, float], layers: pd.DataFrame, worst: pd.DataFrame, neurons: pd.DataFrame,
             backend: str, cross: dict[str, float], notes: list[str], stats: AttributionStats,
             mean_ce: float) -> list[str]:
    out = []
    n = int(stats.count.sum())
    last = layers.iloc[-max(1, len(layers) // 6):]
    out.append(
        f"Over {n} next-token predictions, direct logit attribution with the cached final-norm scale is off from the "
        f"true direct effect by NMAE = {overall['all']:.1f}% (heads {overall['heads']:.1f}%, MLP layers "
        f"{overall['mlp']:.1f}%); in the last layers the heads reach {last['nmae_heads'].mean():.1f}%. Baroni et "
        "al. (2025) report about 150% for the heads of GPT-2 small's layers 10-11 and about 0 for its LN-free "
        "version, whose final norm is a fixed scale: a value near 0 means the model is LN-free in effect."
    )
    if len(worst):
        w = worst.iloc[0]
        out.append(
            f"The frozen scale misleads most for {w['component']}: mean |DLA - DE| = {w['mean_abs_err']:.3f} logits "
            f"against a mean |DE| of {w['mean_abs_de']:.3f} (NMAE {w['nmae']:.0f}%). At position 0, where models "
            f"with attention sinks park a massive activation, NMAE is {overall['position_0']:.1f}% against "
            f"{overall['other_positions']:.1f}% elsewhere."
        )
    if backend == "bridge":
        rel = cross.get("max_abs_dla_diff", math.nan) / max(cross.get("max_abs_dla", 1.0), 1e-30)
        out.append(
            f"DLA comes from TransformerLens' TransformerBridge (stack_head_results, decompose_resid, logit_attrs "
            f"with the final norm's gain folded into W_U). normscope's independent computation from its own hooks "
            f"agrees to {cross.get('max_abs_dla_diff', math.nan):.2e} logits at most on the first batch "
            f"of {cross.get('tokens', 0)} predictions ({rel:.1e} of the largest |DLA|)."
        )
    else:
        out.append("DLA and DE come from normscope's own hooks (per-head outputs from the input of the attention "
                   "output projection times each head's slice of W_O).")
    out.extend(notes)
    if len(neurons) and "mean_abs_delta_entropy" in neurons:
        top = neurons.sort_values("mean_abs_delta_entropy", ascending=False).iloc[0]
        out.append(
            f"Entropy-neuron candidates of the last MLP (largest ||W_out|| / var cos(W_out, W_U)): mean-ablating "
            f"{top['label']} changes the output entropy by {top['mean_abs_delta_entropy']:.4f} nats on average "
            f"(median {top['median_abs_delta_entropy']:.4f}) and the loss by {top['mean_abs_delta_ce']:.4f} "
            f"(baseline CE {mean_ce:.3f}). Baroni et al. see a median |delta entropy| of about 0.05 for GPT-2 small's "
            "neuron 584, and about 0 once the final norm is a fixed scale."
        )
    return out


def _figures(comps: pd.DataFrame, layers: pd.DataFrame, scatter: torch.Tensor, labels: list[str], n_layers: int,
             n_heads: int, neurons: pd.DataFrame) -> list[Figure]:
    figs: list[Figure] = []
    heads = comps[comps["type"] == "head"]
    grid = torch.tensor(heads["mean_dla"].to_numpy()).reshape(n_layers, n_heads)
    figs.append(Figure("Mean direct logit attribution per head",
                       heatmap_layer_head(grid.numpy(), "mean DLA to the next token (logits)", "mean DLA",
                                          diverging=True),
                       "Blue heads push the logit of the actual next token up on average, red ones push it down."))
    grid = torch.tensor(heads["nmae"].to_numpy()).reshape(n_layers, n_heads)
    figs.append(Figure("NMAE of DLA against the direct effect per head",
                       heatmap_layer_head(grid.numpy(), "NMAE per head (%)", "NMAE (%)"),
                       "Bright heads are those whose attribution the frozen final-norm scale gets most wrong."))
    if scatter.numel():
        fig = go.Figure()
        comp = scatter[:, 0].long()
        is_mlp = (comp % (n_heads + 1)) == n_heads
        for name, m, color in (("heads", ~is_mlp, "#1f77b4"), ("MLP layers", is_mlp, "#d62728")):
            if not m.any():
                continue
            fig.add_trace(go.Scattergl(x=scatter[m, 2].tolist(), y=scatter[m, 1].tolist(), mode="markers",
                                       name=name, marker={"size": 4, "opacity": 0.5, "color": color},
                                       text=[labels[int(c)] for c in comp[m]],
                                       hovertemplate="%{text}<br>DE %{x:.3f}<br>DLA %{y:.3f}<extra></extra>"))
        lo = float(scatter[:, 1:3].min())
        hi = float(scatter[:, 1:3].max())
        fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="DLA = DE",
                                 line={"color": "#888", "dash": "dash"}))
        fig.update_layout(template="plotly_white", height=560, xaxis_title="direct effect DE (logits)",
                          yaxis_title="DLA with the cached scale (logits)", title="DLA against the direct effect")
        figs.append(Figure("DLA against the direct effect", fig,
                           "Points off the diagonal are attributions that the frozen final-norm scale misstates; a "
                           "LN-free model puts them all on it."))
    fig = go.Figure()
    for col, name in (("nmae_heads", "heads"), ("nmae_mlp", "MLP layer"), ("nmae_all", "all components")):
        fig.add_trace(go.Scatter(x=layers["layer"], y=layers[col], mode="lines+markers", name=name))
    fig.update_layout(template="plotly_white", height=440, xaxis_title="layer", yaxis_title="NMAE (%)",
                      title="NMAE per layer")
    figs.append(Figure("NMAE per layer", fig,
                       "Look for the rise in the last layers, whose outputs move the final norm's scale most."))
    if len(neurons) and "mean_abs_delta_entropy" in neurons:
        fig = go.Figure()
        fig.add_trace(go.Bar(x=neurons["label"], y=neurons["mean_abs_delta_entropy"], name="|d entropy|"))
        fig.add_trace(go.Bar(x=neurons["label"], y=neurons["mean_abs_delta_ce"], name="|d CE|"))
        fig.update_layout(barmode="group", template="plotly_white", height=400, xaxis_title="neuron (by rank)",
                          yaxis_title="mean absolute change (nats)", title="Mean-ablating entropy-neuron candidates")
        figs.append(Figure("Entropy neurons: effect of mean ablation", fig,
                           "An entropy neuron changes the entropy of the prediction much more than the loss."))
    return figs

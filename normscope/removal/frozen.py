"""Frozen-divisor norm sites: the replacement that lets a model be fine-tuned until its norms are gone.

Heimersheim 2024 ("You can remove GPT2's LayerNorm by fine-tuning") and Baroni et al. 2025 ("Transformers
Don't Need LayerNorm at Inference Time", code ``submarat/removing-layer-norm``): each norm keeps its
centring (LayerNorm only), its gain and its bias; only the per-token divisor (std or RMS) becomes one frozen
scalar per site. While a site is still live, the scalar is tracked as an exponential moving average of the
per-token divisor (mean over the batch and the positions); it is frozen at the step the site is removed.

:class:`FrozenNorm` wraps one norm module in place. It registers the original module's ``weight`` and
``bias`` Parameter objects under the same names, so ``model.state_dict()`` keeps the keys of the original
architecture, and the wrapper owns them: the original module is not part of the model any more, and the live
path runs the original's forward on the wrapper's current parameters (``torch.func.functional_call``), so a
live site is bit-identical to the original and reads the weights FSDP gathers onto the wrapper, not a stale
copy. With gradient checkpointing a block's forward runs twice; inside :meth:`Removal.recomputing` the rerun
keeps no statistics and no auxiliary term. The divisor state (EMA, frozen values, modes) is plain Python
floats and flags that :meth:`FrozenNorm.state` / :meth:`FrozenNorm.load_state` serialise exactly.

Two extensions of the paper's replacement:

* **Separate first-token divisor.** Position 0 of a window often carries a massive activation (SmolLM2: about
  25,000 in hidden dim 507, an RMS about 170x that of other tokens), so one divisor averaged over all
  positions is wrong for both kinds of token. With ``first_token=True`` the EMA of ordinary positions
  (1, 2, ...) and that of position 0 are tracked apart, and a frozen site divides position 0 by its own
  value ``d0 ** (1 - a) * d ** a``; the schedule raises the blend ``a`` from 0 to 1 before the end, so the
  exported model (which cannot know positions) divides every token by ``d``. The paper's code keeps a
  separate BOS std in the same way until its ``start_bos`` step.
* **Split attention input.** The paper removes the pre-attention norm in two steps, first on the path to the
  queries and keys, then on the path to the values, so the attention reads two differently normalised inputs
  in between. :func:`attach_value_path` wires that without changing the attention code: the norm's output goes
  to Q and K as before; a forward pre-hook on ``v_proj`` (Llama family) or a forward hook on the fused
  ``c_attn`` (GPT-2, whose value columns are recomputed from the second input) feeds V.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from normscope.core.errors import NormscopeError


def divisor_stats(div: torch.Tensor, first_token: bool) -> torch.Tensor:
    """Sums and counts of a per-token divisor for the EMA: ``[sum_rest, n_rest, sum_first, n_first]`` float64.

    div: ``[batch, pos, ..., 1]`` per-token divisors (extra dims for per-head qk-norms). With ``first_token``
    position 0 is summed apart from the others; without it every position goes to the first pair. The result
    stays on ``div``'s device, so accumulating it costs no host synchronisation.
    """
    d = div.detach().double()
    zero = d.new_zeros(())
    if not first_token or d.dim() < 2 or d.shape[1] < 2:
        return torch.stack([d.sum(), zero + d.numel(), zero, zero])
    first, rest = d[:, :1], d[:, 1:]
    return torch.stack([rest.sum(), zero + rest.numel(), first.sum(), zero + first.numel()])


def ema_update(ema: float | None, value: float, momentum: float) -> float:
    """One step of an exponential moving average; the first value initialises it."""
    if ema is None or not math.isfinite(ema):
        return value
    return momentum * ema + (1.0 - momentum) * value


def blended_first_divisor(d_first: float, d_rest: float, blend: float) -> float:
    """Geometric interpolation from the first-token divisor (blend 0) to the shared one (blend 1)."""
    blend = min(max(blend, 0.0), 1.0)
    return math.exp((1.0 - blend) * math.log(d_first) + blend * math.log(d_rest))


def clamp_ratio(live: torch.Tensor, divisor: float, k: float, hard: bool = False) -> torch.Tensor:
    """How much harder the clamp (``remove-ln --clamp K``) divides a token than a token at the site's scale.

    Soft: ``sqrt(1 + (live / (K d))^2) / sqrt(1 + 1 / K^2)``, 1 for ``live = d`` and about ``live / (K d)`` for
    a token running away. Hard (``--clamp-shape hard``): ``max(1, live / (K d))``, exactly 1 (the constant
    divisor) for every token up to ``K`` x the site's scale. live: ``[..., 1]`` per-token RMS (std); same shape
    out."""
    r = live.float() / (k * divisor)
    if hard:
        return r.clamp_min(1.0)
    return torch.sqrt(1.0 + r.pow(2)) / math.sqrt(1.0 + 1.0 / (k * k))


def aux_spread(div: torch.Tensor, form: str = "squared", *, skip: int = 0,
               target: float | None = None) -> torch.Tensor:
    """Auxiliary loss on the spread of per-token divisors (Baroni et al. 2025, normalised by target^2).

    div: ``[batch, pos, ..., 1]`` per-token std/RMS of the residual entering a site, with gradients.
    Returns ``mean_t ((div_t - target) / target)^2`` where ``target`` is the detached mean divisor of the
    ordinary positions (1, 2, ...; all positions when there is only one). The paper's form has no division
    by ``target^2``; dividing makes one weight fit residual streams of any scale (GPT-2 small's final-LN
    input has std ~10, SmolLM2's ~30).

    ``form="log"`` gives ``mean_t log(div_t / target)^2`` instead: bounded growth and comparable weight for a
    170x outlier (position 0's massive activation) and a 9x one (SmolLM2's " the" in layers 3-11), where the
    squared form is dominated by the largest outlier and explodes once a frozen site lets norms run away.

    ``skip``: leave positions < skip out of the mean and the target (the exact-BOS mode, where the fixed
    prefix keeps its own exact divisor and need not be pulled anywhere). ``target``: a fixed target instead of
    the batch mean (TaperNorm's scale anchor for the final norm's input: the residual scale cannot drift, so
    the model cannot lower the loss by inflating the logits once the final norm is gone).
    """
    d = div.float()
    if skip and d.dim() >= 2 and d.shape[1] > skip:
        d = d[:, skip:]
    ref = d[:, 1:] if not skip and d.dim() >= 2 and d.shape[1] > 1 else d
    tgt = (ref.detach().mean() if target is None else torch.tensor(float(target), device=d.device)).clamp_min(1e-12)
    if form == "log":
        return torch.log(d.clamp_min(1e-12) / tgt).pow(2).mean()
    return ((d - tgt) / tgt).pow(2).mean()


class FrozenNorm(nn.Module):
    """A norm site whose per-token divisor can be replaced by a frozen scalar (see the module docstring).

    Modes: ``frozen`` (the main output: the whole site, or the path to Q and K for a pre-attention site with
    a split value path) and ``frozen_v`` (the value path), each with a ``ramp`` (``ramp_v``) from 0 to 1 that
    moves the divisor geometrically from the per-token to the frozen value over a few steps (1: at once, as
    in the paper). ``tracking`` accumulates divisor statistics for the
    EMA (call :meth:`commit` once per optimizer step); ``aux`` keeps the auxiliary spread loss of this
    forward in ``aux_term``.
    """

    weight: torch.Tensor | None  # the original norm's Parameter objects, now registered here, or None
    bias: torch.Tensor | None

    def __init__(self, original: nn.Module, site: Any, *, momentum: float = 0.9, first_token: bool = True) -> None:
        super().__init__()
        self.site_name: str = site.name
        self.role: str = site.role
        self.centered: bool = bool(site.centered)
        self.eps: float = float(site.eps)
        self.gain_offset: float = float(site.gain_offset)
        self.momentum = float(momentum)
        self.first_token = bool(first_token)
        self._orig = [original]  # a list, so the original is not registered as a child module
        for pname in ("weight", "bias"):
            p = getattr(original, pname, None)
            if isinstance(p, nn.Parameter):
                setattr(self, pname, p)  # same Parameter object: same state_dict key, shared gradient
            else:
                setattr(self, pname, None)
        # divisor state (exact Python floats)
        self.ema: float | None = None
        self.ema_first: float | None = None
        self.divisor: float | None = None
        self.divisor_first: float | None = None
        self.first_blend: float = 0.0
        self.frozen = False
        self.frozen_v = False
        self.split_v = False
        self.frozen_at: int | None = None
        self.frozen_v_at: int | None = None
        self.ramp = 1.0  # 0..1: how far the main path has moved from the live to the frozen divisor
        self.ramp_v = 1.0
        self.n_fixed = 0  # exact BOS: positions < n_fixed (a fixed prefix) keep their own, input-independent, divisor
        self.follow = False  # while ramping, the frozen divisor follows the EMA (a smooth global gate)
        self.aux_target: float | None = None  # fixed aux target (the final norm's scale anchor)
        self.aux_skip_first = 0  # the aux loss leaves positions < this out (a fixed prefix keeps its divisors)
        self.guard = 0.0  # training only: cap a token's divisor ratio at guard (0: off); see guard_penalty
        self.guard_weight = 10.0
        self.clamp = 0.0  # a soft clamp kept in the export: divisor sqrt(d^2 + live^2 / clamp^2) (0: off)
        self.clamp_hard = False  # the clamp's hard knee instead: divisor max(d, live / clamp)
        # per-forward switches and outputs
        self.tracking = False
        self.aux = False
        self.aux_form = "squared"
        self.aux_term: torch.Tensor | None = None
        self.v_input: torch.Tensor | None = None
        self._acc: torch.Tensor | None = None  # [4] float64, see divisor_stats
        self.override: torch.Tensor | None = None  # tests: a per-token divisor [..., 1] used when frozen
        self.watch = False  # record the largest divisor at positions >= 1 and a non-finite input (diagnostics)
        self.peak: tuple[float, int, int] | None = None  # (largest live divisor at pos >= 1, batch row, position)
        self.nonfinite_input = False
        self.recomputing = False  # a checkpointed block's second forward, in the backward pass

    @property
    def original(self) -> nn.Module:
        return self._orig[0]

    def _params(self) -> dict[str, torch.Tensor]:
        return {n: p for n in ("weight", "bias") if (p := getattr(self, n)) is not None}

    def _live(self, x: torch.Tensor) -> torch.Tensor:
        """The original norm's forward on this wrapper's parameters as they are now (under FSDP: the gathered
        ones; the original module's own attributes would be the stale full tensors of before sharding)."""
        params = self._params()
        orig = self.original
        if all(getattr(orig, n, None) is p for n, p in params.items()):
            return orig(x)
        return torch.func.functional_call(orig, params, (x,), strict=False)

    def extra_repr(self) -> str:
        return (f"site={self.site_name}, frozen={self.frozen}, frozen_v={self.frozen_v}, "
                f"divisor={self.divisor}, divisor_first={self.divisor_first}, blend={self.first_blend:.3f}")

    # ---- the divisor -----------------------------------------------------------------------------------
    def live_divisor(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token divisor sqrt(var + eps) (LayerNorm) or sqrt(mean(x^2) + eps) (RMSNorm): ``[..., 1]`` fp32."""
        xf = x.float()
        if self.centered:
            xf = xf - xf.mean(dim=-1, keepdim=True)
        return torch.sqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)

    def first_divisor(self) -> float:
        """The divisor position 0 gets now (the shared one unless a separate first-token value is blended)."""
        assert self.divisor is not None
        if not self.first_token or self.divisor_first is None:
            return self.divisor
        return blended_first_divisor(self.divisor_first, self.divisor, self.first_blend)

    def _frozen_inverse(self, x: torch.Tensor) -> torch.Tensor | float:
        """1 / frozen divisor, a scalar or ``[1, pos, 1, ...]`` when position 0 has its own value
        (``[batch, pos, 1, ...]`` with gradients when position 0 keeps its live divisor: exact BOS)."""
        if self.override is not None:
            return 1.0 / self.override.float()
        if self.divisor is None:
            raise RuntimeError(f"{self.site_name} is frozen but has no divisor")
        if self.n_fixed and x.dim() >= 2 and x.shape[1] >= 1:
            k = min(self.n_fixed, x.shape[1])
            x0 = x[:, :k].float()  # [batch, k, ..., d]
            if self.centered:
                x0 = x0 - x0.mean(dim=-1, keepdim=True)
            inv0 = torch.rsqrt(x0.pow(2).mean(dim=-1, keepdim=True) + self.eps)  # [batch, k, ..., 1]
            rest = inv0.new_full((inv0.shape[0], x.shape[1] - k, *inv0.shape[2:]), 1.0 / self.divisor)
            return torch.cat([inv0, rest], dim=1)  # [batch, pos, ..., 1]
        d0 = self.first_divisor()
        if d0 == self.divisor or x.dim() < 2 or x.shape[1] < 1:
            return 1.0 / self.divisor
        shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
        inv = torch.full(shape, 1.0 / self.divisor, dtype=torch.float32, device=x.device)
        inv[:, 0] = 1.0 / d0
        return inv

    def _affine(self, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.weight is not None:
            y = y * (self.weight.float() + self.gain_offset) if self.gain_offset else y * self.weight.float()
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(dtype)

    def _frozen_out(self, x: torch.Tensor, ramp: float = 1.0) -> torch.Tensor:
        """The site with its frozen divisor; while ``ramp`` < 1, the geometric blend
        ``d_live ** (1 - ramp) * d_frozen ** ramp`` of the per-token and the frozen divisor."""
        xf = x.float()
        if self.centered:
            xf = xf - xf.mean(dim=-1, keepdim=True)
        inv = self._frozen_inverse(x)
        guard = self.guard > 0 and self.training
        if ramp < 1.0 or guard or self.clamp > 0:
            live = torch.sqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)  # [..., 1], with gradients
        if self.clamp > 0:
            inv = self._clamped(x, inv, live)
        if ramp < 1.0:
            frozen = inv if isinstance(inv, torch.Tensor) else torch.tensor(inv, device=x.device)
            inv = torch.exp(-(1.0 - ramp) * torch.log(live) + ramp * torch.log(frozen))
        if guard:  # training only: a token above guard x the frozen divisor is normalised down to guard
            inv = torch.minimum(torch.as_tensor(inv, device=x.device), self.guard / live)
        return self._affine(xf * inv, x.dtype)

    def _clamped(self, x: torch.Tensor, inv: torch.Tensor | float, live: torch.Tensor) -> torch.Tensor:
        """The clamp kept in the export, past the fixed prefix (``d`` the frozen divisor). ``[batch, pos, ..., 1]``.

        Soft (the default): ``1 / sqrt(d^2 + live^2 / K^2)``. An ordinary token (live ~ d) is divided by
        ``d * sqrt(1 + 1/K^2)``, within ``1 / (2 K^2)`` of the frozen constant; a token running away
        (live >> K d) is normalised down to ``K`` times the site's scale, in training and in the export alike
        (an RMSNorm with eps ``K^2 d^2`` and gain ``K w`` computes exactly this).

        Hard (``clamp_hard``): ``1 / max(d, live / K)``, the training guard's knee kept for good. Every token
        up to ``K`` x the site's scale is divided by the constant ``d`` exactly (LN-free, linear), and only a
        token above it is normalised, down to ``K`` x. No RMSNorm computes this: the export folds ``d`` like
        an unclamped site and a forward hook applies the knee (:mod:`normscope.core.lnfree`).

        The fixed prefix keeps its exact live divisor.
        """
        d = 1.0 / inv if isinstance(inv, torch.Tensor) else torch.tensor(1.0 / inv, device=x.device)
        if self.clamp_hard:
            c = torch.minimum(1.0 / d, self.clamp / live)  # [batch, pos, ..., 1]
        else:
            c = torch.rsqrt(d.pow(2) + (live / self.clamp).pow(2))  # [batch, pos, ..., 1]
        if self.n_fixed and isinstance(inv, torch.Tensor) and inv.shape[0] == c.shape[0] and x.dim() >= 2:
            k = min(self.n_fixed, x.shape[1])
            c = torch.cat([inv[:, :k].expand_as(c[:, :k]), c[:, k:]], dim=1)
        return c

    def guard_penalty(self, div: torch.Tensor) -> torch.Tensor | None:
        """mean_t relu(log(d_t / (guard * d)))^2 over positions past the fixed prefix: what the guard had to
        catch, so that the model learns to keep every token inside it (the export has no guard)."""
        if not (self.guard > 0 and self.frozen and self.divisor is not None):
            return None
        d = div.float()
        k = max(self.n_fixed, self.aux_skip_first)
        if k and d.dim() >= 2 and d.shape[1] > k:
            d = d[:, k:]
        return torch.relu(torch.log(d / (self.guard * self.divisor))).pow(2).mean()

    # ---- forward ---------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [batch, pos, d] (or [batch, pos, heads, d_head])
        if self.aux:  # the rerun of a checkpointed block repeats these ops (autograd needs them) but keeps nothing
            div = self.live_divisor(x)  # [..., 1], with gradients for the aux loss
            term = aux_spread(div, self.aux_form, skip=max(self.n_fixed, self.aux_skip_first),
                              target=self.aux_target)
            pen = self.guard_penalty(div)
            if pen is not None:
                term = term + self.guard_weight * pen
            if not self.recomputing:
                self.aux_term = term
        elif (self.tracking or self.watch) and not self.recomputing:
            with torch.no_grad():
                div = self.live_divisor(x)
        if self.watch and not self.recomputing:
            self._watch(x, div)
        if self.tracking and not self.recomputing:
            st = divisor_stats(div, self.first_token)  # [4]
            self._acc = st if self._acc is None else self._acc + st
        main = self._frozen_out(x, self.ramp) if self.frozen else self._live(x)
        v_state = (self.frozen_v, self.ramp_v if self.frozen_v else None)
        if self.split_v and v_state != (self.frozen, self.ramp if self.frozen else None):
            self.v_input = self._frozen_out(x, self.ramp_v) if self.frozen_v else self._live(x)
        else:
            self.v_input = None
        return main

    def _watch(self, x: torch.Tensor, div: torch.Tensor) -> None:
        """Keep the largest divisor at positions >= 1 (and where), and whether the input was non-finite."""
        with torch.no_grad():
            if not bool(torch.isfinite(x).all()):
                self.nonfinite_input = True
            if div.dim() < 3 or div.shape[1] < 2:
                return
            rest = div[:, 1:].reshape(div.shape[0], div.shape[1] - 1, -1).amax(dim=-1)  # [batch, pos-1]
            flat = torch.nan_to_num(rest, nan=float("inf")).flatten()
            i = int(flat.argmax())
            v = float(flat[i])
            if self.peak is None or v > self.peak[0]:
                self.peak = (v, i // rest.shape[1], i % rest.shape[1] + 1)

    # ---- EMA, freezing, state --------------------------------------------------------------------------
    def pending(self) -> torch.Tensor:
        """The statistics accumulated since the last :meth:`commit`, ``[4]`` float64 (all-reduced under DDP)."""
        if self._acc is None:
            return torch.zeros(4, dtype=torch.float64, device=self._device())
        return self._acc

    def _device(self) -> torch.device:
        p = self.weight if self.weight is not None else self.bias
        return p.device if p is not None else torch.device("cpu")

    def commit(self, acc: torch.Tensor | None = None) -> None:
        """Fold the accumulated divisor means into the EMA (once per optimizer step) and reset the sums."""
        s, n, s0, n0 = (acc if acc is not None else self.pending()).tolist()
        if n > 0 and math.isfinite(s):  # an overflowing batch must not poison the divisor to freeze
            self.ema = ema_update(self.ema, s / n, self.momentum)
        if n0 > 0 and math.isfinite(s0):
            self.ema_first = ema_update(self.ema_first, s0 / n0, self.momentum)
        if self.follow and self.frozen and self.ema is not None and (
                self.ramp < 1.0 or (self.split_v and self.frozen_v and self.ramp_v < 1.0)):
            self.divisor = self.ema  # the gate is still open: the fixed scaling tracks the running mean
        self._acc = None

    def discard(self) -> None:
        """Drop the statistics accumulated since the last commit (a skipped, non-finite step)."""
        self._acc = None

    def freeze(self, step: int | None = None, path: str = "main") -> None:
        """Freeze the main path (``"main"``) or the value path (``"v"``) at the current EMA."""
        if self.divisor is None:
            if self.ema is None:
                raise NormscopeError(f"{self.site_name} was frozen before any divisor was measured; start the "
                                     "schedule at step 1 or later.")
            self.divisor = self.ema
            if self.first_token and self.ema_first is not None:
                self.divisor_first = self.ema_first
        if path == "main":
            self.frozen, self.frozen_at = True, step
        elif path == "v":
            self.frozen_v, self.frozen_v_at = True, step
        else:
            raise ValueError(path)

    @property
    def fully_frozen(self) -> bool:
        """Every path frozen and every ramp complete."""
        return self.frozen and self.ramp >= 1.0 and (not self.split_v or (self.frozen_v and self.ramp_v >= 1.0))

    def state(self) -> dict[str, Any]:
        """JSON-ready divisor state (floats round-trip exactly through JSON)."""
        return {k: getattr(self, k) for k in ("ema", "ema_first", "divisor", "divisor_first", "first_blend",
                                              "frozen", "frozen_v", "split_v", "frozen_at", "frozen_v_at", "ramp",
                                              "ramp_v", "n_fixed", "follow", "aux_target", "aux_skip_first",
                                              "guard", "guard_weight", "clamp", "clamp_hard")}

    def load_state(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)
        self._acc = None


# ---- installing and removing the wrappers ---------------------------------------------------------------
def _parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, attr = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), attr


@dataclass
class ValuePath:
    """How the value projection of one attention module is fed from a second normalised input."""

    kind: str  # "v_proj" (a separate Linear) or "fused" (GPT-2 c_attn: the last third of the columns)
    module: nn.Module


def find_value_path(attn: nn.Module | None, d_model: int) -> ValuePath | None:
    """The value projection of an attention module: a separate ``v_proj``-like Linear or GPT-2's fused ``c_attn``.

    Returns None when neither is found (the QK and V paths are then removed at the same step).
    """
    if attn is None:
        return None
    for name in ("v_proj", "value", "v", "W_V"):
        m = getattr(attn, name, None)
        if isinstance(m, nn.Linear):
            return ValuePath("v_proj", m)
    c = getattr(attn, "c_attn", None)
    w = getattr(c, "weight", None)
    if isinstance(c, nn.Module) and isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape == (d_model, 3 * d_model):
        return ValuePath("fused", c)  # GPT-2's Conv1D [in, out]
    return None


def attach_value_path(wrapper: FrozenNorm, vp: ValuePath, d_model: int) -> torch.utils.hooks.RemovableHandle:
    """Feed the attention's value projection from ``wrapper.v_input`` whenever the wrapper sets one."""
    if vp.kind == "v_proj":

        def pre(module: nn.Module, args: tuple) -> Any:
            v = wrapper.v_input
            if v is None:
                return None
            wrapper.v_input = None
            return (v, *args[1:])

        return vp.module.register_forward_pre_hook(pre)

    def post(module: nn.Module, args: tuple, out: torch.Tensor) -> Any:
        v_in = wrapper.v_input  # [batch, pos, d_model]
        if v_in is None:
            return None
        wrapper.v_input = None
        fused: Any = module  # GPT-2's Conv1D
        w, b = fused.weight, fused.bias  # [d_model, 3 d_model], [3 d_model]
        flat = v_in.reshape(-1, d_model)
        v = flat @ w[:, 2 * d_model:]
        if b is not None:
            v = v + b[2 * d_model:]
        v = v.reshape(*v_in.shape[:-1], d_model)  # [batch, pos, d_model]
        return torch.cat([out[..., : 2 * d_model], v], dim=-1)

    return vp.module.register_forward_hook(post)


class Removal:
    """All the frozen-divisor wrappers of one model; install on construction, :meth:`uninstall` to undo."""

    def __init__(self, model: nn.Module, layout: Any, sites: list[Any], *, momentum: float = 0.9,
                 first_token: bool = True, split_value: bool = True,
                 wrapper: Callable[..., FrozenNorm] = FrozenNorm) -> None:
        """``wrapper(original, site, momentum=..., first_token=...)`` builds each site's wrapper: a
        :class:`FrozenNorm`, or a subclass that replaces the frozen output (``normscope.swap``)."""
        self.model = model
        self.sites = list(sites)
        self.wrappers: dict[str, FrozenNorm] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._originals: dict[str, nn.Module] = {}
        blocks = {b.index: b for b in layout.blocks}
        for site in self.sites:
            parent, attr = _parent(model, site.path)
            original = getattr(parent, attr)
            w = wrapper(original, site, momentum=momentum, first_token=first_token)
            setattr(parent, attr, w)
            self.wrappers[site.name] = w
            self._originals[site.path] = original
            if split_value and site.role == "pre_attn" and site.layer in blocks:
                vp = find_value_path(blocks[site.layer].attn, int(layout.d_model))
                if vp is not None:
                    w.split_v = True
                    self._handles.append(attach_value_path(w, vp, int(layout.d_model)))

    def __iter__(self):
        return iter(self.wrappers.values())

    def __getitem__(self, name: str) -> FrozenNorm:
        return self.wrappers[name]

    def uninstall(self) -> None:
        """Put the original modules back, holding the wrappers' current (trained) Parameters."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for path, original in self._originals.items():
            parent, attr = _parent(self.model, path)
            wrapper = getattr(parent, attr)
            if isinstance(wrapper, FrozenNorm):
                for n, p in wrapper._params().items():
                    if isinstance(p, nn.Parameter) and getattr(original, n, None) is not p:
                        setattr(original, n, p)
            setattr(parent, attr, original)
        self._originals.clear()

    def set(self, *, tracking: bool | None = None, aux_sites: list[str] | None = None,
            aux_form: str | None = None) -> None:
        """Switch EMA tracking on or off, and choose which sites compute the auxiliary loss (and its form)."""
        for name, w in self.wrappers.items():
            if tracking is not None:
                w.tracking = tracking
            if aux_form is not None:
                w.aux_form = aux_form
            if aux_sites is not None:
                w.aux = name in aux_sites
                w.aux_term = None

    @contextmanager
    def recomputing(self) -> Iterator[None]:
        """Mark the backward pass: a checkpointed block that reruns its forward there must not count its divisor
        statistics again nor leave an auxiliary term behind."""
        for w in self.wrappers.values():
            w.recomputing = True
        try:
            yield
        finally:
            for w in self.wrappers.values():
                w.recomputing = False
                w.v_input = None  # a rerun may stop early, between the norm and the value projection

    @contextmanager
    def without_clamp(self) -> Iterator[None]:
        """The same weights with every soft clamp off (pure frozen divisors), restored afterwards even on error:
        how ``remove-ln --clamp`` scores what its model would be without the clamp."""
        kept = {name: w.clamp for name, w in self.wrappers.items()}  # clamp_hard is kept: clamp 0 turns it off
        for w in self.wrappers.values():
            w.clamp = 0.0
        try:
            yield
        finally:
            for name, w in self.wrappers.items():
                w.clamp = kept[name]

    @contextmanager
    def tracking(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Iterator[None]:
        """Track every site's divisor over the forward passes run in the block, then fold them into the EMAs
        in one commit (``reduce``: e.g. an all-reduce of :meth:`pending` under DDP)."""
        self.set(tracking=True, aux_sites=[])
        try:
            yield
        finally:
            self.set(tracking=False)
        self.commit(reduce(self.pending()) if reduce is not None else None)

    def aux_loss(self) -> torch.Tensor | None:
        """Mean of the auxiliary terms the aux sites computed in the last forward pass (then cleared)."""
        terms = [w.aux_term for w in self.wrappers.values() if w.aux and w.aux_term is not None]
        for w in self.wrappers.values():
            w.aux_term = None
        if not terms:
            return None
        return torch.stack(terms).mean()

    def n_removed(self) -> int:
        """Sites whose every path is frozen."""
        return sum(w.fully_frozen for w in self.wrappers.values())

    def pending(self) -> torch.Tensor:
        """Every site's accumulated statistics, ``[n_sites * 4]`` float64 (one all-reduce under DDP)."""
        return torch.cat([w.pending() for w in self.wrappers.values()])

    def commit(self, flat: torch.Tensor | None = None) -> None:
        """Fold every site's accumulated statistics into its EMA (``flat`` is :meth:`pending` all-reduced)."""
        for i, w in enumerate(self.wrappers.values()):
            w.commit(None if flat is None else flat[4 * i: 4 * i + 4])

    def discard(self) -> None:
        for w in self.wrappers.values():
            w.discard()

    def state(self) -> dict[str, dict[str, Any]]:
        return {name: w.state() for name, w in self.wrappers.items()}

    def load_state(self, state: dict[str, dict[str, Any]]) -> None:
        missing = set(self.wrappers) ^ set(state)
        if missing:
            raise NormscopeError(f"The checkpoint's norm sites differ from this model's ({sorted(missing)[:3]}); "
                                 "resume with the model and --sites it was started with.")
        for name, st in state.items():
            self.wrappers[name].load_state(st)

"""A norm site swapped for DyT / Derf / SeeDNorm, driven by the removal machinery's wrappers and schedule.

:class:`SwapNorm` is a :class:`normscope.removal.frozen.FrozenNorm` whose "frozen" output is the swapped
function instead of a frozen divisor: while live it is the original norm (bit-identical), and once the schedule
switches it, its output is ``(1 - g) * norm(x) + g * f(x)`` with the gate ``g`` the removal schedule's ramp
(``--ramp-steps``: 1 = the whole site swapped at step 0; more = the removal machinery's smooth gate from the
norm's output to the swapped one). The function's parameters are a child module of the wrapper, so they join the
model's ``state_dict`` (checkpoints, resume) and the optimizer like every other weight; the norm's own gain
stays registered (it feeds the live path while the gate is open).

With ``n_fixed`` > 0 (``--exact-bos``) the first ``n_fixed`` positions keep the original norm: with a fixed BOS
and causal attention, position 0's trajectory is the same for every input (see :mod:`normscope.removal.frozen`),
so its normalised value is a constant, which a deployment stores once (remove-ln's BOS key/value prefix). This
matters on SmolLM2: position 0's massive activation (about 24,000 in dim 507) saturates ``tanh``, and a bounded
function cannot also shrink the other dims as the divisor did, so position 0's keys and values (the attention
sink every other token reads) change.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from normscope.removal.frozen import FrozenNorm
from normscope.removal.schedule import Event, Schedule, site_phases
from normscope.swap.functions import SwapFunction


class SwapNorm(FrozenNorm):
    """One site: the original norm until switched, then the gate from it to ``fn`` (see the module docstring)."""

    def __init__(self, original: nn.Module, site: Any, *, fn: SwapFunction, momentum: float = 0.9,
                 first_token: bool = True) -> None:
        super().__init__(original, site, momentum=momentum, first_token=first_token)
        self.swap = fn  # a registered child: state_dict key "<norm path>.swap.<param>"

    def extra_repr(self) -> str:
        return f"site={self.site_name}, to={self.swap.kind}, swapped={self.frozen}, gate={self.ramp:.3f}"

    def freeze(self, step: int | None = None, path: str = "main") -> None:
        """Switch the site to its function (no divisor needed: nothing is frozen but the name)."""
        if path != "main":
            raise ValueError(f"a swapped site has one path, not {path!r}")
        self.frozen, self.frozen_at = True, step

    def _frozen_out(self, x: torch.Tensor, ramp: float = 1.0) -> torch.Tensor:  # x: [batch, pos, ..., d]
        y = self.swap(x)  # [batch, pos, ..., d]
        if ramp < 1.0:
            live = self._live(x)
            y = live + ramp * (y - live)  # (1 - g) * norm(x) + g * f(x)
        if self.n_fixed and x.dim() >= 3:  # exact BOS: the fixed prefix keeps the norm (see swap --exact-bos)
            k = min(self.n_fixed, x.shape[1])
            y = torch.cat([self._live(x[:, :k]), y[:, k:]], dim=1)
        return y


class SwapWrappers:
    """The wrapper factory :func:`normscope.removal.train.train` installs: a :class:`SwapNorm` (with a copy of
    its fitted function) for each site in ``inits``, the plain removal wrapper (kept live) for any other."""

    def __init__(self, inits: dict[str, SwapFunction]) -> None:
        self.inits = inits

    def __call__(self, original: nn.Module, site: Any, **kw: Any) -> FrozenNorm:
        if site.name not in self.inits:
            return FrozenNorm(original, site, **kw)
        fn = copy.deepcopy(self.inits[site.name])
        p = next(iter(original.parameters()), None)
        if p is not None:
            fn.to(p.device)
        return SwapNorm(original, site, fn=fn, **kw)


def swap_schedule(sites: list[Any], steps: int, ramp_steps: int) -> Schedule:
    """Every chosen site switched at step 0, its gate rising linearly to 1 over ``ramp_steps`` (1: at once)."""
    events = [Event(0, s.name, "main", site_phases(s, False)[0][0]) for s in sites]
    return Schedule(steps, events, None, None, options={"swap_at": 0, "ramp_steps": max(ramp_steps, 1)},
                    ramp_steps=max(ramp_steps, 1))

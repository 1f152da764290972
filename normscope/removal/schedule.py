"""The removal schedule: at which optimizer step each norm site (or path of a site) is frozen.

Order (Baroni et al. 2025, code ``submarat/removing-layer-norm``, ``config.py``): the pre-MLP norms block by
block, then the pre-attention norms' path to Q and K block by block, then their path to V, then qk-norms,
then any other norm (sandwich post-norms, embedding norms), then the final norm. GPT-2 small's published
schedule starts at step 20 with gaps of 2 / 2 / 3 steps per block for ln2 / ln1qk / ln1v, so the removal
spans steps 20-104 of 300, the final LN goes at 104, and the separate BOS divisor is dropped 12 steps later.

By default the schedule scales to ``--steps``: it starts after ``start_frac`` of the steps, spreads the
sites over the window up to ``end_frac`` in the paper's 2 : 2 : 3 proportions (one unit per block for
qk-norms and other norms, one ln1v gap before the final norm), then blends the first-token divisors into the
shared ones over ``first_frac`` of the steps. Any start or gap that is given is used as a number of steps.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from normscope.core.errors import NormscopeError

PHASES = ("ln2", "ln1qk", "ln1v", "qk_norm", "other", "final")
PHASE_LABELS = {
    "ln2": "pre-MLP norms",
    "ln1qk": "pre-attention norms, path to Q and K",
    "ln1v": "pre-attention norms, path to V",
    "qk_norm": "qk-norms",
    "other": "other norms",
    "final": "final norm",
}
DEFAULT_UNITS = {"ln2": 2.0, "ln1qk": 2.0, "ln1v": 3.0, "qk_norm": 1.0, "other": 1.0, "final": 3.0}
MIN_AUTO_STEPS = 8


@dataclass
class ScheduleOptions:
    """How the removal is spread over the training steps (None: scaled to the number of steps)."""

    start: int | None = None
    """Step of the first removal (default: ``start_frac`` of the steps, at least 1)."""
    gap_ln2: float | None = None
    """Steps between two blocks' pre-MLP norms (the paper: 2 for GPT-2 small, 4 for large)."""
    gap_ln1qk: float | None = None
    """Steps between two blocks' pre-attention norms, path to Q and K (paper: 2 / 4)."""
    gap_ln1v: float | None = None
    """Steps between two blocks' pre-attention norms, path to V (paper: 3 / 6)."""
    gap_qk_norm: float | None = None
    """Steps between two qk-norms (only models that have them)."""
    gap_final: float | None = None
    """Steps between the last other site and the final norm."""
    first_token_steps: int | None = None
    """Steps over which position 0's own divisors blend into the shared ones (0: at once)."""
    ramp_steps: int | None = None
    """Steps over which each removed site moves from its per-token to its frozen divisor (1: at once, as in
    the paper; default ``ramp_frac`` of the steps)."""
    ramp_shape: str = "linear"
    """"linear" or "cosine" (TaperNorm's gate: g = 0.5 (1 + cos(pi t)), so the ramp 1 - g starts and ends
    slowly)."""
    taper: bool = False
    """Every site at once (all gaps 0) on one long ramp: a smooth global gate instead of per-site switches."""
    max_per_step: int = 3
    """The automatic schedule is refused when it would remove more site paths than this on one step."""
    start_frac: float = 0.05
    ramp_frac: float = 0.1
    end_frac: float = 0.5
    first_frac: float = 0.15

    def explicit(self) -> bool:
        return self.taper or any(v is not None for v in (self.start, self.gap_ln2, self.gap_ln1qk, self.gap_ln1v,
                                           self.gap_qk_norm, self.gap_final))


@dataclass
class Event:
    """One removal: ``site``'s ``path`` ("main" or "v") is frozen at the start of ``step``."""

    step: int
    site: str
    path: str
    phase: str


@dataclass
class Schedule:
    steps: int
    events: list[Event]
    first_token_start: int | None = None  # first step at which the blend is above 0
    first_token_end: int | None = None  # step at which the blend reaches 1
    options: dict[str, Any] = field(default_factory=dict)
    ramp_steps: int = 1
    ramp_shape: str = "linear"

    def ramp(self, event: Event, step: int) -> float:
        """How far ``event``'s site has moved to its frozen divisor at ``step`` (0 before, 1 when done)."""
        if step < event.step:
            return 0.0
        t = min(1.0, (step - event.step + 1) / max(self.ramp_steps, 1))
        if self.ramp_shape == "cosine":
            return 0.5 * (1.0 - math.cos(math.pi * t))
        return t

    def at(self, step: int) -> list[Event]:
        """The events to apply at the start of ``step``."""
        return [e for e in self.events if e.step == step]

    def blend(self, step: int) -> float:
        """First-token blend at ``step``: 0 (own divisor) before the window, 1 (shared divisor) from its end."""
        if self.first_token_start is None or self.first_token_end is None:
            return 1.0
        if step >= self.first_token_end:
            return 1.0
        if step < self.first_token_start:
            return 0.0
        span = self.first_token_end - self.first_token_start + 1
        return (step - self.first_token_start + 1) / span

    @property
    def last_removal(self) -> int:
        return max((e.step for e in self.events), default=0)

    @property
    def done_by(self) -> int:
        """The step from which nothing changes any more (every site frozen, ramps and blends at 1)."""
        return max(self.last_removal + self.ramp_steps - 1, self.first_token_end or 0)

    def phase_starts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in self.events:
            out.setdefault(e.phase, e.step)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "ramp_steps": self.ramp_steps, "ramp_shape": self.ramp_shape,
                 "first_token_start": self.first_token_start,
                "first_token_end": self.first_token_end, "options": self.options,
                "phase_starts": self.phase_starts(), "events": [asdict(e) for e in self.events]}


def site_phases(site: Any, split_v: bool) -> list[tuple[str, str]]:
    """The (phase, path) pairs one site is removed in: two for a pre-attention norm with a split V path."""
    role = site.role
    if role == "pre_mlp":
        return [("ln2", "main")]
    if role == "pre_attn":
        return [("ln1qk", "main"), ("ln1v", "v")] if split_v else [("ln1qk", "main")]
    if role == "qk_norm":
        return [("qk_norm", "main")]
    if role == "final":
        return [("final", "main")]
    return [("other", "main")]


def _ordered(sites: list[Any], split: dict[str, bool]) -> list[tuple[str, str, str]]:
    """(phase, site name, path) in removal order: phase, then layer, then forward order within a layer."""
    items = []
    for k, s in enumerate(sites):
        for phase, path in site_phases(s, split.get(s.name, False)):
            layer = s.layer if s.layer is not None else (10**9 if phase == "final" else -1)
            items.append((PHASES.index(phase), layer, k, phase, s.name, path))
    items.sort()
    return [(ph, name, path) for _, _, _, ph, name, path in items]


def build_schedule(sites: list[Any], steps: int, opts: ScheduleOptions | None = None, *,
                   split: dict[str, bool] | None = None, first_token: bool = True) -> Schedule:
    """Place every site's removal on a step; raises NormscopeError when ``steps`` cannot hold the schedule.

    ``sites`` are :class:`normscope.core.sites.NormSite` (only ``name``, ``role`` and ``layer`` are read), ``split``
    says which pre-attention sites have a separate V path, ``first_token`` adds the blend window.
    """
    opts = opts or ScheduleOptions()
    split = split or {}
    if not sites:
        raise NormscopeError("There is no norm site to remove; check --sites.")
    order = _ordered(sites, split)
    explicit = opts.explicit()
    if steps < (2 if explicit else MIN_AUTO_STEPS):
        raise NormscopeError(f"--steps {steps} is too few for a removal schedule; give at least "
                             f"{MIN_AUTO_STEPS} steps (or set --start and the gaps yourself).")
    if opts.ramp_shape not in ("linear", "cosine"):
        raise NormscopeError(f"--ramp-shape must be linear or cosine, not '{opts.ramp_shape}'.")
    gaps = {"ln2": opts.gap_ln2, "ln1qk": opts.gap_ln1qk, "ln1v": opts.gap_ln1v, "qk_norm": opts.gap_qk_norm,
            "other": opts.gap_qk_norm, "final": opts.gap_final}
    if opts.taper:
        gaps = dict.fromkeys(gaps, 0.0)
    start = opts.start if opts.start is not None else max(1, round(opts.start_frac * steps))
    if start < 1:
        raise NormscopeError("--start must be at least 1: the first step measures the divisors to freeze.")
    # cumulative position of each event, in units (auto) or steps (explicit gaps)
    positions: list[float] = []
    pos, prev_phase = 0.0, None
    for phase, _name, _path in order:
        if prev_phase is not None:
            given = gaps[phase]
            g: float = given if explicit and given is not None else DEFAULT_UNITS[phase]
            if explicit and given is None:
                g = _scaled_gap(phase, start, steps, opts, order)
            pos += g
        positions.append(pos)
        prev_phase = phase
    if explicit:
        event_steps = [start + int(round(p)) for p in positions]
    else:
        end = max(start, round(opts.end_frac * steps))
        total = positions[-1] if positions[-1] > 0 else 1.0
        event_steps = [start + int((p / total) * (end - start)) for p in positions]
        densest = max(Counter(event_steps).values())
        if densest > opts.max_per_step:
            need = _auto_steps_needed(sites, opts, split, first_token, steps)
            raise NormscopeError(
                f"--steps {steps} is too few for the automatic schedule: it would remove up to {densest} norm "
                f"paths on one step ({len(order)} removals between steps {start} and {end}), which overflows a "
                f"frozen model; give --steps {need} or more, or set --start and the --gap-* options yourself.")
    events = [Event(st, name, path, phase) for st, (phase, name, path) in zip(event_steps, order, strict=True)]
    ramp = opts.ramp_steps if opts.ramp_steps is not None else max(1, round(opts.ramp_frac * steps))
    if ramp < 1:
        raise NormscopeError("--ramp-steps must be at least 1 (1: each site is frozen at once).")
    last = events[-1].step
    settled = last + ramp - 1  # the last ramp is complete
    f0 = f1 = None
    if first_token:
        k = opts.first_token_steps if opts.first_token_steps is not None else max(1, round(opts.first_frac * steps))
        if k < 0:
            raise NormscopeError("--first-token-steps must be 0 or more.")
        f0, f1 = settled + 1, settled + k
        done = max(f1, settled)
    else:
        done = settled
    if done >= steps:
        raise NormscopeError(
            f"--steps {steps} is too few for this schedule: the last removal is at step {last}"
            + (f", its ramp ends at step {settled}" if ramp > 1 else "")
            + (f" and the first-token divisors merge by step {done}" if first_token else "")
            + f"; give --steps {done + 2} or more, or shorten the gaps."
        )
    return Schedule(steps, events, f0, f1, options={**asdict(opts), "first_token": first_token}, ramp_steps=ramp,
                    ramp_shape=opts.ramp_shape)


def _auto_steps_needed(sites: list[Any], opts: ScheduleOptions, split: dict[str, bool], first_token: bool,
                       steps: int) -> int:
    """The smallest --steps for which the automatic schedule removes at most ``max_per_step`` paths a step."""
    n = max(steps + 1, MIN_AUTO_STEPS)
    while n < 1_000_000:
        try:
            build_schedule(sites, n, opts, split=split, first_token=first_token)
            return n
        except NormscopeError:
            n = int(n * 1.1) + 1
    return n


def _scaled_gap(phase: str, start: int, steps: int, opts: ScheduleOptions, order: list[tuple[str, str, str]]) -> float:
    """A gap the user left unset while setting others: the automatic gap of that phase, in steps."""
    end = max(start, round(opts.end_frac * steps))
    units = sum(DEFAULT_UNITS[ph] for ph, _, _ in order[1:])
    return DEFAULT_UNITS[phase] * (end - start) / max(units, 1.0)

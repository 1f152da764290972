"""``swap`` end to end: fit each site's function, switch every site, distill on the removal loop, score, report.

Every norm site of a causal LM becomes DyT, Derf or SeeDNorm (:mod:`normscope.swap.functions`), initialised from
activation statistics (:mod:`normscope.swap.fit`); the model is then fine-tuned with remove-ln's loop
(:func:`normscope.removal.train.train`: warmup and cosine, AdamW, checkpoints and bit-identical resume, SIGTERM
handling, distillation to the original model's next-token distribution), with the removal schedule replaced by
one event per site at step 0 and the removal machinery's gate (``ramp_steps``) from the norm's output to the
swapped one. The control is remove-ln's: the same steps, data and optimizer with every norm kept (no
distillation), so one control serves all three targets. Held-out CE and its tail come from
:mod:`normscope.removal.evaluate`.

No published result converts a pretrained LLM to DyT (Zhu et al. 2025 train from scratch); the gaps this
measures are new.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from torch import nn

from normscope.core.errors import NormscopeError
from normscope.core.sites import find_layout, find_norm_sites
from normscope.removal import evaluate as ev
from normscope.removal.frozen import Removal
from normscope.removal.pipeline import _NullProgress, model_sites, run_setup, select_sites
from normscope.removal.train import StepLog, StopFlag, TrainOptions, finished_state, latest_checkpoint, train
from normscope.report import Result
from normscope.report.result import build_meta
from normscope.swap.fit import error_table, fit_sites
from normscope.swap.functions import REFUSED, TARGETS
from normscope.swap.site import SwapNorm, SwapWrappers, swap_schedule

LABELS = {"dyt": "DyT", "derf": "Derf", "seednorm": "SeeDNorm"}
REFERENCES = [
    "Zhu, Chen, He, LeCun, Liu 2025, Transformers without Normalization (arXiv:2503.10622): DyT",
    "Chen, Lu, Zhu, Sun, Liu 2025, Stronger Normalization-Free Transformers (arXiv:2512.10938): Derf",
    "Cai, Zhu, Liu, Min 2025, SeeDNorm: Self-Rescaled Dynamic Normalization (arXiv:2510.22777)",
    "Baroni et al. 2025, Transformers Don't Need LayerNorm at Inference Time (arXiv:2507.02559): the fine-tuning "
    "recipe and the control",
    "Hinton, Vinyals, Dean 2015, Distilling the Knowledge in a Neural Network (arXiv:1503.02531)",
    "Sun, Chen, Kolter, Liu 2024, Massive Activations in Large Language Models (arXiv:2402.17762)",
]


def swap_train_options(**kw: Any) -> TrainOptions:
    """remove-ln's TrainOptions with swap's defaults: distillation on, no aux loss (a swapped site has no divisor
    to regularise), no split value path, no first-token divisor, no per-site log."""
    base: dict[str, Any] = {"steps": 100, "aux_weight": 0.0, "aux_sites": "none", "distill_weight": 1.0,
                            "split_value": False, "first_token": False, "log_sites": False}
    return TrainOptions(**{**base, **kw})


@dataclass
class SwapOptions:
    """Settings of ``normscope swap`` beyond the training ones."""

    target: str = "dyt"
    """dyt, derf or seednorm."""
    train: TrainOptions = field(default_factory=swap_train_options)
    ramp_steps: int = 1
    """Steps over which each site's output moves from the norm to the swapped function (1: at step 0)."""
    control: bool = False
    """Also fine-tune a copy with the norms kept (remove-ln's control; reused when already finished)."""
    sites: list[str] | None = None
    """Glob patterns on site names; default every site."""
    run_dir: Path = Path("runs/swap")
    """Checkpoints go to ``run_dir/<target>`` and ``run_dir/control`` (one control for every target)."""
    resume: bool = False
    calib_batches: int = 4
    """Training micro-batches the fit reads."""
    error_batches: int = 2
    """Held-out batches the per-site error table reads."""
    data_note: str = ""
    top_tokens: int = 20


def check_target(target: str) -> str:
    """The target name, or a one-line refusal (BHyT: its formula is unverified)."""
    t = target.lower()
    if t in REFUSED:
        raise NormscopeError(REFUSED[t])
    if t not in TARGETS:
        raise NormscopeError(f"--to must be one of {', '.join(TARGETS)}, not '{target}'.")
    return t


def check(lm: Any, opts: SwapOptions) -> None:
    """Fail before any text is read: the target, an encoder, --sites matching nothing, the ramp and steps."""
    check_target(opts.target)
    _layout, sites = model_sites(lm.model, lm.info.spec, "swap")
    select_sites(sites, opts.sites)
    if opts.ramp_steps < 1:
        raise NormscopeError("--ramp-steps must be at least 1 (1: every site swapped at step 0).")
    if opts.ramp_steps > opts.train.steps:
        raise NormscopeError(f"--ramp-steps {opts.ramp_steps} is more than --steps {opts.train.steps}: the gate "
                             "would never reach the swapped function; lower it or train longer.")
    if opts.train.init_from:
        raise NormscopeError("swap does not take --init-from; continue a run with --resume.")


def _install(model: nn.Module, fns: dict[str, Any], names: list[str]) -> Removal:
    """Every named site swapped at once, gate 1 (for the untrained score)."""
    layout = find_layout(model)
    rem = Removal(model, layout, find_norm_sites(model, layout), split_value=False, first_token=False,
                  wrapper=SwapWrappers(fns))
    for n in names:
        rem[n].freeze(0)
        rem[n].ramp = 1.0
    return rem


def run(lm: Any, train_sample: Any, eval_sample: Any, opts: SwapOptions | None = None, progress: Any = None,
        stop: StopFlag | None = None) -> Result:
    """Fit, swap, fine-tune (plus the control when asked), score on held-out text and build the report.
    ``lm`` is the original model, left unchanged (training works on copies)."""
    opts = opts or SwapOptions()
    target = check_target(opts.target)
    progress = progress or _NullProgress()
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    original, layout, chosen = run_setup(lm, opts.sites, "swap")
    names = [s.name for s in chosen]
    run_dir = Path(opts.run_dir)
    part, cpart = run_dir / target, run_dir / "control"
    have = latest_checkpoint(part) is not None
    if opts.resume and not have:
        raise NormscopeError(f"--resume was given but {part} holds no checkpoint; run without --resume to start.")
    if have and not opts.resume:
        raise NormscopeError(f"{part} already holds checkpoints of an earlier run; add --resume to continue it, or "
                             "choose another --run-dir.")
    have_c = latest_checkpoint(cpart) is not None
    if opts.control and have_c and not opts.resume and finished_state(cpart) is None:
        raise NormscopeError(f"{cpart} holds an unfinished control; add --resume to continue it.")
    topts = opts.train
    if topts.exact_bos:
        from normscope.removal.pipeline import check_fixed_prefix

        check_fixed_prefix(train_sample, topts.fixed_prefix, "training")
        check_fixed_prefix(eval_sample, topts.fixed_prefix, "held-out")
    extra = {"model_spec": lm.info.spec, "train_text": train_sample.to_dict(), "swap_target": target}

    # fit and per-site error, on the original model's activations
    ts = time.perf_counter()
    calib = train_sample.batches[:max(opts.calib_batches, 1)]
    with progress.task(f"fitting {LABELS[target]} per site", sum(b.input_ids.numel() for b in calib)) as adv:
        inits = fit_sites(original, layout, chosen, target, calib, progress=adv)
    held = list(eval_sample.iter_batches())[:max(opts.error_batches, 1)]
    with progress.task("per-site error", sum(b.input_ids.numel() for b in held)) as adv:
        errors = error_table(original, layout, chosen, target, inits, held, progress=adv)
    fns = {n: ini.fn for n, ini in inits.items()}
    timings["fit and error table"] = time.perf_counter() - ts

    # the whole model swapped, before any training
    student = copy.deepcopy(original)
    rem = _install(student, fns, names)
    for w in rem:
        w.n_fixed = topts.fixed_prefix if topts.exact_bos else 0
    scored: dict[str, ev.TokenLosses] = {}
    with progress.task("scoring the untrained swap", eval_sample.n_tokens) as adv:
        untrained = ev.per_token_losses(student, eval_sample, progress=adv)
    rem.uninstall()

    # fine-tune on remove-ln's loop
    slayout, ssites = find_layout(student), find_norm_sites(student)
    ts = time.perf_counter()
    with progress.training(f"swapping to {LABELS[target]}", topts.steps, 0, len(names)) as on_step:
        res = train(student, slayout, ssites, train_sample.batches, topts, part, remove=names,
                    teacher=original if topts.distill_weight > 0 else None, resume=have, progress=on_step,
                    stop=stop, extra_state=extra, wrapper=SwapWrappers(fns),
                    schedule=swap_schedule(chosen, topts.steps, opts.ramp_steps),
                    identity_extra={"target": target, "ramp_steps": opts.ramp_steps,
                                    "calib_batches": opts.calib_batches})
    timings[f"training ({LABELS[target]})"] = train_s = time.perf_counter() - ts
    for p in student.parameters():
        p.requires_grad_(False)
    student.eval()

    ctrl_hist: list[StepLog] = []
    control_model = None
    if opts.control:
        ts = time.perf_counter()
        control_model = copy.deepcopy(original)
        cl, cs = find_layout(control_model), find_norm_sites(control_model)
        copts = dataclasses.replace(topts, distill_weight=0.0)  # distillation is a swap aid, not fine-tuning
        with progress.training("control (norms kept)", copts.steps, 0, 0) as on_step:
            cres = train(control_model, cl, cs, train_sample.batches, copts, cpart, control=True,
                         resume=have_c, progress=on_step, stop=stop, extra_state=extra)
        cres.removal.uninstall()
        for p in control_model.parameters():
            p.requires_grad_(False)
        control_model.eval()
        ctrl_hist = cres.history
        timings["training (control)"] = time.perf_counter() - ts

    ts = time.perf_counter()
    models = {"original": original, **({"control": control_model} if control_model is not None else {}),
              LABELS[target]: student}
    with progress.task("evaluating", eval_sample.n_tokens * len(models)) as adv:
        for name, m in models.items():
            scored[name] = ev.per_token_losses(m, eval_sample, progress=adv)
    scored[f"{LABELS[target]}, untrained"] = untrained
    timings["evaluation"] = time.perf_counter() - ts
    trained = {w.site_name: w.swap.describe() for w in res.removal if isinstance(w, SwapNorm)}
    from normscope.swap.report import build_result

    result = build_result(lm, train_sample, eval_sample, opts, target, res, ctrl_hist, scored, errors, trained,
                          train_s)
    res.removal.uninstall()
    timings["total"] = time.perf_counter() - t0
    result.timings = timings
    return result


def meta_for(lm: Any, train_sample: Any, eval_sample: Any, opts: SwapOptions) -> dict[str, Any]:
    topts = opts.train
    settings = {**{k: v for k, v in asdict(topts).items() if k != "schedule"}, "to": opts.target,
                "ramp_steps": opts.ramp_steps, "control": opts.control, "sites": opts.sites or "all",
                "calib_batches": opts.calib_batches, "error_batches": opts.error_batches, "run_dir": str(opts.run_dir),
                "eval_text": eval_sample.to_dict(), "data": opts.data_note}
    return build_meta(lm, train_sample, **settings)


def ce_table(scored: dict[str, ev.TokenLosses], swapped: str) -> pd.DataFrame:
    """One row per model: the loss summary and its gaps to the original and the control."""
    stats = {n: ev.loss_summary(t.losses) for n, t in scored.items()}
    rows = []
    for name, st in stats.items():
        rows.append({"model": name, **st, "gap_vs_original": st["mean"] - stats["original"]["mean"],
                     "gap_vs_control": st["mean"] - stats["control"]["mean"] if "control" in stats else None})
    return pd.DataFrame(rows)


def mean_rel(df: pd.DataFrame, col: str) -> float | None:
    return float(df[col].median()) if col in df and len(df) and df[col].notna().any() else None



"""``remove-ln`` end to end: train the LN-free model (and its control), export it, score it, build the report.

Method and numbers: Heimersheim 2024, "You can remove GPT2's LayerNorm by fine-tuning"; Baroni et al. 2025,
"Transformers Don't Need LayerNorm at Inference Time" (code ``submarat/removing-layer-norm``). See
:mod:`normscope.removal.frozen` (the replacement), :mod:`~normscope.removal.schedule` (the order),
:mod:`~normscope.removal.train` (the loop), :mod:`~normscope.removal.evaluate` and
:mod:`~normscope.removal.export`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fnmatch
import gc
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import torch
from torch import nn

from normscope.core.errors import NormscopeError
from normscope.core.sites import find_layout, find_norm_sites
from normscope.removal import evaluate as ev
from normscope.removal.dist import all_reduce, dist_env, init_distributed, plain_copy
from normscope.removal.export import DEFAULT_EPS, clamp_shape_of, export_model
from normscope.removal.export import export_kind as export_kind_text
from normscope.removal.frozen import Removal
from normscope.removal.schedule import PHASE_LABELS, PHASES
from normscope.removal.train import StepLog, StopFlag, TrainOptions, check_clamp_sites, latest_checkpoint, train
from normscope.report import Figure, Result
from normscope.report.result import build_meta

REFERENCES = [
    "Heimersheim 2024, You can remove GPT2's LayerNorm by fine-tuning (arXiv:2409.13710)",
    "Baroni, Khara, Schaeffer, Subkhankulov, Heimersheim 2025, Transformers Don't Need LayerNorm at Inference "
    "Time: Scaling LayerNorm Removal to GPT-2 XL and the Implications for Mechanistic Interpretability "
    "(arXiv:2507.02559), code submarat/removing-layer-norm",
    "Sun, Chen, Kolter, Liu 2024, Massive Activations in Large Language Models (arXiv:2402.17762)",
    "Hinton, Vinyals, Dean 2015, Distilling the Knowledge in a Neural Network (arXiv:1503.02531): the --distill term",
]
# Published CE (original / fine-tuned with LN kept / LN-free), Baroni et al. 2025, Table 1
PUBLISHED = {
    "GPT-2 small, OpenWebText": (3.1006, 3.0126, 3.0797),
    "GPT-2 small, Pile": (2.8450, 2.8511, 2.8852),
    "GPT-2 medium, OpenWebText": (2.8145, 2.7390, 2.7642),
    "GPT-2 large, OpenWebText": (2.6623, 2.6240, 2.6384),
    "GPT-2 XL, OpenWebText": (2.5567, 2.4799, 2.5052),
}


@dataclass
class RemoveLnOptions:
    """Settings of ``normscope remove-ln`` beyond the training ones."""

    train: TrainOptions = field(default_factory=TrainOptions)
    control: bool = False
    """Also fine-tune a copy with the norms kept (the paper's control: same steps, data, optimizer, CE and aux
    loss, no distillation, since that is a removal aid): the reference for every gap."""
    sites: list[str] | None = None
    """Glob patterns on site names (``blocks.1[2-9].*``, ``ln_final``); default: every site."""
    run_dir: Path = Path("runs/remove-ln")
    """Checkpoints go to ``run_dir/ln-free`` and ``run_dir/control``."""
    resume: bool = False
    export: bool = True
    export_dir: Path | None = None
    """Where the plain checkpoint goes (default ``run_dir/ln-free-model``)."""
    eps: float = DEFAULT_EPS
    """The eps of the exported norms (see :mod:`normscope.removal.export`)."""
    site_costs: bool = False
    """Before training, freeze each site alone (no training) and measure the CE it costs on training text."""
    data_note: str = ""
    """How the training text was obtained, for the report."""
    only: str | None = None
    """"ln-free" or "control": train only that run and stop (to train both in parallel processes; a final
    ``--resume --control`` then evaluates both)."""
    top_tokens: int = 20


class _NullProgress:
    @contextlib.contextmanager
    def task(self, description: str, total: float | None) -> Iterator[Any]:
        yield lambda n: None

    @contextlib.contextmanager
    def training(self, label: str, steps: int, start: int, n_sites: int) -> Iterator[Any]:
        yield lambda log: None

    def status(self, message: str) -> Any:
        return contextlib.nullcontext()


# ---- helpers ----------------------------------------------------------------------------------------------
def select_sites(sites: list[Any], patterns: list[str] | None) -> list[Any]:
    """The sites whose name matches any glob pattern (all sites when ``patterns`` is empty)."""
    if not patterns:
        return list(sites)
    chosen = [s for s in sites if any(fnmatch.fnmatchcase(s.name, p) for p in patterns)]
    if not chosen:
        names = ", ".join(s.name for s in sites[:4])
        raise NormscopeError(f"--sites {' '.join(patterns)} matches no norm site; names look like {names}, ... "
                             "(see `normscope sites MODEL`).")
    return chosen


def model_sites(model: nn.Module, spec: str, command: str = "remove-ln") -> tuple[Any, list[Any]]:
    """Layout and norm sites, with one-line errors for models ``command`` (remove-ln, swap) cannot fine-tune."""
    try:
        layout = find_layout(model)
        sites = find_norm_sites(model, layout)
    except NormscopeError as exc:
        raise NormscopeError(f"{spec} has no norm sites {command} can work on: {exc}") from None
    if not layout.is_causal:
        raise NormscopeError(f"{command} fine-tunes causal LMs for now (next-token prediction and distillation); "
                             f"{spec} is an encoder.")
    return layout, sites


def run_setup(lm: Any, patterns: list[str] | None, command: str = "remove-ln") -> tuple[nn.Module, Any, list[Any]]:
    """The original model in eval mode, its layout and the sites ``--sites`` chose (a fine-tuning run's start)."""
    original = lm.model
    original.eval()
    layout, sites = model_sites(original, lm.info.spec, command)
    return original, layout, select_sites(sites, patterns)


def self_generated_sample(lm: Any, n: int, seq_len: int, batch_size: int, seed: int, cache: Path | None = None,
                          progress: Any = None) -> Any:
    """``n`` sequences of ``seq_len`` tokens sampled from the model itself (temperature 1, no top-k/top-p).

    Each starts from the tokenizer's BOS (else EOS) token, so position 0 is the same token everywhere. The
    ids are cached in ``cache`` so a resumed run trains on the same text.
    """
    from normscope.core.text import sample_from_ids

    if n < 1:
        raise NormscopeError("--self-generated needs a number of sequences of at least 1.")
    tok, model = lm.tokenizer, lm.model
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    if start is None:
        raise NormscopeError("The tokenizer has neither a BOS nor an EOS token to start generation from; use --text.")
    if cache is not None and cache.exists():
        rows = torch.load(cache, weights_only=True)
        if tuple(rows.shape) == (n, seq_len):
            return sample_from_ids(rows.tolist(), ["self-generated"] * n, batch_size=batch_size,
                                   source=f"{n} sequences sampled from the model (cached)", bos_prepended=True)
    device = next(model.parameters()).device
    rows_l = []
    pad = tok.pad_token_id if tok.pad_token_id is not None else int(start)
    with (progress or _NullProgress()).task("generating text", n * seq_len) as adv, torch.random.fork_rng(
            devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for i in range(0, n, batch_size):
            b = min(batch_size, n - i)
            ids = torch.full((b, 1), int(start), dtype=torch.long, device=device)
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                     temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=seq_len - 1,
                                     min_new_tokens=seq_len - 1, pad_token_id=pad)
            rows_l.append(out[:, :seq_len].cpu())
            adv(b * seq_len)
    rows = torch.cat(rows_l)
    if cache is not None and dist_env()[0] == 0:
        import io

        from normscope.report import atomic_write_bytes
        buf = io.BytesIO()
        torch.save(rows, buf)
        atomic_write_bytes(cache, buf.getvalue())
    return sample_from_ids(rows.tolist(), ["self-generated"] * n, batch_size=batch_size,
                           source=f"{n} sequences sampled from the model (temperature 1, seed {seed})",
                           bos_prepended=True)


def site_costs(model: nn.Module, layout: Any, sites: list[Any], batches: list[Any], progress: Any,
               first_token: bool) -> pd.DataFrame:
    """CE cost of freezing each site alone, with no training, on the given (training) batches.

    The divisors are the means over these batches, as the EMA would give; Section 5 of REFERENCE notes that on
    SmolLM2 every site alone costs at most ~0.14 nats and the harm comes from compounding. Under torchrun each
    rank measures every ``world``-th site and one all-reduce gathers them, so no rank idles in a collective
    while another works (the whole table is the same on every rank).
    """
    from normscope.removal.train import next_token_ce

    rank, world = dist_env()
    device = next(model.parameters()).device
    rem = Removal(model, layout, sites, momentum=0.0, first_token=first_token, split_value=False)
    got = torch.zeros(len(sites), 2, dtype=torch.float64)  # [site, (frozen alone, with a position-0 divisor)]
    try:
        with torch.no_grad():
            with rem.tracking():  # the same batches on every rank: the same divisors, no reduction needed
                base = _mean_ce(model, batches, next_token_ce)
            mine = [i for i in range(len(sites)) if i % world == rank]
            with progress.task("per-site cost", len(mine)) as adv:
                for i in mine:
                    w = rem[sites[i].name]
                    w.freeze(0)
                    w.first_blend = 1.0
                    got[i, 0] = _mean_ce(model, batches, next_token_ce)
                    got[i, 1] = float("nan")
                    if first_token and w.divisor_first is not None:
                        w.first_blend = 0.0
                        got[i, 1] = _mean_ce(model, batches, next_token_ce)
                    w.frozen, w.divisor, w.divisor_first = False, None, None
                    adv(1)
    finally:
        rem.uninstall()
    if world > 1:  # other ranks' rows are 0 here (a NaN, no position-0 divisor, stays NaN in the sum)
        got = all_reduce(got, device).cpu()
    rows = [{"site": s.name, "role": s.role, "layer": s.layer, "ce_frozen_alone": float(got[i, 0]),
             "cost": float(got[i, 0]) - base, "cost_with_first_token_divisor": float(got[i, 1]) - base}
            for i, s in enumerate(sites)]
    return pd.DataFrame(rows)


def _mean_ce(model: nn.Module, batches: list[Any], fn: Any) -> float:
    device = next(model.parameters()).device
    tot, n = 0.0, 0
    for b in batches:
        ids = b.input_ids.to(device)
        tot += float(fn(model(input_ids=ids, attention_mask=b.attention_mask.to(device), use_cache=False).logits,
                        ids)) * ids.shape[0]
        n += ids.shape[0]
    return tot / max(n, 1)


def _check_export(frozen: nn.Module, exported: nn.Module, sample: Any) -> float:
    """Max |logit difference| between the frozen model and the reloaded export on the first eval batch."""
    b = next(iter(sample.iter_batches()))
    dev_f, dev_e = next(frozen.parameters()).device, next(exported.parameters()).device
    with torch.no_grad():
        a = frozen(input_ids=b.input_ids.to(dev_f), use_cache=False).logits.float().cpu()
        e = exported(input_ids=b.input_ids.to(dev_e), use_cache=False).logits.float().cpu()
    return float((a - e).abs().max())


def check_fixed_prefix(sample: Any, k: int, what: str) -> None:
    """The exact-BOS mode is exact only if every window starts with the same ``k`` tokens (the BOS)."""
    first = None
    for b in sample.iter_batches():
        head = b.input_ids[:, :k]  # [batch, k]
        if first is None:
            first = head[0]
        if not bool((head == first[None]).all()):
            raise NormscopeError(f"The exact BOS treatment needs the same first token in every {what} window; "
                                 "load the text with --bos yes (this tokenizer's windows start with different "
                                 "tokens).")


def check(lm: Any, opts: RemoveLnOptions) -> None:
    """Fail early, before any text is read or generated: no norm sites, an encoder, --sites matching nothing,
    too few --steps for the schedule, --gradient-checkpointing on a model without it, --fsdp in one process."""
    from normscope.removal.frozen import find_value_path
    from normscope.removal.schedule import build_schedule

    layout, sites = model_sites(lm.model, lm.info.spec)
    chosen = select_sites(sites, opts.sites)
    check_clamp_sites([s.name for s in chosen], opts.train.clamp_sites)
    blocks = {b.index: b for b in layout.blocks}
    split = {s.name: opts.train.split_value and s.role == "pre_attn" and s.layer in blocks
             and find_value_path(blocks[s.layer].attn, int(layout.d_model)) is not None for s in chosen}
    if opts.train.init_from:  # a warm start removes nothing more: it needs no schedule, only the earlier run
        from normscope.removal.train import warm_start_checkpoint

        if opts.only != "control":
            warm_start_checkpoint(Path(opts.train.init_from), control=False)
        if opts.control and opts.only != "ln-free":
            warm_start_checkpoint(Path(opts.train.init_from), control=True)
    else:
        build_schedule(chosen, opts.train.steps, opts.train.schedule, split=split,
                       first_token=opts.train.first_token and not opts.train.exact_bos)
    if opts.train.gradient_checkpointing and not getattr(lm.model, "supports_gradient_checkpointing", False):
        raise NormscopeError(f"{type(lm.model).__name__} does not support gradient checkpointing in transformers; "
                             "drop --gradient-checkpointing (or lower --batch-size to save memory).")
    if opts.train.fsdp and dist_env()[1] < 2:
        raise NormscopeError("--fsdp shards the model over several processes; launch with torchrun "
                             "--nproc-per-node N (N >= 2), or drop --fsdp.")


# ---- the command --------------------------------------------------------------------------------------------
def run(lm: Any, train_sample: Any, eval_sample: Any, opts: RemoveLnOptions | None = None,
        progress: Any = None, stop: StopFlag | None = None) -> Result | None:
    """Fine-tune the norms away (plus the control when asked), export, evaluate on held-out text, report.

    ``lm`` is the original model (left unchanged: training works on copies). Returns the :class:`Result`
    (None on the non-zero ranks of a distributed run, which only train).
    """
    opts = opts or RemoveLnOptions()
    progress = progress or _NullProgress()
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    original, layout, chosen = run_setup(lm, opts.sites)
    remove = [s.name for s in chosen]
    run_dir = Path(opts.run_dir)
    sub = {"ln_free": run_dir / "ln-free", "control": run_dir / "control"}
    have = {k: latest_checkpoint(p) is not None for k, p in sub.items()}
    parts = {"ln-free": ["ln_free"], "control": ["control"]}.get(opts.only or "", ["ln_free"] + (
        ["control"] if opts.control else []))
    if opts.resume and not any(have[p] for p in parts):
        raise NormscopeError(f"--resume was given but {run_dir} holds no checkpoint; run without --resume to start "
                             "a new run, or point --run-dir at the run to continue.")
    if not opts.resume and any(have[p] for p in parts):
        raise NormscopeError(f"{run_dir} already holds checkpoints of an earlier run; add --resume to continue it, "
                             "or choose another --run-dir.")
    rank, _world = dist_env()
    topts = opts.train
    init_distributed(next(original.parameters()).device)  # before anything that all ranks wait on
    if topts.exact_bos:
        check_fixed_prefix(train_sample, topts.fixed_prefix, "training")
        check_fixed_prefix(eval_sample, topts.fixed_prefix, "held-out")
    extra = {"model_spec": lm.info.spec, "train_text": train_sample.to_dict()}

    costs = None
    if opts.site_costs:  # every rank measures its share
        ts = time.perf_counter()
        costs = site_costs(original, layout, chosen, train_sample.batches[:2], progress, topts.first_token)
        timings["per-site costs"] = time.perf_counter() - ts

    if opts.only not in (None, "ln-free", "control"):
        raise NormscopeError(f"--only must be ln-free or control, not '{opts.only}'.")
    if opts.only == "control" and not opts.control:
        raise NormscopeError("--only control needs --control.")
    if opts.only == "control":
        _train_control(original, train_sample, opts, sub["control"], have["control"], progress, stop, extra)
        return None

    # LN-free run
    student = copy.deepcopy(original)
    slayout, ssites = find_layout(student), find_norm_sites(student)
    ts = time.perf_counter()
    with progress.training("removing norms", topts.steps, 0, len(chosen)) as on_step:
        res = train(student, slayout, ssites, train_sample.batches, topts, sub["ln_free"], control=False,
                    remove=remove, teacher=original if topts.distill_weight > 0 else None,
                    resume=have["ln_free"], progress=on_step, stop=stop, extra_state=extra)
    if res.full_state is not None:  # FSDP, rank 0: continue on an unsharded copy
        student, res.removal = plain_copy(original, res, topts)
        res.full_state = None
    timings["training (LN-free)"] = time.perf_counter() - ts
    for p in student.parameters():
        p.requires_grad_(False)
    student.eval()

    if opts.only == "ln-free":
        return None
    ctrl_hist: list[StepLog] = []
    control_model = None
    if opts.control:
        ts = time.perf_counter()
        control_model, ctrl_hist = _train_control(original, train_sample, opts, sub["control"], have["control"],
                                                  progress, stop, extra)
        timings["training (control)"] = time.perf_counter() - ts
    if rank != 0:
        return None

    # export
    export_dir, export_diff, export_note = None, None, ""
    ln_free: nn.Module = student
    all_removed = res.removal.n_removed() == len(res.removal.wrappers)
    manifest = {"model": lm.info.spec, "schedule": res.schedule.to_dict(),
                "training": asdict(topts), "train_text": train_sample.to_dict(), "data_note": opts.data_note,
                "steps_done": len(res.history), "skipped_steps": res.skipped}
    export_kind = None
    if opts.export and all_removed and res.diverged_at is None:
        ts = time.perf_counter()
        with progress.status("exporting the LN-free model"):
            from normscope.core.lnfree import apply_site_eps
            from normscope.removal.prefix import PrefixModel, compute_prefix

            prefix = None
            if topts.exact_bos:
                ids0 = train_sample.batches[0].input_ids[0, :topts.fixed_prefix].tolist()
                prefix = compute_prefix(student, ids0)
            export_dir, _plain = export_model(student, res.removal, lm.tokenizer,
                                              opts.export_dir or run_dir / "ln-free-model", manifest, opts.eps,
                                              prefix=prefix)
            from transformers import AutoModelForCausalLM

            exported: nn.Module = AutoModelForCausalLM.from_pretrained(export_dir, attn_implementation="eager",
                                                                       dtype=torch.float32)
            apply_site_eps(exported, export_dir)
            exported.to(next(original.parameters()).device).eval()
            if prefix is not None:
                exported = PrefixModel(exported, prefix).eval()
            export_diff = _check_export(student, exported, eval_sample)
            export_kind = export_kind_text(prefix is not None, clamp_shape_of(res.removal))
        ln_free = exported
        timings["export"] = time.perf_counter() - ts
    elif opts.export and res.diverged_at is not None:
        export_note = (f"Not exported: training diverged at step {res.diverged_at} (every step overflowed), so the "
                       "model is not worth writing.")
    elif opts.export:
        n_live = len(res.removal.wrappers) - res.removal.n_removed()
        why = ("training stopped before the schedule had removed them" if len(res.history) < topts.steps
               else "they were kept live (--sites)")
        export_note = (f"Not exported: {n_live} site(s) are still live because {why}, and a plain checkpoint has "
                       "one eps for all norms; the LN-free numbers come from the frozen model in memory.")

    # evaluate
    ts = time.perf_counter()
    models = {"original": original}
    if control_model is not None:
        models["control"] = control_model
    models["LN-free"] = ln_free
    scored: dict[str, ev.TokenLosses] = {}
    with progress.task("evaluating", eval_sample.n_tokens * len(models)) as adv:
        for name, m in models.items():
            scored[name] = ev.per_token_losses(m, eval_sample, progress=adv)
    clamp_info = None
    if any(w.clamp > 0 for w in res.removal):  # the soft clamp: how often it acts, and the same weights without it
        clamp_info = ev.clamp_usage(student, res.removal, eval_sample)
        with res.removal.without_clamp(), progress.task("evaluating without the clamp", eval_sample.n_tokens) as adv:
            scored[CLAMP_OFF] = ev.per_token_losses(student, eval_sample, progress=adv)
    norms = {}
    for name, m in models.items():
        if m is ln_free and topts.exact_bos:
            continue  # its position 0 is the BOS prefix, not a token: no first-token norm to compare
        norms[name] = ev.residual_norms(m, eval_sample)
    timings["evaluation"] = time.perf_counter() - ts
    if export_dir is None:
        res.removal.uninstall()

    result = build_result(lm, train_sample, eval_sample, opts, res, ctrl_hist, scored, norms, costs,
                          export_dir, export_diff, export_note, clamp_info=clamp_info)
    result.headlines["export_kind"] = export_kind
    timings["total"] = time.perf_counter() - t0
    result.timings = timings
    del student, control_model
    gc.collect()
    return result


def _train_control(original: nn.Module, train_sample: Any, opts: RemoveLnOptions, run_dir: Path, resume: bool,
                   progress: Any, stop: StopFlag | None, extra: dict[str, Any]) -> tuple[nn.Module, list[StepLog]]:
    """The paper's control: the same steps, data, optimizer, CE and aux loss with every norm kept (no
    distillation, which is a removal aid). Returns the fine-tuned copy and its history."""
    model = copy.deepcopy(original)
    layout, sites = find_layout(model), find_norm_sites(model)
    copts = dataclasses.replace(opts.train, distill_weight=0.0)
    with progress.training("control (norms kept)", copts.steps, 0, 0) as on_step:
        res = train(model, layout, sites, train_sample.batches, copts, run_dir, control=True, resume=resume,
                    progress=on_step, stop=stop, extra_state=extra)
    if res.full_state is not None:  # FSDP, rank 0: continue on an unsharded copy
        model, res.removal = plain_copy(original, res, copts)
    res.removal.uninstall()
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), res.history


# ---- the report ---------------------------------------------------------------------------------------------
def build_result(lm: Any, train_sample: Any, eval_sample: Any, opts: RemoveLnOptions, res: Any,
                 ctrl_hist: list[StepLog], scored: dict[str, ev.TokenLosses], norms: dict[str, pd.DataFrame],
                 costs: pd.DataFrame | None, export_dir: Path | None, export_diff: float | None,
                 export_note: str, clamp_info: dict[str, Any] | None = None) -> Result:
    topts = opts.train
    stats = {name: ev.loss_summary(tl.losses) for name, tl in scored.items()}
    ce_rows = []
    for name, st in stats.items():
        row: dict[str, Any] = {"model": name, **st}
        row["gap_vs_original"] = st["mean"] - stats["original"]["mean"]
        row["gap_vs_control"] = st["mean"] - stats["control"]["mean"] if "control" in stats else None
        ce_rows.append(row)
    ce = pd.DataFrame(ce_rows)
    grown = ev.grown_tokens(scored["original"], scored["LN-free"], eval_sample, lm.tokenizer, k=opts.top_tokens)
    hist = pd.DataFrame([{k: v for k, v in asdict(h).items() if k != "events"} | {"events": " ".join(h.events)}
                         for h in res.history])
    if ctrl_hist:
        ch = pd.DataFrame([{"step": h.step, "control_loss": h.loss, "control_ce": h.ce} for h in ctrl_hist])
        hist = hist.merge(ch, on="step", how="left")
    site_rows = []
    layers = {s.name: s.layer for s in res.removal.sites}
    for w in res.removal:
        site_rows.append({"site": w.site_name, "layer": layers.get(w.site_name), "role": w.role,
                          "removed": w.fully_frozen,
                          "divisor": w.divisor if w.divisor is not None else w.ema,
                          "first_token_divisor": w.divisor_first if w.divisor_first is not None else w.ema_first,
                          "frozen_at_step": w.frozen_at, "value_path_frozen_at_step": w.frozen_v_at})
    sites_df = pd.DataFrame(site_rows)
    if costs is not None:
        sites_df = sites_df.merge(costs[["site", "cost", "cost_with_first_token_divisor"]], on="site", how="left")
    norm_df = _norm_table(norms)
    phases = res.schedule.phase_starts()
    schedule_df = pd.DataFrame([{"phase": p, "label": PHASE_LABELS[p], "first_step": phases[p],
                                 "sites": sum(e.phase == p for e in res.schedule.events)}
                                for p in PHASES if p in phases])

    gap_c = ce.loc[ce.model == "LN-free", "gap_vs_control"].iloc[0]
    gap_o = ce.loc[ce.model == "LN-free", "gap_vs_original"].iloc[0]
    tokens = sum(h.tokens for h in res.history)
    ref_name = "control" if "control" in scored else "original"
    pos1 = damage_at_position(scored[ref_name], scored["LN-free"], 1)
    headlines: dict[str, Any] = {
        "damage_share_at_position_1": None if pos1 is None else round(pos1, 4),
        "damage_reference": ref_name,
        "p99_9_ln_free": round(stats["LN-free"]["p99_9"], 3),
        "ce_original": round(stats["original"]["mean"], 4),
        "ce_control": round(stats["control"]["mean"], 4) if "control" in stats else None,
        "ce_ln_free": round(stats["LN-free"]["mean"], 4),
        "gap_vs_control": round(gap_c, 4) if gap_c is not None else None,
        "gap_vs_original": round(gap_o, 4),
        "sites_removed": f"{res.removal.n_removed()} / {len(res.removal.wrappers)}",
        "steps": len(res.history),
        "tokens_trained": tokens,
        "skipped_steps": res.skipped,
        "diverged_at_step": res.diverged_at,
        "export": str(export_dir) if export_dir else None,
        "export_max_logit_diff": export_diff,
    }
    if clamp_info is not None:
        headlines.update({
            "clamp": final_clamp(res.removal),  # where --clamp-to loosened it to, not where it started
            "clamp_shape": "hard" if clamp_info.get("hard") else "soft",
            "clamp_share_of_tokens": round(clamp_info["share_any_site"], 5),
            "clamp_worst_site": clamp_info["worst_site"],
            "ce_ln_free_clamp_off": round(stats[CLAMP_OFF]["mean"], 4),
        })
    payload = {
        "model": lm.info.spec,
        "train_text": train_sample.to_dict(),
        "eval_text": eval_sample.to_dict(),
        "data_note": opts.data_note,
        "ce": ce_rows,
        "grown_tokens": grown.to_dict("records"),
        "sites": site_rows,
        "site_costs": costs.to_dict("records") if costs is not None else None,
        "schedule": res.schedule.to_dict(),
        "history": [asdict(h) for h in res.history],
        "control_history": [asdict(h) for h in ctrl_hist],
        "residual_norms": norm_df.to_dict("records"),
        "export_dir": str(export_dir) if export_dir else None,
        "export_max_logit_diff": export_diff,
        "resumed_from_step": res.resumed_from,
        "clamp_usage": clamp_info,
    }
    tables: dict[str, pd.DataFrame] = {"ce": ce, "grown_tokens": grown, "sites": sites_df, "schedule": schedule_df,
                                       "history": hist}
    if len(norm_df):
        tables["residual_norms"] = norm_df
    summary = _summary(lm, train_sample, eval_sample, opts, res, stats, ce, grown, norm_df, export_dir,
                       export_diff, export_note, tokens, costs)
    if clamp_info is not None:
        summary.insert(1, clamp_sentence(final_clamp(res.removal), clamp_info, stats))
    figures = _figures(res, ctrl_hist, scored, sites_df, norm_df, costs)
    settings = {**{k: v for k, v in asdict(topts).items() if k != "schedule"}, "schedule": asdict(topts.schedule),
                "control": opts.control, "sites": opts.sites or "all", "eps": opts.eps,
                "run_dir": str(opts.run_dir), "eval_text": eval_sample.to_dict(), "data": opts.data_note}
    return Result(analysis="remove-ln", title="LayerNorm / RMSNorm removal by fine-tuning",
                  meta=build_meta(lm, train_sample, **settings), payload=payload, tables=tables, figures=figures,
                  headlines=headlines, summary=summary, references=REFERENCES, labels=LABELS)


LABELS = {
    "damage_share_at_position_1": ("share of the LN-free model's extra loss at position 1 (none: no extra loss, "
                                   "or not finite)"),
    "damage_reference": "extra loss measured against",
    "p99_9_ln_free": "99.9th-percentile token loss, LN-free (nats)",
    "ce_ln_free": "held-out CE, LN-free",
    "ce_ln_free_clamp_off": "held-out CE, LN-free weights with the clamp off",
    "clamp": "clamp K (--clamp)",
    "clamp_shape": "clamp shape (--clamp-shape)",
    "clamp_share_of_tokens": "share of held-out tokens the clamp acts on (soft: > 1.1x as hard; hard: any)",
    "clamp_worst_site": "site whose clamp acts most often",
    "export_max_logit_diff": "export vs trained model, max logit difference",
}
"""Words for the remove-ln headline cards whose keys would read wrongly with underscores as spaces."""


CLAMP_OFF = "LN-free, clamp off"
"""The scored name of a soft-clamped run's weights evaluated without the clamp (pure frozen divisors)."""


def final_clamp(removal: Any) -> float:
    """The clamp K the trained model ends with (``--clamp-to`` loosens it from ``--clamp``; 0: none)."""
    return max((w.clamp for w in removal), default=0.0)


def clamp_sentence(k: float, info: dict[str, Any], stats: dict[str, dict[str, float]]) -> str:
    """What the clamp means for the "LN-free" numbers: the model is not LN-free where it acts."""
    off = stats[CLAMP_OFF]
    where = ("each removed site divides" if info["sites_clamped"] == info["sites_removed"]
             else f"{info['sites_clamped']} of its {info['sites_removed']} removed sites (--clamp-sites; the rest "
                  "divide by constants) divide")
    shape = (f"a hard clamp (--clamp {k:g} --clamp-shape hard): {where} by max(d, live/{k:g}), the constant d "
             f"for every token up to {k:g}x the site's scale, so it is LN-free for all tokens but those the knee "
             "catches" if info.get("hard") else
             f"a soft clamp (--clamp {k:g}): {where} by sqrt(d^2 + live^2/{k:g}^2), so it is not LN-free for the "
             "tokens the clamp catches")
    return (f"The \"LN-free\" model keeps {shape}. On the held-out text "
            f"{info['share_any_site']:.2%} of {info['tokens']:,} tokens were divided more than "
            f"{info['level']:g}x as hard as a token at the site's scale at some site ({info['worst_site']} "
            f"most often: {info['worst_site_share']:.2%}; largest ratio {info['max_ratio']:.3g}). The same weights "
            f"without the clamp (frozen divisors only) score {off['mean']:.4g} (median {off['median']:.3f}, 99th "
            f"percentile {off['p99']:.3g}).")


def damage_at_position(base: ev.TokenLosses, new: ev.TokenLosses, position: int) -> float | None:
    """Share of the total held-out loss increase (``new`` over ``base``, same tokens) that falls on the tokens
    predicted at ``position`` (position 1: predicted from the BOS alone). None when nothing got worse or a
    loss is not finite."""
    delta = new.losses.double() - base.losses.double()  # [n_tokens]
    total = float(delta.sum())
    if not torch.isfinite(delta).all() or total <= 0:
        return None
    return float(delta[new.pos == position].sum()) / total


def _norm_table(norms: dict[str, pd.DataFrame]) -> pd.DataFrame:
    out: pd.DataFrame | None = None
    for name, df in norms.items():
        d = df.rename(columns={"first_token": f"{name}_first_token", "other_tokens": f"{name}_other_tokens"})
        out = d if out is None else out.merge(d, on="layer")
    return out if out is not None else pd.DataFrame()


def _summary(lm: Any, train_sample: Any, eval_sample: Any, opts: RemoveLnOptions, res: Any,
             stats: dict[str, dict[str, float]], ce: pd.DataFrame, grown: pd.DataFrame, norm_df: pd.DataFrame,
             export_dir: Path | None, export_diff: float | None, export_note: str, tokens: int,
             costs: pd.DataFrame | None) -> list[str]:
    out = []
    o, f = stats["original"], stats["LN-free"]
    c = stats.get("control")
    n_rm, n_all = res.removal.n_removed(), len(res.removal.wrappers)
    data = opts.data_note or train_sample.source
    line = (f"After {len(res.history)} steps ({tokens:,} training tokens from {data}), {n_rm} of {n_all} norm "
            f"sites are removed. Held-out CE ({eval_sample.source}, {o['n_tokens']:,} tokens): original "
            f"{o['mean']:.4f}")
    if c is not None:
        line += f", fine-tuned control {c['mean']:.4f}"
    line += f", LN-free {f['mean']:.4f}"
    line += (f" ({f['mean'] - c['mean']:+.4f} nats vs the control)." if c is not None
             else f" ({f['mean'] - o['mean']:+.4f} nats vs the original; add --control for the fine-tuning-only "
                  "reference).")
    out.append(line)
    pub = PUBLISHED["GPT-2 small, OpenWebText"]
    xl = PUBLISHED["GPT-2 XL, OpenWebText"]
    out.append(
        f"Baroni et al. 2025 report, original / control / LN-free: GPT-2 small on OpenWebText {pub[0]} / {pub[1]} / "
        f"{pub[2]} ({pub[2] - pub[1]:+.4f} vs control, ~150M tokens), GPT-2 XL {xl[0]} / {xl[1]} / {xl[2]} "
        f"({xl[2] - xl[1]:+.4f}). Nobody has published removal for RMSNorm (Llama-family) models."
    )
    out.append(
        f"Tail of the per-token loss: median {o['median']:.3f} -> {f['median']:.3f}, 99th percentile "
        f"{o['p99']:.2f} -> {f['p99']:.2f}, 99.9th {o['p99_9']:.2f} -> {f['p99_9']:.2f}, maximum {o['max']:.2f} -> "
        f"{f['max']:.2f} (original -> LN-free). GPT-2 XL's LN-free model looked fine on its training distribution "
        "yet reached a mean CE of 130.2 on the Pile (median 1.09) from rare tokens: read the tail, not only the mean."
    )
    if f["n_tokens"] and f["mean"] != float("inf") and len(grown):
        g = grown.iloc[0]
        out.append(f"The token whose loss grew most: {g['token']!r} after {g['context']!r} "
                   f"({g['loss_before']:.2f} -> {g['loss_after']:.2f} nats).")
        at1 = int((grown["position"] == 1).sum()) if "position" in grown else 0
        if at1 * 2 > len(grown):
            out.append(f"{at1} of the {len(grown)} tokens whose loss grew most sit at position 1, predicted from "
                       "position 0: the first token's residual norm is far from the one frozen divisor, so its "
                       "predictions carry most of the damage.")
    if len(norm_df) and "LN-free_first_token" in norm_df:
        last = norm_df.iloc[-2] if len(norm_df) > 1 else norm_df.iloc[-1]
        out.append(
            f"First-token residual norm before the last block: {last['original_first_token']:.0f} originally vs "
            f"{last['LN-free_first_token']:.0f} LN-free (other tokens {last['original_other_tokens']:.0f} vs "
            f"{last['LN-free_other_tokens']:.0f}); Baroni et al. see GPT-2 small's BOS norm fall from ~3000 to ~300."
        )
    if res.diverged_at is not None:
        out.append(f"Training diverged: from step {res.diverged_at} on, every step overflowed (the last "
                   f"{topts_max(opts)} in a row), so it stopped after {len(res.history)} of {opts.train.steps} steps. "
                   "A frozen divisor lets an outlier token's activation grow through consecutive frozen MLPs; "
                   "slow the schedule (--gap-ln2, --ramp-steps), lower --lr, or remove fewer sites (--sites).")
    elif res.skipped:
        out.append(f"{res.skipped} of {len(res.history)} steps were skipped because the loss or gradient was not "
                   "finite (a frozen divisor let an outlier activation overflow).")
    if costs is not None and len(costs):
        worst = costs.sort_values("cost", ascending=False).iloc[0]
        out.append(f"Frozen alone without training, the costliest site is {worst['site']} "
                   f"({worst['cost']:+.3f} nats on training text); the median site costs "
                   f"{costs['cost'].median():+.4f}.")
    if export_dir is not None:
        extra = (" plus the BOS's keys and values per layer (bos_prefix.safetensors; feed them as "
                 "past_key_values and drop the BOS from the input)" if opts.train.exact_bos else "")
        k = final_clamp(res.removal)
        how = (f"every norm divides by sqrt({opts.eps:g}), the divisors folded into the gains" if not k
               else f"every norm divides by sqrt({opts.eps:g}), the divisors folded into the gains, and each "
                    f"{'clamped ' if opts.train.clamp_sites else ''}site keeps its hard knee at K = {k:g}: a "
                    "forward hook scales a token above K x the site's scale down to it (the manifest's "
                    "sites[].clamp; normscope's loader adds the hooks)" if opts.train.clamp_shape == "hard"
               else f"each {'clamped ' if opts.train.clamp_sites else ''}norm is an RMSNorm with its own eps K^2 d^2 "
                    f"and the gain K w, K = {k:g}: the "
                    "soft clamp; transformers' config holds one eps, so set each module's from the manifest's "
                    "sites[].folded_eps after loading, as normscope does")
        line = f"Exported to {export_dir} as a plain transformers checkpoint ({how}){extra}; "
        if export_diff is not None and export_diff == export_diff:  # not NaN
            line += f"its logits match the frozen model within {export_diff:.2e}."
        else:
            line += ("the frozen model's logits are not finite on the check batch, so the export differs from it: "
                     "where mean(x^2) grows past about eps * 6e-8 the exported norms normalise again instead of "
                     "dividing by a constant (raise --export-eps, or train until activations stay bounded).")
        out.append(line)
    elif export_note:
        out.append(export_note)
    return out


def topts_max(opts: RemoveLnOptions) -> int:
    return opts.train.max_nonfinite_run


def _figures(res: Any, ctrl_hist: list[StepLog], scored: dict[str, ev.TokenLosses], sites_df: pd.DataFrame,
             norm_df: pd.DataFrame, costs: pd.DataFrame | None) -> list[Figure]:
    figs: list[Figure] = []
    h = res.history
    fig = go.Figure()
    steps = [x.step for x in h]
    fig.add_trace(go.Scatter(x=steps, y=[x.ce for x in h], name="LN-free run: CE", mode="lines"))
    if any(x.kl for x in h):
        fig.add_trace(go.Scatter(x=steps, y=[x.kl for x in h], name="LN-free run: KL to original", mode="lines"))
    if any(x.aux for x in h):
        fig.add_trace(go.Scatter(x=steps, y=[x.aux for x in h], name="LN-free run: aux loss", mode="lines",
                                 yaxis="y2"))
    if ctrl_hist:
        fig.add_trace(go.Scatter(x=[x.step for x in ctrl_hist], y=[x.ce for x in ctrl_hist], name="control: CE",
                                 mode="lines", line={"dash": "dot"}))
    skipped = [x.step for x in h if x.skipped]
    if skipped:
        fig.add_trace(go.Scatter(x=skipped, y=[0] * len(skipped), mode="markers", name="skipped (non-finite)",
                                 marker={"symbol": "x", "color": "red"}))
    colors = {"ln2": "rgba(31,119,180,0.10)", "ln1qk": "rgba(255,127,14,0.10)", "ln1v": "rgba(44,160,44,0.10)",
              "qk_norm": "rgba(148,103,189,0.10)", "other": "rgba(140,86,75,0.10)", "final": "rgba(214,39,40,0.25)"}
    for phase in PHASES:
        ss = [e.step for e in res.schedule.events if e.phase == phase]
        if ss:
            fig.add_vrect(x0=min(ss) - 0.5, x1=max(ss) + 0.5, fillcolor=colors[phase], line_width=0,
                          annotation_text=phase, annotation_position="top left")
    if res.schedule.first_token_start is not None and res.schedule.first_token_end >= res.schedule.first_token_start:
        fig.add_vrect(x0=res.schedule.first_token_start - 0.5, x1=res.schedule.first_token_end + 0.5,
                      fillcolor="rgba(127,127,127,0.12)", line_width=0, annotation_text="pos-0 blend",
                      annotation_position="bottom left")
    fig.update_layout(title="Training curves with the removal phases shaded", xaxis_title="step",
                      yaxis_title="nats per token", yaxis2={"overlaying": "y", "side": "right", "title": "aux loss",
                                                            "showgrid": False},
                      template="plotly_white", legend={"orientation": "h", "y": -0.2})
    figs.append(Figure("Training curves", fig,
                       "Shaded bands are the removal phases (pre-MLP, pre-attention Q/K, pre-attention V, final); "
                       "look for CE spikes inside them and for how far the LN-free CE recovers towards the control."))
    fig = go.Figure()
    for name, tl in scored.items():
        x, y = ev.tail_curve(tl.losses)
        bad = 100.0 * tl.n_nonfinite / max(tl.losses.numel(), 1)
        label = f"{name} ({bad:.1f}% of tokens non-finite, not drawn)" if tl.n_nonfinite else name
        fig.add_trace(go.Scatter(x=x, y=y, name=label, mode="lines"))
    fig.update_layout(title="Per-token loss tail on held-out text", xaxis_title="per-token loss (nats)",
                      yaxis_title="share of tokens with at least this loss", yaxis_type="log",
                      template="plotly_white")
    figs.append(Figure("Per-token loss tail", fig,
                       "Curves that separate only at the right edge mean a few rare tokens got much worse "
                       "(GPT-2 XL's failure mode on the Pile)."))
    if len(sites_df):
        fig = go.Figure()
        n_blocks = int(sites_df["layer"].dropna().max()) + 1 if sites_df["layer"].notna().any() else 0
        for role, label in (("pre_attn", "pre-attention (ln1)"), ("pre_mlp", "pre-MLP (ln2)"),
                            ("qk_norm", "qk-norm"), ("final", "final norm"), ("other", "other")):
            d = sites_df[sites_df.role == role]
            if not len(d):
                continue
            xs = [n_blocks if pd.isna(x) else x for x in d["layer"]]  # the final norm after the last block
            fig.add_trace(go.Scatter(x=xs, y=d["divisor"], mode="lines+markers", name=f"{label}: shared divisor",
                                     text=list(d.site), hovertemplate="%{text}: %{y:.4g}<extra></extra>"))
            if d["first_token_divisor"].notna().any():
                fig.add_trace(go.Scatter(x=xs, y=d["first_token_divisor"], mode="markers",
                                         name=f"{label}: position 0", text=list(d.site),
                                         marker={"symbol": "diamond-open"},
                                         hovertemplate="%{text} (position 0): %{y:.4g}<extra></extra>"))
        fig.update_layout(title="Frozen divisor per site", xaxis_title="layer (final norm after the last block)",
                          yaxis_title="divisor (std or RMS)",
                          yaxis_type="log", template="plotly_white")
        figs.append(Figure("Divisors per site", fig,
                           "The gap between a site's position-0 and shared divisor is the massive activation the "
                           "frozen model must learn to live without."))
    if len(norm_df):
        fig = go.Figure()
        for col in norm_df.columns:
            if col == "layer":
                continue
            fig.add_trace(go.Scatter(x=norm_df["layer"], y=norm_df[col], mode="lines+markers", name=col,
                                     line={"dash": "dot" if "other" in col else "solid"}))
        fig.update_layout(title="Residual norm after each block: position 0 vs other tokens", xaxis_title="layer",
                          yaxis_title="mean L2 norm (log)", yaxis_type="log", template="plotly_white")
        figs.append(Figure("First-token norm before and after", fig,
                           "Solid lines are position 0, dotted the other tokens; removal should pull the first "
                           "token's norm towards the rest."))
    if costs is not None and len(costs):
        fig = go.Figure(go.Bar(x=costs["site"], y=costs["cost"], name="shared divisor"))
        if costs["cost_with_first_token_divisor"].notna().any():
            fig.add_trace(go.Bar(x=costs["site"], y=costs["cost_with_first_token_divisor"],
                                 name="with a position-0 divisor"))
        fig.update_layout(title="CE cost of freezing one site alone (no training)", xaxis_title="site",
                          yaxis_title="delta CE (nats)", barmode="group", template="plotly_white")
        figs.append(Figure("Per-site cost without training", fig,
                           "Tall bars are the sites a frozen divisor hurts most before any fine-tuning."))
    return figs

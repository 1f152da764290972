"""``normscope swap MODEL --to dyt|derf|seednorm``: every norm swapped for a point-wise function, then distilled."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from normscope.cli import app
from normscope.cli.common import check_output, eprint, finish, guarded, output_dir, quiet_libraries
from normscope.cli.options import OUTPUT, command
from normscope.cli.remove_ln import DEFAULT_SELF_GENERATED, RemovalProgress
from normscope.cli.training import load_texts, run_training, training_groups
from normscope.core.errors import NormscopeError
from normscope.core.io import slugify
from normscope.core.options import ModelOptions, OutputOptions, TextOptions, validate

EPILOG = ("Each site's function starts from a least-squares fit to the norm's output on --calib-batches of the "
    "training text (SeeDNorm starts exactly equal to an RMSNorm site); the page's per-site table shows its error "
    "before training. Training is remove-ln's loop (warmup and cosine, AdamW, checkpoints, --resume, Ctrl-C / "
    "SIGTERM save first) with KL distillation to the original model on by default. --control trains remove-ln's "
    "control in RUN_DIR/control; every target run in the same --run-dir reuses a finished one. BHyT is refused: "
    "its formula has no primary source. Encoders are refused: swap fine-tunes causal LMs for now.\n\n"
    "Examples:\n\n"
    "  normscope swap smollm2-135m --to dyt --text books/ --eval-text heldout.txt --steps 200 --control\n\n"
    "  normscope swap smollm2-135m --to derf --text books/ --eval-text heldout.txt --steps 200 --control  # same "
    "control\n\n"
    "  normscope swap smollm2-135m --to seednorm --steps 50 --ramp-steps 10   # self-generated text, gated in\n\n"
    "  normscope swap smollm2-135m --to dyt --text books/ --resume            # continue after a stop")


def _swap(
    model_opts: ModelOptions,
    text_opts: TextOptions,
    output_opts: OutputOptions,
    to: Annotated[str, typer.Option(
        "--to", help="The function every norm becomes: dyt (Zhu et al. 2025), derf (Chen et al. 2025) or "
        "seednorm (Cai et al. 2025).")] = "",
    eval_text: Annotated[list[Path] | None, typer.Option(
        "--eval-text", help="Held-out text for the CE table and the per-site error (never the training text). "
        "Default: built-in prompts.")] = None,
    self_generated: Annotated[int, typer.Option(
        "--self-generated", min=0, help="Train on N sequences sampled from the original model (the default when "
        "no --text or --dataset is given).")] = 0,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Optimizer steps.")] = 100,
    ramp_steps: Annotated[int, typer.Option(
        "--ramp-steps", min=1, help="Steps over which each site's output moves from the norm to the function "
        "(remove-ln's gate; 1: every site swapped at step 0).")] = 1,
    grad_accum: Annotated[int, typer.Option("--grad-accum", min=1, help="Micro-batches per step.")] = 1,
    eval_max_tokens: Annotated[int, typer.Option("--eval-max-tokens", min=1, help="Held-out tokens to score.")] = 16384,
    lr: Annotated[float, typer.Option("--lr", min=0.0, help="Peak learning rate (warmup, then cosine).")] = 2e-4,
    warmup: Annotated[int | None, typer.Option("--warmup", min=0, help="Warmup steps (default 5%).")] = None,
    weight_decay: Annotated[float, typer.Option("--weight-decay", min=0.0)] = 0.01,
    grad_clip: Annotated[float, typer.Option("--grad-clip", min=0.0, help="Max gradient norm (0: off).")] = 1.0,
    distill: Annotated[bool, typer.Option(
        "--distill/--no-distill", help="KL to the original model's next-token distribution (on by default).")] = True,
    distill_weight: Annotated[float, typer.Option("--distill-weight", min=0.0)] = 1.0,
    control: Annotated[bool, typer.Option(
        "--control", help="Also fine-tune with the norms kept (remove-ln's control, no distillation): the reference "
        "for the gap; reused when RUN_DIR/control already holds a finished one.")] = False,
    sites: Annotated[list[str] | None, typer.Option(
        "--sites", help="Swap only sites matching these globs (e.g. 'blocks.2[0-9].*', ln_final).")] = None,
    exact_bos: Annotated[bool, typer.Option(
        "--exact-bos", help="Position 0 keeps the original norm at every site (implies --bos yes): a fixed BOS has "
        "the same trajectory for every input, so its normalised value is a constant. On SmolLM2 it cuts the "
        "untrained swapped CE from 175 to 45 (DyT).")] = False,
    calib_batches: Annotated[int, typer.Option(
        "--calib-batches", min=1, help="Training micro-batches the per-site fit reads.")] = 4,
    save_every: Annotated[int, typer.Option("--save-every", min=0,
                                            help="Steps between checkpoints (0: end only).")] = 50,
    keep_checkpoints: Annotated[int, typer.Option("--keep-checkpoints", min=1,
                                                  help="Checkpoints kept per run.")] = 1,
    run_dir: Annotated[Path | None, typer.Option(
        "--run-dir", help="Checkpoints: RUN_DIR/TARGET and RUN_DIR/control. Default: runs/swap/MODEL/.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the latest checkpoint in --run-dir.")] = False,
) -> None:
    """Swap every norm for DyT, Derf or SeeDNorm, fitted per site from activation statistics, then distill.

    The Model, Text and Output groups are the ones every command has; the rest are swap's own options."""
    m, t, o = model_opts, text_opts, output_opts
    validate(m)
    validate(t)
    from normscope.swap.pipeline import check_target

    if not to:
        raise NormscopeError("Give the target with --to dyt, derf or seednorm.")
    target = check_target(to)
    if m.device_map != "none":
        raise NormscopeError(f"swap trains every weight, which --device-map {m.device_map} would offload or split; "
                             "drop --device-map.")
    if m.dtype not in ("auto", "float32", "bfloat16"):
        raise NormscopeError(f"swap trains in float32 or under bfloat16 autocast, not {m.dtype}; use --dtype bfloat16.")
    if ramp_steps > steps:
        raise NormscopeError(f"--ramp-steps {ramp_steps} is more than --steps {steps}: the gate would never reach "
                             "the swapped function; lower it or train longer.")
    if sum(bool(x) for x in (t.paths, t.dataset, self_generated)) > 1:
        raise NormscopeError("Give one source of training text: --text, --dataset or --self-generated.")
    if t.paths and eval_text:
        overlap = {p.resolve() for p in t.paths} & {p.resolve() for p in eval_text}
        if overlap:
            raise NormscopeError(f"{sorted(overlap)[0]} is both training and held-out text; give --eval-text a "
                                 "different file.")
    if t.bos not in ("auto", "yes", "no"):
        raise NormscopeError(f"--bos must be auto, yes or no, not '{t.bos}'.")
    bos = t.bos
    if exact_bos:
        if bos == "no":
            raise NormscopeError("--exact-bos needs a fixed BOS at position 0; drop --bos no.")
        bos = "yes"
    import torch

    from normscope.core.models import check_memory, load_model
    from normscope.removal.pipeline import self_generated_sample
    from normscope.swap.pipeline import SwapOptions, check, run, swap_train_options

    quiet_libraries()
    progress = RemovalProgress(o.quiet or o.json)
    torch.manual_seed(t.seed)
    folder = output_dir(slugify(m.model), o.out)
    check_output(folder, [f"swap-{target}"], o.force or resume)
    with progress.status(f"loading {m.model}"):
        lm = load_model(m.model, revision=m.revision, dtype="float32", device=m.device,
                        trust_remote_code=m.trust_remote_code, allow_pickle=m.allow_pickle)
    check_memory(lm, t.batch_size, t.seq_len, training=True)
    rdir = run_dir or Path("runs") / "swap" / lm.info.slug
    topts = swap_train_options(steps=steps, lr=lr, warmup=warmup, weight_decay=weight_decay, grad_clip=grad_clip,
                               grad_accum=grad_accum, distill_weight=distill_weight if distill else 0.0,
                               seed=t.seed, save_every=save_every, keep_checkpoints=keep_checkpoints,
                               precision=m.dtype, exact_bos=exact_bos)
    sopts = SwapOptions(target=target, train=topts, ramp_steps=ramp_steps, control=control, sites=sites,
                        run_dir=rdir, resume=resume, calib_batches=calib_batches)
    check(lm, sopts)
    if not t.paths and not t.dataset and not self_generated:
        self_generated = min(steps * grad_accum * t.batch_size, DEFAULT_SELF_GENERATED)
        if not o.quiet:
            eprint(f"no --text given: training on {self_generated} sequences sampled from the model itself "
                   "(--self-generated); give --text for your own corpus.")
    train_sample, data_note = None, ""
    if self_generated:
        train_sample = self_generated_sample(lm, self_generated, t.seq_len, t.batch_size, t.seed,
                                             cache=rdir / f"self-generated-{self_generated}x{t.seq_len}-s{t.seed}.pt",
                                             progress=progress)
        data_note = f"{self_generated} sequences of {t.seq_len} tokens sampled from {m.model} itself"
    train_sample, eval_sample, text_note = load_texts(
        lm, progress, paths=t.paths, dataset=t.dataset, seq_len=t.seq_len,
        max_tokens=t.max_tokens or steps * grad_accum * t.batch_size * t.seq_len, batch_size=t.batch_size,
        seed=t.seed, bos=bos, eval_text=eval_text, eval_max_tokens=eval_max_tokens, train_sample=train_sample)
    sopts.data_note = data_note or text_note
    result = run_training(run, lm, train_sample, eval_sample, sopts, progress=progress)
    finish(result, folder, quiet=o.quiet, as_json=o.json, table=_table(result))
    failure = run_failure(result.headlines)
    if failure:
        eprint(failure)
        raise typer.Exit(code=1)


def run_failure(headlines: dict[str, Any]) -> str | None:
    """The one-line reason a finished run failed (diverged, or a non-finite held-out CE)."""
    import math

    if headlines.get("diverged_at_step") is not None:
        return f"error: training diverged at step {headlines['diverged_at_step']}; lower --lr or use --ramp-steps."
    ce = headlines.get("ce_swapped")
    if ce is None or not math.isfinite(float(ce)):
        return f"error: the swapped model's held-out CE is {ce}; nothing usable was produced."
    return None


def _table(result: Any) -> Table:
    t = Table(title=f"swap {result.payload['model']} --to {result.payload['to']}  (held-out CE, nats per token)")
    for col in ("model", "mean", "median", "p99", "max", "vs control"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for r in result.payload["ce"]:
        gap = r.get("gap_vs_control")
        t.add_row(r["model"], f"{r['mean']:.4f}", f"{r['median']:.3f}", f"{r['p99']:.2f}", f"{r['max']:.2f}",
                  "" if gap is None else f"{gap:+.4f}")
    return t


# the shared groups as remove-ln composes them (it trains too), with swap's own notes
_TRAIN_MODEL, _TRAIN_TEXT = training_groups("swap")
_OWN = [p for n, p in inspect.signature(_swap, eval_str=True).parameters.items()
        if n not in ("model_opts", "text_opts", "output_opts")]
swap = guarded(command([_TRAIN_MODEL, _TRAIN_TEXT, OUTPUT], _swap, name="swap", doc=_swap.__doc__ or "", extra=_OWN))
app.command("swap", epilog=EPILOG,
            help="Swap every norm for DyT, Derf or SeeDNorm (fitted per site), then distill; the CE gap vs a "
                 "control.")(swap)

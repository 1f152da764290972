"""``normscope remove-ln MODEL``: fine-tune the norms away, export a plain checkpoint, report the CE gap."""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from normscope.cli import app
from normscope.cli.common import (
    Progressor,
    check_output,
    eprint,
    err_console,
    finish,
    guarded,
    output_dir,
    quiet_libraries,
)
from normscope.cli.options import OUTPUT, command
from normscope.cli.training import load_texts, run_training, training_groups
from normscope.core.errors import NormscopeError
from normscope.core.io import slugify
from normscope.core.options import ModelOptions, OutputOptions, TextOptions, validate


class RemovalProgress(Progressor):
    """The shared progress bars plus a training bar showing loss, CE, aux loss and the sites removed."""

    @contextlib.contextmanager
    def training(self, label: str, steps: int, start: int, n_sites: int) -> Iterator[Any]:
        if self.quiet:
            yield lambda log: None
            return
        # step and ETA first, the losses after: at 80 columns rich cuts from the right
        wide = err_console.width >= 120
        cols = [TextColumn("[bold]{task.description}"), BarColumn(bar_width=None if wide else 8),
                MofNCompleteColumn(), TimeRemainingColumn(),
                TextColumn("loss {task.fields[loss]} CE {task.fields[ce]}"
                           + (" aux {task.fields[aux]} KL {task.fields[kl]}" if wide else "")
                           + " off {task.fields[removed]}/" + str(n_sites))]
        with Progress(*cols, console=err_console, transient=True) as prog:
            tid = prog.add_task(label, total=steps, completed=start, loss="-", ce="-", aux="-", kl="-", removed=0)

            def on_step(log: Any) -> None:
                prog.update(tid, completed=log.step + 1, loss=f"{log.loss:.3f}", ce=f"{log.ce:.3f}",
                            aux=f"{log.aux:.3f}", kl=f"{log.kl:.3f}", removed=log.n_removed)
                if log.skipped:
                    prog.console.print(f"step {log.step}: non-finite loss or gradient, step skipped", highlight=False)

            yield on_step


DEFAULT_SELF_GENERATED = 512  # sequences sampled when no training text is given
Steps = Annotated[int, typer.Option(
    "--steps", min=2, help="Optimizer steps (the paper: 300 for GPT-2 small). At least 8 with the automatic "
    "schedule, and enough that it removes at most 3 norm paths a step (refused up front otherwise, with the "
    "number to give); at least 2 with --start and the --gap-* options.")]
Gap = Annotated[float | None, typer.Option(min=0.0)]


EPILOG = ("Cost: one training step is a forward and backward pass over --batch-size x --seq-len tokens per "
    "micro-batch (SmolLM2-135M, 8 x 128 tokens, 2 CPU cores: ~5 s); --distill adds a forward pass of the original "
    "model, --control runs every step twice. --dtype bfloat16 trains under bf16 autocast with fp32 weights and AdamW "
    "state (auto: so on GPUs that have bf16, fp32 on CPU). Checkpoints go to --run-dir; Ctrl-C or SIGTERM saves one "
    "first (under torchrun a signal to any process stops them all after the same step). "
    "On a machine shared with other jobs, OMP_NUM_THREADS=1 avoids thread oversubscription (measured here: a "
    "4 x 128 step took 40 s with 2 threads against a busy neighbour, 5.5 s with 1).\n\n"
    "Examples:\n\n"
    "  normscope remove-ln smollm2-135m --text books/ --eval-text heldout.txt --steps 300 --control\n\n"
    "  normscope remove-ln gpt2-xl --steps 500                  # trains on text the model samples itself\n\n"
    "  normscope remove-ln gpt2-xl --steps 500 --text owt/ --lr 1e-4 --aux-weight 0.01\n\n"
    "  normscope remove-ln smollm2-135m --self-generated 256 --distill --steps 200   # no corpus needed\n\n"
    "  normscope remove-ln smollm2-135m --text books/ --sites 'blocks.2[0-9].*' --sites ln_final --no-export\n\n"
    "  normscope remove-ln smollm2-135m --text books/ --resume                      # continue after a stop\n\n"
    "  torchrun --nproc-per-node 2 .venv/bin/normscope remove-ln MODEL --text books/ --grad-accum 2   # DDP\n\n"
    "  torchrun --nproc-per-node 4 .venv/bin/normscope remove-ln MODEL --text books/ --grad-accum 4 --fsdp "
    "--dtype bfloat16 --gradient-checkpointing   # sharded, less memory per GPU")


def _remove_ln(
    model_opts: ModelOptions,
    text_opts: TextOptions,
    output_opts: OutputOptions,
    eval_text: Annotated[list[Path] | None, typer.Option(
        "--eval-text",
        help="Held-out text for the CE table (never the training text). Default: built-in prompts.")] = None,
    self_generated: Annotated[int, typer.Option(
        "--self-generated", min=0,
        help="Train on N sequences sampled from the original model (no corpus needed; the default when no "
        "--text or --dataset is given, with N = steps x batch, at most 512).")] = 0,
    steps: Steps = 300,
    grad_accum: Annotated[int, typer.Option("--grad-accum", min=1,
                                            help="Micro-batches per step, over all processes.")] = 1,
    eval_max_tokens: Annotated[int, typer.Option("--eval-max-tokens", min=1,
                                                 help="Held-out tokens to score.")] = 16384,
    lr: Annotated[float, typer.Option("--lr", min=0.0, help="Peak learning rate (warmup, then cosine).")] = 2e-4,
    warmup: Annotated[int | None, typer.Option("--warmup", min=0, help="Warmup steps (default 5%).")] = None,
    weight_decay: Annotated[float, typer.Option("--weight-decay", min=0.0)] = 0.01,
    grad_clip: Annotated[float, typer.Option("--grad-clip", min=0.0, help="Max gradient norm (0: off).")] = 1.0,
    aux_weight: Annotated[float, typer.Option(
        "--aux-weight", min=0.0, help="Weight of the auxiliary loss on the spread of per-token norms.")] = 0.1,
    aux_sites: Annotated[str, typer.Option(
        "--aux-sites", help="final (the residual entering the final norm, as published), all, or none.")] = "final",
    aux_form: Annotated[str, typer.Option(
        "--aux-form", help="squared (the published form, divided by target^2) or log (bounded; for --aux-sites "
        "all).")] = "squared",
    distill: Annotated[bool, typer.Option(
        "--distill", help="Add a KL term to the original model's next-token distribution.")] = False,
    distill_weight: Annotated[float, typer.Option("--distill-weight", min=0.0)] = 1.0,
    control: Annotated[bool, typer.Option(
        "--control",
        help="Also fine-tune with the norms kept (same steps, data, CE + aux loss; no --distill): the paper's "
        "control, the reference for the gap.")] = False,
    first_token: Annotated[bool, typer.Option(
        "--first-token-divisor/--no-first-token-divisor",
        help="Give position 0 its own frozen divisor, blended into the shared one before the end.")] = True,
    split_v: Annotated[bool, typer.Option(
        "--split-v/--no-split-v", help="Remove the attention norm's path to V after its path to Q and K.")] = True,
    sites: Annotated[list[str] | None, typer.Option(
        "--sites", help="Remove only sites matching these globs (e.g. 'blocks.2[0-9].*', ln_final).")] = None,
    start: Annotated[int | None, typer.Option("--start", min=1, help="Step of the first removal.")] = None,
    gap_ln2: Annotated[float | None, typer.Option("--gap-ln2", min=0.0, help="Steps between pre-MLP norms.")] = None,
    gap_ln1qk: Annotated[float | None, typer.Option("--gap-ln1qk", min=0.0,
                                                    help="Steps between pre-attention Q/K paths.")] = None,
    gap_ln1v: Annotated[float | None, typer.Option("--gap-ln1v", min=0.0,
                                                   help="Steps between pre-attention V paths.")] = None,
    gap_qk_norm: Annotated[float | None, typer.Option("--gap-qk-norm", min=0.0,
                                                      help="Steps between qk-norms and other norms.")] = None,
    gap_final: Annotated[float | None, typer.Option("--gap-final", min=0.0,
                                                    help="Steps before the final norm.")] = None,
    first_token_steps: Annotated[int | None, typer.Option(
        "--first-token-steps", min=0, help="Steps over which position-0 divisors blend into the shared ones.")] = None,
    ramp_steps: Annotated[int | None, typer.Option(
        "--ramp-steps", min=1, help="Steps over which each removed site moves from its per-token to its frozen "
        "divisor (1: at once, as published; default 10% of --steps).")] = None,
    exact_bos: Annotated[bool, typer.Option(
        "--exact-bos", help="Exact BOS treatment (implies --bos yes): position 0 keeps its own divisor at every "
        "site for the whole run, which is exact because a fixed BOS has the same trajectory for every input; "
        "every site is removed for positions >= 1, and the export is a plain checkpoint plus the BOS's keys and "
        "values per layer (bos_prefix.safetensors).")] = False,
    taper: Annotated[bool, typer.Option(
        "--taper", help="A smooth global gate (TaperNorm): every site leaves together on one --ramp-steps ramp "
        "starting at --start, its fixed divisor following the running mean until the gate closes.")] = False,
    ramp_shape: Annotated[str, typer.Option(
        "--ramp-shape", help="linear or cosine (TaperNorm's gate: slow at both ends).")] = "linear",
    guard: Annotated[float, typer.Option(
        "--guard", min=0.0, help="Training only: normalise any token whose divisor exceeds this many times its "
        "site's frozen divisor down to that ratio, and penalise the excess, so a rare token running away through "
        "frozen SwiGLU MLPs gives a gradient instead of a skipped step (the export has no guard; 0: off).")] = 0.0,
    clamp: Annotated[float, typer.Option(
        "--clamp", min=0.0, help="A soft clamp kept in the export: a removed site divides by sqrt(d^2 + "
        "live^2/K^2), within 1/(2K^2) of its frozen d for ordinary tokens, while a runaway token is normalised "
        "down to K times the site's scale (an RMSNorm with eps K^2 d^2). Not LN-free for the tokens it "
        "catches; the report counts them (0: off).")] = 0.0,
    clamp_to: Annotated[float, typer.Option(
        "--clamp-to", min=0.0, help="Loosen the --clamp geometrically to this K between the step the gate closes "
        "and the last step, so the model ends nearly LN-free for every token up to ~K times its site's scale "
        "(0: the clamp stays).")] = 0.0,
    clamp_shape: Annotated[str, typer.Option(
        "--clamp-shape", help="soft: sqrt(d^2 + live^2/K^2), as above. hard: max(d, live/K), the --guard knee "
        "kept in the export: every token up to K times its site's scale is divided by the constant d exactly "
        "(LN-free for it), only the tokens above are normalised (the export applies the knee with a forward "
        "hook per site).")] = "soft",
    clamp_sites: Annotated[list[str] | None, typer.Option(
        "--clamp-sites", help="Clamp only the sites matching these globs (default: every removed site); e.g. "
        "'blocks.*' leaves the final norm a pure constant, so dla is exact on the export.")] = None,
    aux_anchor: Annotated[bool, typer.Option(
        "--aux-anchor", help="Fixed target for the final norm's aux loss: the calibrated mean divisor of "
        "ordinary tokens (TaperNorm's scale anchor).")] = False,
    momentum: Annotated[float, typer.Option("--momentum", min=0.0, max=1.0,
                                            help="EMA momentum of the divisors.")] = 0.9,
    save_every: Annotated[int, typer.Option("--save-every", min=0,
                                            help="Steps between checkpoints (0: end only).")] = 50,
    keep_checkpoints: Annotated[int, typer.Option(
        "--keep-checkpoints", min=1, help="Checkpoints kept per run (each is weights + AdamW state: about 12 "
        "bytes a parameter, 1.6 GB for SmolLM2-135M).")] = 2,
    log_sites: Annotated[bool, typer.Option(
        "--log-sites/--no-log-sites", help="Write RUN_DIR/ln-free/sites.jsonl: per step and site ||w||, "
        "||dw||/||w|| of the weights reading it, its worst token's divisor ratio, the first non-finite "
        "input.")] = True,
    run_dir: Annotated[Path | None, typer.Option(
        "--run-dir", help="Checkpoints and the exported model. Default: runs/remove-ln/MODEL/.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the latest checkpoint in --run-dir.")] = False,
    init_from: Annotated[Path | None, typer.Option(
        "--init-from", help="Warm start from an earlier run's --run-dir whose schedule finished: --steps more "
        "steps with every site already removed (and its control continued from that run's control), with a fresh "
        "optimizer and learning-rate schedule; --run-dir must be a new folder.")] = None,
    export: Annotated[bool, typer.Option("--export/--no-export", help="Write the plain LN-free checkpoint.")] = True,
    export_eps: Annotated[float, typer.Option(
        "--export-eps", min=1.0, help="eps of the exported norms: each divides by the constant sqrt(eps) while "
        "mean(x^2) < eps * 6e-8 (default 1e16: RMS up to ~24,000).")] = 1e16,
    export_dir: Annotated[Path | None, typer.Option(
        "--export-dir", help="Where the LN-free checkpoint goes. Default: RUN_DIR/ln-free-model.")] = None,
    only: Annotated[str | None, typer.Option(
        "--only", help="Train only 'ln-free' or 'control' and stop: run both in parallel processes, then the same "
        "command with --resume --control evaluates them.")] = None,
    site_costs: Annotated[bool, typer.Option(
        "--site-costs", help="First measure each site's CE cost when frozen alone, without training.")] = False,
    gradient_checkpointing: Annotated[bool, typer.Option(
        "--gradient-checkpointing", help="Recompute each block's activations in the backward pass instead of "
        "keeping them: less memory for one more forward pass of each block, the same losses.")] = False,
    fsdp: Annotated[bool, typer.Option(
        "--fsdp", help="Under torchrun: shard weights, gradients and AdamW state over the processes (FSDP2) "
        "instead of a full replica per process (DDP). --log-sites is off with it.")] = False,
) -> None:
    """Remove every LayerNorm / RMSNorm by fine-tuning (Baroni et al. 2025) and export a plain LN-free model.

    The Model, Text and Output groups are the ones every command has; the rest are remove-ln's own options."""
    m, t, o = model_opts, text_opts, output_opts
    text, dataset, seq_len, batch_size, max_tokens = t.paths, t.dataset, t.seq_len, t.batch_size, t.max_tokens
    seed, bos, device, quiet, as_json = t.seed, t.bos, m.device, o.quiet, o.json
    validate(m)
    validate(t)
    if m.device_map != "none":
        raise NormscopeError(f"remove-ln trains every weight, which --device-map {m.device_map} would offload or "
                             "split; drop --device-map (several GPUs: torchrun or accelerate launch, see the README).")
    if m.dtype not in ("auto", "float32", "bfloat16"):
        raise NormscopeError(f"remove-ln trains in float32 or under bfloat16 autocast (fp32 weights and AdamW state "
                             f"either way), not {m.dtype}, which would need loss scaling; use --dtype bfloat16.")
    import torch

    from normscope.core.models import check_memory, load_model
    from normscope.removal import RemoveLnOptions, ScheduleOptions, TrainOptions
    from normscope.removal.dist import rank_device
    from normscope.removal.pipeline import check, run, self_generated_sample
    from normscope.removal.train import check_clamp

    quiet_libraries()
    progress = RemovalProgress(quiet or as_json)
    if bos not in ("auto", "yes", "no"):
        raise NormscopeError(f"--bos must be auto, yes or no, not '{bos}'.")
    if exact_bos:
        if bos == "no":
            raise NormscopeError("--exact-bos needs a fixed BOS at position 0; drop --bos no.")
        bos = "yes"
    if fsdp and int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise NormscopeError("--fsdp shards the model over several processes; launch with torchrun "
                             "--nproc-per-node N (N >= 2), or drop --fsdp.")
    check_clamp(clamp, clamp_to, clamp_sites, clamp_shape)
    if ramp_shape not in ("linear", "cosine"):
        raise NormscopeError(f"--ramp-shape must be linear or cosine, not '{ramp_shape}'.")
    if sum(bool(x) for x in (text, dataset, self_generated)) > 1:
        raise NormscopeError("Give one source of training text: --text, --dataset or --self-generated.")
    if text and eval_text:
        overlap = {p.resolve() for p in text} & {p.resolve() for p in eval_text}
        if overlap:
            raise NormscopeError(f"{sorted(overlap)[0]} is both training and held-out text; give --eval-text a "
                                 "different file, or the CE table would report on text the model was tuned on.")
    if init_from is not None and not (init_from / ("control" if only == "control" else "ln-free")).is_dir():
        raise NormscopeError(f"--init-from {init_from} is not the --run-dir of an earlier remove-ln run (no "
                             f"{'control' if only == 'control' else 'ln-free'}/ folder in it).")
    if init_from is not None and run_dir is not None and run_dir.resolve() == init_from.resolve():
        raise NormscopeError("--init-from and --run-dir name the same folder; give the warm start a new --run-dir.")
    device = rank_device(device)  # under torchrun: this rank's own GPU
    torch.manual_seed(seed)
    model = m.model
    folder = output_dir(slugify(model), o.out)
    check_output(folder, ["remove-ln"], o.force or resume)  # --resume continues the run whose page this is
    with progress.status(f"loading {model}"):
        lm = load_model(model, revision=m.revision, dtype="float32", device=device,  # fp32 master weights
                        trust_remote_code=m.trust_remote_code, allow_pickle=m.allow_pickle)
    check_memory(lm, batch_size, seq_len, training=not gradient_checkpointing,
                 state_bytes_per_param=12)  # float32 gradients + AdamW's two moments
    if not lm.info.is_causal:
        raise NormscopeError(f"remove-ln fine-tunes next-token prediction, so it needs a causal LM; {model} is an "
                             "encoder.")
    rdir = run_dir or Path("runs") / "remove-ln" / lm.info.slug
    sched = ScheduleOptions(start=start, gap_ln2=gap_ln2, gap_ln1qk=gap_ln1qk, gap_ln1v=gap_ln1v,
                            gap_qk_norm=gap_qk_norm, gap_final=gap_final, first_token_steps=first_token_steps,
                            ramp_steps=ramp_steps, ramp_shape=ramp_shape, taper=taper)
    topts = TrainOptions(steps=steps, lr=lr, warmup=warmup, weight_decay=weight_decay, grad_clip=grad_clip,
                         grad_accum=grad_accum, aux_weight=aux_weight, aux_sites=aux_sites, aux_form=aux_form,
                         distill_weight=distill_weight if distill else 0.0, momentum=momentum,
                         first_token=first_token, split_value=split_v, schedule=sched, seed=seed,
                         save_every=save_every, keep_checkpoints=keep_checkpoints,
                         exact_bos=exact_bos, aux_anchor=aux_anchor, guard=guard, clamp=clamp, clamp_to=clamp_to,
                         clamp_sites=list(clamp_sites or []), clamp_shape=clamp_shape,
                         precision=m.dtype,
                         init_from=str(init_from) if init_from else None,
                         gradient_checkpointing=gradient_checkpointing, fsdp=fsdp, log_sites=log_sites and not fsdp)
    ropts = RemoveLnOptions(train=topts, control=control, sites=sites, run_dir=rdir, resume=resume, export=export,
                            export_dir=export_dir, site_costs=site_costs, only=only, eps=export_eps)
    check(lm, ropts)
    if not quiet and not as_json and int(os.environ.get("RANK", "0")) == 0:
        n_params = sum(p.numel() for p in {id(p): p for p in lm.model.parameters()}.values())
        ckpt_gb = 12 * n_params / 1e9  # fp32 weights + AdamW's two moments
        runs = 2 if control and only is None else 1
        total = runs * keep_checkpoints * ckpt_gb + (4 * n_params / 1e9 if export else 0.0)
        eprint(f"disk: up to {total:.1f} GB in {rdir} ({keep_checkpoints} checkpoint(s) of {ckpt_gb:.1f} GB per "
               f"run x {runs} run(s){' + the export' if export else ''}; --keep-checkpoints to change).")
    tokens_needed = max_tokens or steps * grad_accum * batch_size * seq_len
    if not text and not dataset and not self_generated:
        self_generated = min(steps * grad_accum * batch_size, DEFAULT_SELF_GENERATED)
        if not quiet:
            eprint(f"no --text given: training on {self_generated} sequences sampled from the model itself "
                   "(--self-generated); give --text for your own corpus.")
    train_sample, data_note = None, ""
    if self_generated:
        train_sample = self_generated_sample(lm, self_generated, seq_len, batch_size, seed,
                                             cache=rdir / f"self-generated-{self_generated}x{seq_len}-s{seed}.pt",
                                             progress=progress)
        data_note = (f"{self_generated} sequences of {seq_len} tokens sampled from {model} itself "
                     f"(temperature 1, seed {seed})")
    train_sample, eval_sample, text_note = load_texts(
        lm, progress, paths=text, dataset=dataset, seq_len=seq_len, max_tokens=tokens_needed,
        batch_size=batch_size, seed=seed, bos=bos, eval_text=eval_text, eval_max_tokens=eval_max_tokens,
        train_sample=train_sample)
    ropts.data_note = data_note or text_note
    result = run_training(run, lm, train_sample, eval_sample, ropts, progress=progress)
    if result is None:  # --only, or a non-zero rank of a distributed run
        if only and not quiet and int(os.environ.get("RANK", "0")) == 0:
            eprint(f"{only} run trained in {rdir}; evaluate with the same command plus --resume --control "
                   "(without --only).")
        return
    finish(result, folder, quiet=quiet, as_json=as_json, table=_table(result))
    failure = run_failure(result.headlines, export)
    if failure:
        eprint(failure)
        raise typer.Exit(code=1)
    if not quiet and not as_json:
        kind = result.headlines.get("export_kind")
        eprint(f"export: {kind} in {result.headlines.get('export')}" if kind else "export: none (--no-export)")


FAILED_GAP = 2.0  # nats above the original beyond which a finished run counts as failed (exit status 1)


def run_failure(headlines: dict[str, Any], export_asked: bool) -> str | None:
    """The one-line reason a finished run failed (diverged, non-finite held-out CE, no export when asked)."""
    import math

    if headlines.get("diverged_at_step") is not None:
        return (f"error: training diverged at step {headlines['diverged_at_step']} ({headlines.get('sites_removed')} "
                "sites removed); nothing was exported. Slow the schedule, lower --lr, or see sites.jsonl.")
    ce = headlines.get("ce_ln_free")
    if ce is None or not math.isfinite(float(ce)):
        return f"error: the LN-free model's held-out CE is {ce}; nothing usable was produced."
    ce0 = headlines.get("ce_original")
    if ce0 is not None and float(ce) > float(ce0) + FAILED_GAP:
        return (f"error: the LN-free model's held-out CE is {float(ce):.4g}, {float(ce) - float(ce0):.3g} nats above "
                f"the original's {float(ce0):.4f} (more than {FAILED_GAP:g}): the removal failed even though every "
                "step stayed finite.")
    if export_asked and not headlines.get("export"):
        return (f"error: an export was asked for but none was written ({headlines.get('sites_removed')} sites "
                "removed); see the report's note.")
    return None


def _table(result: Any) -> Table:
    t = Table(title=f"remove-ln: {result.payload['model']}  (held-out CE, nats per token)")
    for col in ("model", "mean", "median", "p99", "p99.9", "max", "vs control"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for r in result.payload["ce"]:
        gap = r.get("gap_vs_control")
        t.add_row(r["model"], f"{r['mean']:.4f}", f"{r['median']:.3f}", f"{r['p99']:.2f}", f"{r['p99_9']:.2f}",
                  f"{r['max']:.2f}", "" if gap is None else f"{gap:+.4f}")
    return t


# remove-ln is hand-written (training, not an analysis), but composes the same Model, Text and Output groups as
# every other command; its text defaults differ because it trains (see the notes in --help).
_TRAIN_MODEL, _TRAIN_TEXT = training_groups("remove-ln")
_OWN = [p for n, p in inspect.signature(_remove_ln, eval_str=True).parameters.items()
        if n not in ("model_opts", "text_opts", "output_opts")]
remove_ln = guarded(command([_TRAIN_MODEL, _TRAIN_TEXT, OUTPUT], _remove_ln, name="remove-ln",
                            doc=_remove_ln.__doc__ or "", extra=_OWN))
app.command("remove-ln", epilog=EPILOG,
            help="Remove every LayerNorm / RMSNorm by fine-tuning (Baroni et al. 2025) and export an LN-free "
                 "model.")(remove_ln)

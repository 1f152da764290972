"""The fine-tuning loop that removes the norms: optimizer, schedule, losses, checkpoints, resume, signals, DDP.

Recipe (Baroni et al. 2025, "Transformers Don't Need LayerNorm at Inference Time", code
``submarat/removing-layer-norm``): AdamW (weight decay 0.01, none on gains and biases), linear warmup then
cosine decay, gradient clipping at 1.0, cross-entropy plus an auxiliary loss on the spread of the per-token
norms entering the final norm. Options the paper did not have: a KL term to the original model's next-token
distribution (``distill_weight``), the auxiliary loss on every residual-reading site (``aux_sites="all"``),
and separate first-token divisors (see :mod:`normscope.removal.frozen`).

Nothing is lost: a checkpoint every ``save_every`` steps, written under a temporary name and renamed into
place; :func:`train` with ``resume=True`` continues from the latest one with the same weights, optimizer,
divisor state and random state; the learning rate, the data position and dropout are functions of the step,
so a resumed run gives the same losses as an uninterrupted one (bit-identical on CPU). SIGTERM or Ctrl-C
finish the step in flight, save, and raise :class:`TrainingStopped`. A step whose loss or gradient overflows
is skipped and its divisor statistics dropped; after ``max_nonfinite_run`` such steps in a row the run stops
as diverged.

Distributed: under ``torchrun`` / ``accelerate launch`` (``WORLD_SIZE`` > 1) the model is wrapped in
``DistributedDataParallel``, or sharded with FSDP2 (``fsdp``), and each rank takes its share of the
micro-batches of every step; divisor statistics and logged losses are all-reduced in one collective a step,
the stop request in another at its end (so a SIGTERM that reaches one rank stops every rank after the same
step), and dropout is seeded per micro-batch, so the losses equal those of one process with the same global
batch. See :mod:`normscope.removal.dist`.

Memory: ``precision="bfloat16"`` runs the forward and backward under bf16 autocast with fp32 master weights
and AdamW state (divisor statistics stay fp32/fp64); ``gradient_checkpointing`` recomputes each block's
activations in the backward pass (transformers' activation checkpointing; the same losses).
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from normscope.core.errors import NormscopeError
from normscope.removal.dist import Parallel, StopFlag, stop_codes, stop_name_of, stop_on_signals
from normscope.removal.frozen import Removal
from normscope.removal.schedule import Schedule, ScheduleOptions, build_schedule
from normscope.removal.writers import WriterUpdates, site_writers
from normscope.report import atomic_dir

CHECKPOINT_PREFIX = "ckpt-"
STATE_FILE = "state.json"
WEIGHTS_FILE = "model.safetensors"
TRAINER_FILE = "trainer.pt"


REMOVAL_ONLY = ("distill_weight", "momentum", "first_token", "split_value", "schedule", "aux_anchor", "guard",
                "guard_weight", "clamp", "clamp_to", "clamp_sites", "clamp_shape")
"""TrainOptions fields that only the LN-free run reads (a control ignores them)."""


@dataclass
class TrainOptions:
    """Settings of one fine-tuning run (the LN-free run and its control share them)."""

    steps: int = 300
    """Optimizer steps."""
    lr: float = 2e-4
    """Peak learning rate (the paper: 6e-4 for GPT-2 small at 2^19 tokens per step, 1e-4 for XL)."""
    min_lr_ratio: float = 0.1
    """The cosine decays to this fraction of ``lr``."""
    warmup: int | None = None
    """Linear warmup steps (default: 5% of the steps, at least 1; the paper: 25 of 300)."""
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    grad_accum: int = 1
    """Micro-batches per optimizer step, over all processes (the global batch is this times --batch-size)."""
    ce_weight: float = 1.0
    aux_weight: float = 0.1
    """Weight of the auxiliary loss on the spread of per-token norms (paper: 0.1 small, 0.01 XL)."""
    aux_sites: str = "final"
    """Where the auxiliary loss is measured: "final" (the residual entering the final norm, as in the paper)
    or "all" (the input of every residual-reading norm, which also pulls position 0's massive activation down
    in the middle layers)."""
    aux_form: str = "squared"
    """"squared": mean ((d - target) / target)^2, the paper's form normalised by target^2; "log":
    mean log(d / target)^2, bounded, for ``aux_sites="all"`` (see :func:`normscope.removal.frozen.aux_spread`)."""
    distill_weight: float = 0.0
    """Weight of KL(original || student) on next-token distributions (0: off, as in the paper)."""
    momentum: float = 0.9
    """EMA momentum of the tracked divisors (paper: 0.9)."""
    first_token: bool = True
    """Give position 0 its own frozen divisor until the schedule blends it into the shared one."""
    split_value: bool = True
    """Remove the pre-attention norms' path to V after their path to Q and K (paper); off: both at once."""
    schedule: ScheduleOptions = field(default_factory=ScheduleOptions)
    exact_bos: bool = False
    """Position 0 holds a fixed BOS and keeps its own live divisor at every site for the whole run: exact, since
    its trajectory is the same for every input (causal attention, RoPE identity at position 0). The aux loss
    then leaves position 0 out, and no blend window is scheduled; every site is removed for positions >= 1."""
    fixed_prefix: int = 1
    """With ``exact_bos``: how many leading positions are a fixed prefix kept on their own live divisors (1:
    the BOS alone; 2: BOS plus a fixed second token, when the first text token would carry a massive
    activation of its own)."""
    guard: float = 0.0
    """Training only: a token whose divisor exceeds ``guard`` x its site's frozen divisor is normalised down to
    that ratio, and the excess is penalised (``guard_weight`` x mean relu(log ratio / guard)^2 in the aux
    loss), so a rare runaway token through consecutive frozen SwiGLU MLPs gives a gradient instead of an
    overflowing, skipped step. The export has no guard; the held-out CE is measured on the export. 0: off."""
    guard_weight: float = 10.0
    clamp: float = 0.0
    """A soft clamp kept in the export (0: off): a removed site divides by ``sqrt(d^2 + live^2 / clamp^2)``
    instead of its frozen ``d``, so an ordinary token is within ``1 / (2 clamp^2)`` of LN-free and a runaway
    token is normalised down to ``clamp`` x the site's scale, in training and in the export alike (an RMSNorm
    with eps ``clamp^2 d^2`` and gain ``clamp w``). Not LN-free for the tokens it catches: the evaluation
    counts them."""
    clamp_to: float = 0.0
    """Loosen the soft clamp geometrically from ``clamp`` to ``clamp_to`` between the step the gate closes and
    the last step (:func:`clamp_at`), so the model ends within ``1 / (2 clamp_to^2)`` of LN-free for every token
    up to about ``clamp_to`` x its site's scale (0: the clamp stays at ``clamp``)."""
    clamp_shape: str = "soft"
    """``soft`` (``sqrt(d^2 + live^2 / K^2)``, an RMSNorm with a large eps) or ``hard``: ``max(d, live / K)``,
    the training guard's knee kept in the export. A hard clamp divides every token up to ``K`` x its site's
    scale by the constant ``d`` exactly (LN-free for those tokens) and normalises only the tokens above it;
    the export applies the knee with one forward hook per site (:mod:`normscope.core.lnfree`)."""
    clamp_sites: list[str] = field(default_factory=list)
    """Globs of the sites the soft clamp applies to (empty: every removed site). Leaving ``ln_final`` out keeps
    the final norm a pure constant, so direct logit attribution is exact while the inner sites stay bounded."""
    aux_anchor: bool = False
    """Give the final norm's aux loss a fixed target, the calibrated mean divisor of positions >= 1 (TaperNorm's
    scale anchor), instead of the batch mean."""
    init_from: str | None = None
    """Warm start: the folder of an earlier run (its RUN_DIR). The LN-free run starts from the latest checkpoint
    of that run's ``ln-free`` part, with its divisors and every site as that run left them (its schedule must
    have finished), and trains ``steps`` more with nothing left to remove; the control starts from that run's
    ``control`` part. The optimizer, warmup and cosine start afresh."""
    seed: int = 0
    save_every: int = 50
    """Steps between checkpoints (0: only at the end and on a signal)."""
    keep_checkpoints: int = 2
    """Checkpoints kept in the run folder (older ones are deleted after each save)."""
    log_sites: bool = True
    """Write ``sites.jsonl``: per step and site, the gain norm ||w||, the relative update ||dw||/||w|| of the
    weights reading the site, and the largest divisor at positions >= 1 over the site's divisor, with its
    token, and the relative update of the weights writing into the site (``normscope.removal.writers``); plus
    the first site (forward order) whose input was non-finite."""
    precision: str = "auto"
    """"auto": bf16 autocast on GPUs that have it, fp32 elsewhere; "float32": no autocast; "bfloat16": bf16
    autocast on any device. The master weights and the AdamW state stay fp32 either way."""
    gradient_checkpointing: bool = False
    """Recompute each block's activations in the backward pass instead of keeping them (less memory, about
    one more forward pass of time; the losses are the same)."""
    fsdp: bool = False
    """Shard parameters, gradients and AdamW state over the processes (FSDP2 ``fully_shard``) instead of
    DDP's full replica per rank."""
    skip_nonfinite: bool = True
    """Skip an optimizer step whose loss or gradient is not finite (and count it) instead of failing."""
    max_nonfinite_run: int = 10
    """Stop early (diverged) after this many non-finite steps in a row: a frozen model whose forward pass
    overflows on every batch cannot recover, since skipped steps change nothing (0: never stop)."""

    def identity(self, control: bool = False) -> dict[str, Any]:
        """The settings a resumed run must share with the run it continues. A control keeps every norm, so
        the removal-only settings do not change it: one control serves every removal variant on the same data
        and optimizer settings."""
        d = asdict(self)
        for k in ("save_every", "keep_checkpoints", "log_sites", "gradient_checkpointing") + (
                REMOVAL_ONLY if control else ()):
            d.pop(k)
        if d.get("clamp_shape") == "soft":
            d.pop("clamp_shape")  # the default: runs saved before --clamp-shape existed stay resumable
        return d


@dataclass
class StepLog:
    """One optimizer step: the losses are means over its global batch."""

    step: int
    loss: float
    ce: float
    aux: float
    kl: float
    lr: float
    grad_norm: float
    n_removed: int
    blend: float
    skipped: bool
    tokens: int
    seconds: float
    events: list[str] = field(default_factory=list)


def clamp_at(step: int, k0: float, k1: float, closed: int, steps: int) -> float:
    """The soft clamp at ``step``: ``k0`` until the gate has closed (step ``closed``), then geometric to ``k1`` at
    the last step (``steps - 1``); ``k0`` throughout when ``k1`` is 0 or not above ``k0``."""
    if k1 <= k0 or step <= closed:
        return k0
    t = min(1.0, (step - closed) / max(steps - 1 - closed, 1))
    return float(math.exp((1.0 - t) * math.log(k0) + t * math.log(k1)))


def site_clamp(name: str, k: float, globs: list[str]) -> float:
    """The soft clamp of site ``name``: ``k`` where it matches one of ``globs`` (all sites when empty), else 0."""
    return k if not globs or any(fnmatch.fnmatchcase(name, g) for g in globs) else 0.0


def check_clamp_sites(names: list[str], globs: list[str]) -> None:
    """One line when ``--clamp-sites`` matches none of the removed sites ``names``."""
    if globs and not any(site_clamp(n, 1.0, globs) for n in names):
        raise NormscopeError(f"--clamp-sites {' '.join(globs)} matches no removed site; names look like "
                             f"{', '.join(names[:3])}, ... (see `normscope sites MODEL`).")


def check_clamp(clamp: float, clamp_to: float, clamp_sites: list[str] | None = None, shape: str = "soft") -> None:
    """One line for a --clamp-to, --clamp-sites or --clamp-shape hard without --clamp, a --clamp-to below it, or
    an unknown shape."""
    if shape not in ("soft", "hard"):
        raise NormscopeError(f"--clamp-shape must be soft or hard, not '{shape}'.")
    if shape == "hard" and not clamp:
        raise NormscopeError("--clamp-shape hard sets the shape of the clamp; give --clamp K too (the knee).")
    if clamp_sites and not clamp:
        raise NormscopeError("--clamp-sites chooses where the soft clamp applies; give --clamp K too.")
    if clamp_to and not clamp:
        raise NormscopeError("--clamp-to loosens the soft clamp; give --clamp K too (the value it starts from).")
    if clamp_to and clamp_to < clamp:
        raise NormscopeError(f"--clamp-to {clamp_to:g} is below --clamp {clamp:g}; the clamp only loosens, so give "
                             "a larger --clamp-to or none.")


class TrainingStopped(Exception):
    """Raised after a SIGTERM or Ctrl-C was handled: the checkpoint of ``step`` is at ``path``."""

    def __init__(self, step: int, path: Path | None, signame: str) -> None:
        super().__init__(f"stopped by {signame} after step {step}; checkpoint: {path}")
        self.step, self.path, self.signame = step, path, signame


@dataclass
class TrainResult:
    history: list[StepLog]
    removal: Removal
    schedule: Schedule
    run_dir: Path
    resumed_from: int | None
    skipped: int
    seconds: float
    diverged_at: int | None = None
    full_state: dict[str, torch.Tensor] | None = None
    """Under FSDP, on rank 0: the unsharded weights (the model itself stays sharded; see
    :func:`normscope.removal.dist.plain_copy`)."""


# ---- pure helpers ---------------------------------------------------------------------------------------
def lr_factor(step: int, steps: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay from 1 to ``min_ratio`` at the last step."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(steps - warmup - 1, 1)
    t = min(max((step - warmup) / span, 0.0), 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def next_token_ce(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy. logits ``[batch, pos, vocab]``, input_ids ``[batch, pos]``."""
    pred = logits[:, :-1].float()  # [batch, pos-1, vocab]
    return F.cross_entropy(pred.reshape(-1, pred.shape[-1]), input_ids[:, 1:].reshape(-1))


def next_token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per predicted token, averaged: the distillation term. Both ``[batch, pos, vocab]``."""
    s = F.log_softmax(student_logits[:, :-1].float(), dim=-1).flatten(0, 1)  # [n, vocab]
    t = F.log_softmax(teacher_logits[:, :-1].float(), dim=-1).flatten(0, 1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


def data_order(n_batches: int, seed: int, epoch: int) -> list[int]:
    """The order of the micro-batches in one pass over the data (a seeded permutation per epoch)."""
    g = torch.Generator().manual_seed(1_000_003 * (seed + 1) + epoch)
    return torch.randperm(n_batches, generator=g).tolist()


class DataCursor:
    """Maps the global micro-batch number to a batch index, epoch by epoch (stateless given the number)."""

    def __init__(self, n_batches: int, seed: int) -> None:
        self.n, self.seed = n_batches, seed
        self._cache: dict[int, list[int]] = {}

    def index(self, position: int) -> int:
        epoch, i = divmod(position, self.n)
        if epoch not in self._cache:
            self._cache = {epoch: data_order(self.n, self.seed, epoch)}
        return self._cache[epoch][i]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices, none on gains, biases and other 1-D parameters (as HF does)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def model_fingerprint(model: nn.Module) -> dict[str, Any]:
    """What identifies a model for --resume: its class, config hash and parameter count."""
    cfg = getattr(model, "config", None)
    d = cfg.to_dict() if cfg is not None else {}
    for k in ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "_attn_implementation",
              "_attn_implementation_autoset", "use_cache", "architectures"):
        d.pop(k, None)
    blob = json.dumps(d, sort_keys=True, default=str).encode()
    n = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return {"class": type(model).__name__, "config_sha1": hashlib.sha1(blob).hexdigest()[:16], "n_params": n}


def data_fingerprint(batches: list[Any]) -> str:
    h = hashlib.sha1()
    for b in batches:
        h.update(b.input_ids.detach().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


# ---- checkpoints ----------------------------------------------------------------------------------------
def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints in ``run_dir``, oldest first (a checkpoint folder exists only once complete)."""
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir()
             if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and (p / STATE_FILE).exists()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(run_dir: Path) -> Path | None:
    ck = list_checkpoints(run_dir)
    return ck[-1] if ck else None


def _fsync_tree(folder: Path) -> None:
    for p in folder.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, optimizer: Any, state: dict[str, Any],
                    keep: int = 2, *, weights: dict[str, torch.Tensor] | None = None,
                    optimizer_state: dict[str, Any] | None = None) -> Path:
    """Write ``run_dir/ckpt-<step>`` atomically: a temporary folder, fsynced, then renamed into place.

    ``step`` is the number of optimizer steps done. Older checkpoints beyond ``keep`` are deleted afterwards.
    ``weights`` / ``optimizer_state``: the gathered full states of a sharded (FSDP) model, saved instead of
    ``model``'s and ``optimizer``'s own.
    """
    from safetensors.torch import save_file, save_model

    target = run_dir / f"{CHECKPOINT_PREFIX}{step:06d}"
    with atomic_dir(target) as tmp:  # the same step may be saved again (a resumed run that stops at once)
        if weights is not None:
            save_file(weights, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        else:
            save_model(model, str(tmp / WEIGHTS_FILE))
        opt_sd = optimizer_state if optimizer_state is not None else optimizer.state_dict()
        torch.save({"optimizer": opt_sd, "rng_cpu": torch.get_rng_state(),
                    "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
                   tmp / TRAINER_FILE)
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1, allow_nan=True))
        _fsync_tree(tmp)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return target


def read_state(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / STATE_FILE).read_text())


def check_resumable(state: dict[str, Any], fingerprint: dict[str, Any], identity: dict[str, Any],
                    data_fp: str, ckpt: Path) -> None:
    """One-line errors when a checkpoint belongs to another model, other settings or other data."""
    if state.get("fingerprint") != fingerprint:
        theirs = state.get("fingerprint", {})
        raise NormscopeError(
            f"The checkpoint {ckpt} was made for another model ({theirs.get('class')}, "
            f"{theirs.get('n_params')} parameters) than this one ({fingerprint['class']}, "
            f"{fingerprint['n_params']}); resume with the same model or choose another --run-dir."
        )
    theirs_opts = dict(state.get("options", {}))
    for k, v in asdict(TrainOptions()).items():  # a setting added after the checkpoint was written: its default
        if k in identity:
            theirs_opts.setdefault(k, v)
    diff = [k for k in sorted(set(identity) | set(theirs_opts))
            if json.dumps(identity.get(k), sort_keys=True) != json.dumps(theirs_opts.get(k), sort_keys=True)]
    if diff:
        k = diff[0]
        raise NormscopeError(
            f"The checkpoint {ckpt} was made with {k}={state['options'].get(k)!r}, this run asks for "
            f"{identity.get(k)!r}; resume with the settings of the original run."
        )
    if state.get("data") != data_fp:
        raise NormscopeError(f"The checkpoint {ckpt} was trained on other text; resume with the same --text, "
                             "--seq-len, --batch-size and --max-tokens (or --self-generated) as the original run.")


# ---- the loop -------------------------------------------------------------------------------------------
def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype of a run (None: plain fp32); see :attr:`TrainOptions.precision`."""
    if precision not in ("auto", "float32", "bfloat16"):
        raise NormscopeError(f"remove-ln trains in float32 or under bfloat16 autocast, not {precision}; use --dtype "
                             "bfloat16 (float16 would need loss scaling) or float32.")
    if precision == "bfloat16" or (precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return None


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    """Autocast to ``dtype`` (fp32 master weights stay as they are); nothing when ``dtype`` is None."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Transformers' activation checkpointing on every block (non-reentrant), or a one-line refusal."""
    fn = getattr(model, "activation_checkpointing_enable", None) or getattr(model, "gradient_checkpointing_enable",
                                                                            None)
    if fn is None or not getattr(model, "supports_gradient_checkpointing", False):
        raise NormscopeError(f"{type(model).__name__} does not support gradient checkpointing in transformers; drop "
                             "--gradient-checkpointing (or lower --batch-size to save memory).")
    fn({"use_reentrant": False})


def _aux_site_names(removal: Removal, which: str) -> list[str]:
    if which == "final":
        names = [w.site_name for w in removal if w.role == "final"]
        return names or [list(removal.wrappers)[-1]]
    if which == "all":
        return [w.site_name for w in removal if w.role in ("pre_attn", "pre_mlp", "final", "other")]
    if which == "none":
        return []
    raise NormscopeError(f"--aux-sites must be final, all or none, not '{which}'.")


def warm_start_checkpoint(init_dir: Path, control: bool) -> Path:
    """The checkpoint a warm start (``--init-from RUN_DIR``) continues: the latest of the earlier run's part."""
    part = init_dir / ("control" if control else "ln-free")
    ckpt = latest_checkpoint(part) if part.is_dir() else None
    if ckpt is None:
        raise NormscopeError(f"--init-from {init_dir} holds no checkpoint in {part.name}/; give the --run-dir of "
                             f"an earlier remove-ln run{' that trained a control' if control else ''}.")
    return ckpt


def warm_start(model: nn.Module, removal: Removal, ckpt: Path, fingerprint: dict[str, Any], device: torch.device,
               control: bool, opts: TrainOptions) -> None:
    """Load an earlier run's weights and (LN-free) its divisor state; its schedule must have finished."""
    from safetensors.torch import load_model

    state = read_state(ckpt)
    if state.get("fingerprint") != fingerprint:
        theirs_class = state.get("fingerprint", {}).get("class")
        raise NormscopeError(f"--init-from: {ckpt} was made for another model ({theirs_class}); give the run of "
                             "this model.")
    load_model(model, str(ckpt / WEIGHTS_FILE), device=str(device))
    if control:
        return
    theirs = state.get("removal", {})
    unfinished = [n for n, st in theirs.items() if not (st.get("frozen") and st.get("ramp", 0) >= 1.0 and (
        not st.get("split_v") or (st.get("frozen_v") and st.get("ramp_v", 0) >= 1.0)))]
    if set(theirs) != set(removal.wrappers) or unfinished:
        raise NormscopeError(f"--init-from: the run in {ckpt.parent} had not removed every site "
                             f"({len(unfinished)} still live or ramping); resume it with --resume instead.")
    removal.load_state(theirs)
    for w in removal:  # this run's guard and clamp, not the earlier one's
        w.guard, w.guard_weight = opts.guard, opts.guard_weight
        w.clamp = site_clamp(w.site_name, opts.clamp, opts.clamp_sites)
        w.clamp_hard = opts.clamp_shape == "hard"


def train(
    model: nn.Module,
    layout: Any,
    sites: list[Any],
    batches: list[Any],
    opts: TrainOptions,
    run_dir: Path,
    *,
    control: bool = False,
    remove: list[str] | None = None,
    teacher: nn.Module | None = None,
    resume: bool = False,
    progress: Callable[[StepLog], None] | None = None,
    stop: StopFlag | None = None,
    extra_state: dict[str, Any] | None = None,
    wrapper: Callable[..., Any] | None = None,
    schedule: Schedule | None = None,
    identity_extra: dict[str, Any] | None = None,
) -> TrainResult:
    """Fine-tune ``model`` in place while its norm ``sites`` are removed on schedule (never when ``control``).

    Every site is wrapped (live sites are bit-identical to the original); ``remove`` names the sites the
    schedule removes (default: all). ``batches`` are the training micro-batches
    (:class:`normscope.core.text.TokenBatch`), visited in a seeded order, epoch after epoch. ``teacher`` (the
    original model, eval mode) is needed when
    ``opts.distill_weight`` > 0. The wrappers stay installed on return (``result.removal``), ready for export
    (under FSDP the model stays sharded, and rank 0 gets the full weights in ``result.full_state``).

    Other uses of the same loop (``normscope swap``): ``wrapper`` builds each site's wrapper instead of
    :class:`~normscope.removal.frozen.FrozenNorm` (see :class:`~normscope.removal.frozen.Removal`), ``schedule``
    replaces the removal schedule (a control ignores both), and ``identity_extra`` joins the settings a resume
    must share.
    """
    device = next(model.parameters()).device
    amp = autocast_dtype(device, opts.precision)
    par = Parallel(device, fsdp=opts.fsdp)
    rank, world = par.rank, par.world
    if opts.grad_accum % world:
        raise NormscopeError(f"--grad-accum {opts.grad_accum} must be a multiple of the {world} processes.")
    if opts.distill_weight > 0 and teacher is None:
        raise ValueError("distillation needs the teacher model")
    if not batches:
        raise NormscopeError("There is no training text; give --text files or --self-generated N.")
    if opts.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    torch.manual_seed(opts.seed)
    removal = Removal(model, layout, sites, momentum=opts.momentum, first_token=opts.first_token,
                      split_value=opts.split_value, **({"wrapper": wrapper} if wrapper and not control else {}))
    split = {w.site_name: w.split_v for w in removal}
    chosen = [s for s in sites if remove is None or s.name in set(remove)]
    # a control removes nothing: it needs no schedule, and must not be refused for one it would never run
    if control or opts.init_from:
        schedule = Schedule(opts.steps, [])
    elif schedule is None:
        schedule = build_schedule(chosen, opts.steps, opts.schedule, split=split,
                                  first_token=opts.first_token and not opts.exact_bos)
    for w in removal:
        w.aux_skip_first = opts.fixed_prefix if opts.exact_bos else 0
        if not control:
            w.n_fixed = opts.fixed_prefix if opts.exact_bos else 0
            w.follow = opts.schedule.taper
            w.guard, w.guard_weight = opts.guard, opts.guard_weight
            w.clamp = site_clamp(w.site_name, opts.clamp, opts.clamp_sites)
            w.clamp_hard = opts.clamp_shape == "hard"
    if not control:
        check_clamp_sites(list(removal.wrappers), opts.clamp_sites)
    aux_names = _aux_site_names(removal, opts.aux_sites)
    # the site log reads whole weights on rank 0 alone, which a sharded model cannot do without the others
    watch = (SiteWatch(removal, site_consumers(layout, removal), WriterUpdates(site_writers(model, layout, sites)))
             if opts.log_sites and rank == 0 and par.mode != "fsdp" else None)
    if opts.aux_form not in ("squared", "log"):
        raise NormscopeError(f"--aux-form must be squared or log, not '{opts.aux_form}'.")
    for p in model.parameters():
        p.requires_grad_(True)
    warmup = opts.warmup if opts.warmup is not None else max(1, round(0.05 * opts.steps))
    fingerprint = model_fingerprint(model)
    data_fp = data_fingerprint(batches)
    identity = {**opts.identity(control), "control": control}
    if not control:
        identity["remove"] = sorted(s.name for s in chosen)
        identity.update(identity_extra or {})
    history: list[StepLog] = []
    cursor = DataCursor(len(batches), opts.seed)
    per_step = opts.grad_accum
    start_step, resumed_from = 0, None
    finished = False
    optimizer_state: dict[str, Any] | None = None

    ckpt = latest_checkpoint(run_dir)
    if resume:
        if ckpt is None:
            raise NormscopeError(f"--resume was given but {run_dir} holds no checkpoint; run without --resume "
                                 "to start, or point --run-dir at the run to continue.")
        state = read_state(ckpt)
        check_resumable(state, fingerprint, identity, data_fp, ckpt)
        from safetensors.torch import load_model

        load_model(model, str(ckpt / WEIGHTS_FILE), device=str(device))
        # onto this rank's device (without map_location every rank would load onto the GPU rank 0 saved from);
        # a sharded run reads the full optimizer state memory-mapped on the CPU, and rank 0 scatters it
        tr = torch.load(ckpt / TRAINER_FILE, weights_only=True, map_location="cpu" if par.mode == "fsdp" else device,
                        mmap=par.mode == "fsdp")
        optimizer_state = tr["optimizer"]
        torch.set_rng_state(tr["rng_cpu"].cpu())
        if tr.get("rng_cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([t.cpu() for t in tr["rng_cuda"]])
        removal.load_state(state["removal"])
        history = [StepLog(**h) for h in state["history"]]
        start_step = resumed_from = int(state["step"])
        finished = bool(state.get("done"))
    elif ckpt is not None:
        raise NormscopeError(f"{run_dir} already holds checkpoints of an earlier run; add --resume to continue "
                             "it, or choose another --run-dir.")
    elif opts.init_from:
        warm_start(model, removal, warm_start_checkpoint(Path(opts.init_from), control), fingerprint, device,
                   control, opts)
    else:
        _calibrate(model, removal, batches, cursor, per_step, par, amp)
        if opts.aux_anchor and not control:
            for w in removal:
                if w.role == "final":
                    w.aux_target = w.ema

    wrapped: Any = par.wrap(model, layout)  # the model, DDP around it, or the model sharded in place
    optimizer = torch.optim.AdamW(param_groups(model, opts.weight_decay), lr=opts.lr)
    if optimizer_state is not None:
        if par.mode == "fsdp":
            par.load_full_optimizer_state(model, optimizer, optimizer_state if rank == 0 else {})
        else:
            optimizer.load_state_dict(optimizer_state)
        optimizer_state = None
    flag = stop or StopFlag()
    t_start = time.perf_counter()
    seq_tokens = int(batches[0].input_ids.numel())

    def state_dict_for(step: int, done: bool) -> dict[str, Any]:
        return {"step": step, "done": done, "control": control, "fingerprint": fingerprint, "options": identity,
                "data": data_fp, "removal": removal.state(), "schedule": schedule.to_dict(),
                "history": [asdict(h) for h in history], **(extra_state or {})}

    def checkpoint(step: int, done: bool) -> Path | None:
        path, weights, optim = None, None, None
        if par.mode == "fsdp":  # collectives: every rank gathers, rank 0 writes
            weights, optim = par.full_model_state(model), par.full_optimizer_state(model, optimizer)
        if rank == 0:
            path = save_checkpoint(run_dir, step, model, optimizer, state_dict_for(step, done),
                                   keep=opts.keep_checkpoints, weights=weights, optimizer_state=optim)
        par.barrier()
        return path

    diverged_at: int | None = None
    run_nonfinite = 0
    for h in reversed(history):  # a resumed run continues the count
        if not h.skipped:
            break
        run_nonfinite += 1
    with stop_on_signals(flag):
        for step in range(start_step, start_step if finished else opts.steps):
            t0 = time.perf_counter()
            lr_now = opts.lr * lr_factor(step, opts.steps, warmup, opts.min_lr_ratio)
            for g in optimizer.param_groups:
                g["lr"] = lr_now
            events = [] if control else schedule.at(step)
            for e in events:
                removal[e.site].freeze(step, e.path)
            if not control:
                for e in schedule.events:
                    if e.step <= step:
                        setattr(removal[e.site], "ramp" if e.path == "main" else "ramp_v", schedule.ramp(e, step))
            blend = schedule.blend(step)
            k_now = (clamp_at(step, opts.clamp, opts.clamp_to, schedule.done_by, opts.steps)
                     if not control and opts.clamp > 0 else 0.0)
            for w in removal:
                w.first_blend = blend
                if k_now:
                    w.clamp = site_clamp(w.site_name, k_now, opts.clamp_sites)
            wrapped.train()
            removal.set(tracking=True, aux_sites=aux_names if opts.aux_weight > 0 else [], aux_form=opts.aux_form)
            if watch is not None:
                watch.begin()
            mine = [j for j in range(per_step) if j % world == rank]
            sums = torch.zeros(4, dtype=torch.float64)  # loss, ce, aux, kl: means over the global batch
            scale = world / per_step
            for k, j in enumerate(mine):
                pos = step * per_step + j
                b = batches[cursor.index(pos)]
                ids = b.input_ids.to(device)  # [batch, pos]
                mask = b.attention_mask.to(device)  # [batch, pos]
                torch.manual_seed(opts.seed * 7_919 + pos)  # dropout depends on the micro-batch only
                with par.sync(wrapped, last=k == len(mine) - 1):
                    with _autocast(device, amp):
                        out = wrapped(input_ids=ids, attention_mask=mask, use_cache=False)
                    ce = next_token_ce(out.logits, ids)
                    aux = removal.aux_loss() if opts.aux_weight > 0 else None
                    loss = opts.ce_weight * ce
                    if aux is not None:
                        loss = loss + opts.aux_weight * aux
                    kl = None
                    if opts.distill_weight > 0:
                        assert teacher is not None
                        with torch.no_grad(), _autocast(device, amp):
                            t_logits = teacher(input_ids=ids, attention_mask=mask, use_cache=False).logits
                        kl = next_token_kl(out.logits, t_logits)
                        loss = loss + opts.distill_weight * kl
                    with removal.recomputing():  # checkpointed blocks rerun their norms: no second statistics
                        (loss * scale).backward()
                if watch is not None:
                    watch.after_forward(b.input_ids)
                parts = [loss, ce, aux, kl]
                sums += torch.tensor([float(t.detach()) if t is not None else 0.0 for t in parts],
                                     dtype=torch.float64) / per_step
                del out, loss
            removal.set(tracking=False, aux_sites=[])
            # one collective for the losses and every site's divisor statistics, on the model's device
            vec = par.all_reduce(torch.cat([sums, removal.pending().cpu()])).cpu()
            sums, pending = vec[:4], vec[4:]
            params = [p for p in model.parameters() if p.grad is not None]
            gn = par.grad_norm(params, opts.grad_clip)
            finite = math.isfinite(gn) and math.isfinite(float(sums[0]))
            if finite:
                removal.commit(pending)
            else:  # the divisors of an overflowing step are not evidence: keep the EMA as it was
                removal.discard()
            if not finite and not opts.skip_nonfinite:
                raise NormscopeError(f"The loss or gradient became non-finite at step {step}; lower --lr or use "
                                     "a slower schedule.")
            if finite:
                if watch is not None:
                    watch.before_update()
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            log = StepLog(step=step, loss=float(sums[0]), ce=float(sums[1]), aux=float(sums[2]), kl=float(sums[3]),
                          lr=lr_now, grad_norm=gn, n_removed=0 if control else removal.n_removed(), blend=blend,
                          skipped=not finite, tokens=seq_tokens * per_step, seconds=time.perf_counter() - t0,
                          events=[f"{e.site}:{e.path}" for e in events])
            history.append(log)
            if rank == 0:
                _append_log(run_dir, log)
                if watch is not None:
                    watch.write(run_dir, step, finite)
                if progress is not None:
                    progress(log)
            done = step + 1 == opts.steps
            run_nonfinite = run_nonfinite + 1 if not finite else 0
            if opts.max_nonfinite_run and run_nonfinite >= opts.max_nonfinite_run and not done:
                diverged_at = step + 1 - run_nonfinite
                checkpoint(step + 1, True)
                break
            # a signal reaches one rank (or each at its own time): the ranks agree, so all stop after this step
            stop_name = stop_name_of(par.all_reduce(stop_codes(flag)).cpu())
            if stop_name is not None and not done:
                path = checkpoint(step + 1, False)
                raise TrainingStopped(step + 1, path, stop_name)
            if done or (opts.save_every and (step + 1) % opts.save_every == 0):
                checkpoint(step + 1, done)
    skipped = sum(h.skipped for h in history)
    if diverged_at is None and len(history) < opts.steps and history:
        diverged_at = len(history) - run_nonfinite  # a resumed run that had already stopped
    full_state = None
    if par.mode == "fsdp":
        full_state = par.full_model_state(model)
        full_state = full_state if rank == 0 else None
    return TrainResult(history, removal, schedule, run_dir, resumed_from, skipped, time.perf_counter() - t_start,
                       diverged_at, full_state)


def site_consumers(layout: Any, removal: Removal) -> dict[str, list[nn.Parameter]]:
    """The weight matrices that read each site's output (Q/K/V for a pre-attention norm, the MLP's input
    projections for a pre-MLP norm, the unembedding for the final norm): the weights whose effective learning
    rate jumps when the norm in front of them goes (Lyle et al. 2024)."""
    blocks = {b.index: b for b in layout.blocks}
    out: dict[str, list[nn.Parameter]] = {}
    for w in removal:
        site = next(s for s in removal.sites if s.name == w.site_name)
        b = blocks.get(site.layer) if site.layer is not None else None
        mods: list[Any] = []
        if w.role == "pre_attn" and b is not None and b.attn is not None:
            mods = [getattr(b.attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "c_attn", "query_key_value")]
        elif w.role == "pre_mlp" and b is not None and b.mlp is not None:
            mods = [getattr(b.mlp, n, None) for n in ("gate_proj", "up_proj", "c_fc", "fc1", "dense_h_to_4h")]
        elif w.role == "final" and layout.unembed is not None:
            mods = [layout.unembed]
        out[w.site_name] = [m.weight for m in mods if isinstance(getattr(m, "weight", None), nn.Parameter)]
    return out


class SiteWatch:
    """Per-step, per-site diagnostics for ``sites.jsonl`` (see :attr:`TrainOptions.log_sites`). The copies of
    the consumer weights live in buffers allocated once (a fresh 400 MB copy a step costs seconds here)."""

    def __init__(self, removal: Removal, consumers: dict[str, list[nn.Parameter]],
                 writers: WriterUpdates | None = None) -> None:
        self.removal, self.writers = removal, writers
        self.consumers = WriterUpdates(consumers)  # the same snapshot-and-compare, for the weights reading a site
        self.peak: dict[str, tuple[float, int]] = {}  # site -> (largest divisor at pos >= 1, its token id)
        self.nonfinite: list[str] = []
        self.updated = False

    def begin(self) -> None:
        self.peak, self.nonfinite, self.updated = {}, [], False
        for w in self.removal:
            w.watch, w.peak, w.nonfinite_input = True, None, False

    def after_forward(self, input_ids: torch.Tensor) -> None:
        """Fold the wrappers' peaks of one micro-batch (``input_ids`` ``[batch, pos]``) into the step's."""
        for w in self.removal:
            if w.peak is not None:
                v, row, pos = w.peak
                if w.site_name not in self.peak or v > self.peak[w.site_name][0]:
                    self.peak[w.site_name] = (v, int(input_ids[row, pos]))
            if w.nonfinite_input and w.site_name not in self.nonfinite:
                self.nonfinite.append(w.site_name)
            w.peak, w.nonfinite_input = None, False

    def before_update(self) -> None:
        self.consumers.snapshot()
        if self.writers is not None:
            self.writers.snapshot()
        self.updated = True

    def write(self, run_dir: Path, step: int, finite: bool) -> None:
        rows: dict[str, list[Any]] = {}
        for w in self.removal:
            name = w.site_name
            rel = self.consumers.relative(name) if self.updated else None
            ref = w.divisor if w.divisor is not None else w.ema
            pk = self.peak.get(name)
            gain = float(w.weight.detach().float().norm()) if w.weight is not None else None
            wrel = self.writers.relative(name) if self.updated and self.writers is not None else None
            rows[name] = [_r(gain), _r(rel), _r(pk[0] / ref) if pk and ref else None, pk[1] if pk else None,
                          _r(wrel)]
            w.watch = False
        rec = {"step": step, "finite": finite, "first_nonfinite_input": self.nonfinite[0] if self.nonfinite else None,
               "nonfinite_inputs": len(self.nonfinite), "cols": ["gain_norm", "consumer_rel_update",
                                                                 "peak_over_divisor", "peak_token",
                                                                 "writer_rel_update"], "sites": rows}
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "sites.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")


def _r(x: float | None, digits: int = 5) -> float | None:
    if x is None or not math.isfinite(x):
        return None if x is None else (float("inf") if x > 0 else float("nan"))
    return float(f"{x:.{digits}g}")


def _append_log(run_dir: Path, log: StepLog) -> None:
    """One JSON line per step in ``run_dir/steps.jsonl`` (for ``tail -f``; the checkpoints hold the history)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "steps.jsonl", "a") as f:
        f.write(json.dumps(asdict(log)) + "\n")


def _calibrate(model: nn.Module, removal: Removal, batches: list[Any], cursor: DataCursor, per_step: int,
               par: Parallel, amp: torch.dtype | None) -> None:
    """Initialise every site's EMA from step 0's micro-batches (no gradient), so a site may go at step 1."""
    was = model.training
    model.eval()
    with torch.no_grad(), removal.tracking(par.all_reduce if par.distributed else None):
        for j in range(per_step):
            if j % par.world != par.rank:
                continue
            b = batches[cursor.index(j)]
            with _autocast(par.device, amp):
                model(input_ids=b.input_ids.to(par.device), attention_mask=b.attention_mask.to(par.device),
                      use_cache=False)
    model.train(was)


def finished_state(run_dir: Path) -> dict[str, Any] | None:
    """The state of a run that reached its last step, or None."""
    ck = latest_checkpoint(run_dir)
    if ck is None:
        return None
    st = read_state(ck)
    return st if st.get("done") else None

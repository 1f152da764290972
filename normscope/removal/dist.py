"""Process groups, collectives and sharding for ``remove-ln`` under ``torchrun`` / ``accelerate launch``.

One :class:`Parallel` object per training run says how the model is spread over the processes: ``"none"`` (one
process), ``"ddp"`` (``DistributedDataParallel``: every rank holds the whole model, gradients are all-reduced)
or ``"fsdp"`` (FSDP2 ``fully_shard``: parameters, gradients and AdamW state are sharded over the ranks, each
block's parameters gathered for its forward and backward). Every collective the training loop makes goes
through it, so every tensor handed to NCCL is on the rank's device (NCCL refuses host tensors; gloo accepts
both, which is why a CPU test alone cannot show the difference: ``tests/test_dist.py`` checks the placement with
a fake process group).

A SIGTERM or Ctrl-C sets a :class:`StopFlag` in the process it reaches; the loop all-reduces the flags at the
end of every step (:func:`stop_codes`), so every rank stops after the same step and meets the others at the
checkpoint barrier instead of waiting there alone until the timeout.

The process group starts with ``torch.cuda.set_device(LOCAL_RANK)`` on CUDA (so that nothing of rank 3 lands on
GPU 0) and a timeout of :data:`DIST_TIMEOUT`: long enough for rank 0 to write a checkpoint while the others
wait at the barrier, short enough that a rank that died leaves the others failing instead of hanging forever.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch
from torch import nn

from normscope.core.errors import NormscopeError

DIST_TIMEOUT = timedelta(minutes=30)
"""How long a collective may wait for the slowest rank (rank 0 writing a 1.6 GB checkpoint takes seconds)."""


def dist_env() -> tuple[int, int]:
    """(rank, world size) from the torchrun / accelerate environment; (0, 1) outside it."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def rank_device(device: str) -> str:
    """The device string a rank should load its model on: ``auto`` / ``cuda`` under torchrun become
    ``cuda:LOCAL_RANK`` (and that GPU becomes the current one), so every rank gets its own GPU."""
    _rank, world = dist_env()
    if world > 1 and device in ("auto", "cuda") and torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
        return f"cuda:{local_rank()}"
    return device


def init_distributed(device: torch.device, timeout: timedelta = DIST_TIMEOUT) -> bool:
    """Start the process group (nccl on CUDA, gloo elsewhere) when running under torchrun; idempotent.

    On CUDA the rank's GPU becomes the current device first (``torch.cuda.set_device``)."""
    import torch.distributed as dist

    _rank, world = dist_env()
    if world <= 1:
        return False
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device.index if device.index is not None else local_rank())
            dist.init_process_group("nccl", timeout=timeout, device_id=device)
        else:
            dist.init_process_group("gloo", timeout=timeout)
    return True


def _initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def all_reduce(t: torch.Tensor, device: torch.device, op: str = "sum") -> torch.Tensor:
    """Sum (or max) ``t`` over the ranks, on ``device`` (the model's: NCCL takes no host tensors). Returns the
    reduced tensor on ``device``; outside a process group, ``t`` moved there."""
    import torch.distributed as dist

    t = t.to(device)
    if _initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    import torch.distributed as dist

    if _initialized():
        dist.barrier()


# ---- stopping: a signal reaches one rank, the ranks decide together -------------------------------------------
class StopFlag:
    """Set by SIGTERM / SIGINT (or by a caller): the loop saves after the step in flight and stops."""

    def __init__(self) -> None:
        self.signame: str | None = None

    def request(self, signame: str = "request") -> None:
        self.signame = signame

    @property
    def requested(self) -> bool:
        return self.signame is not None


@contextlib.contextmanager
def stop_on_signals(flag: StopFlag) -> Iterator[None]:
    """Route SIGTERM and SIGINT to ``flag`` (a second Ctrl-C interrupts at once); handlers restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old: dict[signal.Signals, Any] = {}

    def handler(signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if flag.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag.request(name)

    for sig in (signal.SIGTERM, signal.SIGINT):
        old[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


STOP_NAMES = ("SIGTERM", "SIGINT", "request")


def stop_codes(flag: StopFlag) -> torch.Tensor:
    """This rank's stop request as counts ``[SIGTERM, SIGINT, other]`` (float64), to be summed over the ranks."""
    return torch.tensor([float(flag.signame == n) if n != "request" else float(
        flag.requested and flag.signame not in STOP_NAMES[:2]) for n in STOP_NAMES], dtype=torch.float64)


def stop_name_of(codes: torch.Tensor) -> str | None:
    """The stop request of the summed :func:`stop_codes` (None: nobody asked)."""
    return next((n for n, c in zip(STOP_NAMES, codes.tolist(), strict=True) if c > 0), None)



def tied_names(model: nn.Module) -> set[str]:
    """State-dict names that alias another parameter (tied embeddings), as ``safetensors.save_model`` drops
    them: of each group of names sharing one tensor, every name but the alphabetically first."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return {n for names in groups.values() if len(names) > 1 for n in sorted(names)[1:]}


class Parallel:
    """How one run spreads over the processes (see the module docstring); ``mode`` none, ddp or fsdp."""

    def __init__(self, device: torch.device, fsdp: bool = False) -> None:
        self.device = device
        self.rank, self.world = dist_env()
        self.distributed = init_distributed(device)
        if fsdp and not self.distributed:
            raise NormscopeError("--fsdp shards the model over several processes; launch with torchrun "
                                 "--nproc-per-node N (N >= 2), or drop --fsdp.")
        self.mode = "fsdp" if fsdp else "ddp" if self.distributed else "none"
        self._tied: set[str] = set()

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        return all_reduce(t, self.device, op) if self.distributed else t

    def barrier(self) -> None:
        barrier()

    def wrap(self, model: nn.Module, layout: Any) -> Any:
        """DDP around ``model``, or ``fully_shard`` on every block (and on untied embedding and unembedding) and
        then on the whole model (FSDP2: one all-gather per unit). Returns what the loop calls forward on
        (``model`` itself under FSDP)."""
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            return DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if self.mode == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            self._tied = tied_names(model)
            mesh = init_device_mesh(self.device.type, (self.world,))
            units = [b.module for b in layout.blocks]
            emb, unemb = layout.embed, layout.unembed
            if unemb is not None and getattr(unemb, "weight", None) is not getattr(emb, "weight", None):
                units = [emb, *units, unemb]  # untied: their own units, or the root holds them whole all step
            for u in units:
                fully_shard(u, mesh=mesh)
            fully_shard(model, mesh=mesh)
        return model

    def sync(self, wrapped: Any, last: bool) -> contextlib.AbstractContextManager[Any]:
        """Gradient synchronisation only on the last micro-batch of a step (DDP ``no_sync``; FSDP2
        ``set_requires_gradient_sync``)."""
        if self.mode == "ddp" and not last:
            return wrapped.no_sync()
        if self.mode == "fsdp":
            wrapped.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def grad_norm(self, params: list[nn.Parameter], clip: float) -> float:
        """The global gradient norm (clipped to ``clip`` when > 0); a collective under FSDP."""
        gn: Any = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        if hasattr(gn, "full_tensor"):  # a DTensor under FSDP
            gn = gn.full_tensor()
        return float(gn)

    # ---- checkpoints under FSDP (collectives: every rank calls them) ----------------------------------
    def full_model_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The unsharded weights on the CPU, on rank 0 (empty elsewhere), without the tied aliases."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd: dict[str, Any] = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                                  cpu_offload=True))
        return {k: v.contiguous() for k, v in sd.items() if k not in self._tied}

    def full_optimizer_state(self, model: nn.Module, optimizer: Any) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_full_optimizer_state(self, model: nn.Module, optimizer: Any, state: dict[str, Any]) -> None:
        """Rank 0's full optimizer state, sharded out to every rank."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state,
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def plain_copy(original: nn.Module, res: Any, opts: Any) -> tuple[nn.Module, Any]:
    """A one-process copy of a model trained under FSDP, on rank 0: ``original`` deep-copied, the same norm
    wrappers installed with the trained divisor state, and the gathered weights (``res.full_state``) loaded.

    Returns ``(model, removal)``, ready for export and evaluation like an unsharded run's."""
    import copy

    from normscope.core.sites import find_layout, find_norm_sites
    from normscope.removal.frozen import Removal

    model = copy.deepcopy(original)
    layout = find_layout(model)
    removal = Removal(model, layout, find_norm_sites(model, layout), momentum=opts.momentum,
                      first_token=opts.first_token, split_value=opts.split_value)
    removal.load_state(res.removal.state())
    missing, unexpected = model.load_state_dict(res.full_state, strict=False)
    tied = tied_names(model)
    if unexpected or [k for k in missing if k not in tied]:
        raise RuntimeError(f"the gathered FSDP weights do not fit the model: {missing[:3]} {unexpected[:3]}")
    tie: Any = getattr(model, "tie_weights", None)
    if callable(tie):
        tie()
    return model, removal

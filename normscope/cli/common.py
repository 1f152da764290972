"""Shared CLI plumbing: error handling, progress bars and the check -> load -> run -> write flow.

Every command is generated (see :mod:`normscope.cli.app`): it checks its options and output folder, calls
:func:`prepare`, runs the analysis and calls :func:`finish`. No math lives here.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from normscope.core.errors import NormscopeError
from normscope.core.options import MEANINGFUL_SEQ_LEN

err_console = Console(stderr=True)
out_console = Console()

F = TypeVar("F", bound=Callable[..., Any])

def guarded(fn: F) -> F:
    """Turn NormscopeError into one line on stderr and exit code 2; Ctrl-C into exit code 130."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except NormscopeError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=exc.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("interrupted; nothing half-written was left behind.")
            raise typer.Exit(code=130) from None

    return wrapper  # type: ignore[return-value]


def quiet_libraries() -> None:
    """Silence transformers' own progress bars and warnings; ours go to stderr."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        import logging

        logging.getLogger("accelerate").setLevel(logging.ERROR)  # "parameters on the meta device": --device-map's doing
    except Exception:  # pragma: no cover - transformers missing is caught at load time
        pass


@dataclass
class Progressor:
    """A rich progress bar on stderr, or nothing when quiet or when stderr is not a terminal (a bar redrawn into
    a log file or a pipe leaves only blank lines)."""

    quiet: bool = False

    def __post_init__(self) -> None:
        self.asked_quiet = self.quiet  # --quiet / --json: no notes either
        self.quiet = self.quiet or not err_console.is_terminal

    def note(self, message: str) -> None:
        """One line on stderr before a costly step (what it will cost, and how to cut it), unless --quiet."""
        if not self.asked_quiet:
            err_console.print(message, highlight=False, soft_wrap=True)

    @contextmanager
    def task(self, description: str, total: float | None) -> Iterator[Callable[[float], None]]:
        if self.quiet:
            yield lambda n: None
            return
        columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TimeRemainingColumn()]
        with Progress(*columns, console=err_console, transient=True) as prog:
            tid = prog.add_task(description, total=total)
            yield lambda n: prog.advance(tid, n)

    def status(self, message: str) -> Any:
        if self.quiet:
            return _Null()
        return err_console.status(message)


class _Null:
    def __enter__(self) -> _Null:
        return self

    def __exit__(self, *a: object) -> None:
        return None


def version_callback(value: bool) -> None:
    if value:
        from normscope import __version__

        out_console.print(f"normscope {__version__}")
        raise typer.Exit()


def eprint(msg: str) -> None:
    err_console.print(msg, highlight=False)


def is_tty() -> bool:
    return sys.stderr.isatty()


# ---- the check -> load -> run -> write flow -----------------------------------------------------------------
def check_inputs(model_opts: Any, text_opts: Any, *more: Any) -> None:
    """Every option checked before anything loads: the groups' choices and ranges, and text that exists."""
    from normscope.core.options import validate

    for o in (model_opts, text_opts, *more):
        validate(o)
    if model_opts.device != "auto":  # a device this machine lacks is refused before anything loads
        from normscope.core.models import resolve_device

        resolve_device(model_opts.device)
    if model_opts.device_map != "none" and model_opts.max_memory:
        check_max_memory_devices(model_opts.max_memory)
    for p in text_opts.paths or ():
        if not Path(p).exists():
            raise NormscopeError(f"--text {p} does not exist; give a .txt/.jsonl file or a folder of them.")
    if text_opts.seq_len < MEANINGFUL_SEQ_LEN and not quiet_warnings():
        eprint(f"warning: --seq-len {text_opts.seq_len} leaves almost no context: sink rates, angles and losses "
               f"at so few positions say little (Gu et al. measure sinks at T = 64).")


def check_max_memory_devices(max_memory: str) -> None:
    """Refuse, before anything loads, a --max-memory that names a GPU (or MPS) this machine does not have."""
    import torch

    from normscope.core.options import parse_max_memory

    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for dev in parse_max_memory(max_memory):
        if isinstance(dev, int) and dev >= n_gpus:
            have = f"GPUs 0-{n_gpus - 1}" if n_gpus > 1 else ("GPU 0" if n_gpus else "no CUDA GPU")
            raise NormscopeError(f"--max-memory names GPU {dev} but this machine has {have}; name only its devices "
                                 "(cpu, disk and the GPUs that nvidia-smi lists).")
        if dev == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise NormscopeError("--max-memory names mps but MPS is not available here; leave it out.")


def quiet_warnings() -> bool:
    return bool(os.environ.get("NORMSCOPE_NO_WARNINGS"))


def output_dir(slug: str, out: Path | None) -> Path:
    """reports/<slug>/ unless --out is given."""
    return out if out is not None else Path("reports") / slug


def check_output(folder: Path, stems: list[str], force: bool) -> None:
    """Refuse, before any model loads, an --out that is a file or cannot be written, and a folder that already
    holds this command's pages (unless --force): a run never silently replaces an earlier one."""
    if folder.exists() and not folder.is_dir():
        raise NormscopeError(f"--out {folder} is a file; give a folder (it is created if missing).")
    parent = folder
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise NormscopeError(f"Cannot write to {folder} ({parent} is not writable); choose another --out.")
    taken = [f"{s}.json" for s in stems if (folder / f"{s}.json").exists()]
    if taken and not force:
        raise NormscopeError(f"{folder / taken[0]} is from an earlier run; pass --force to replace it, or --out "
                             "to write elsewhere.")


def prepare(model_opts: Any, text_opts: Any, progress: Progressor, *, for_training: bool = False) -> tuple[Any, Any]:
    """Load the model and the text sample, with a spinner; every failure is a one-line NormscopeError."""
    from normscope.core.models import check_memory, load_model
    from normscope.core.text import load_text

    quiet_libraries()
    import torch

    torch.manual_seed(text_opts.seed)
    m = model_opts
    with progress.status(f"loading {m.model}"):
        lm = load_model(m.model, revision=m.revision, dtype=m.dtype, device=m.device,
                        trust_remote_code=m.trust_remote_code, for_training=for_training,
                        allow_pickle=m.allow_pickle, device_map=m.device_map, max_memory=m.max_memory,
                        offload_folder=m.offload_folder)
    check_memory(lm, text_opts.batch_size, text_opts.seq_len, training=for_training,
                 state_bytes_per_param=4 if for_training else 0)  # grads' float32 gradient sums
    with progress.status("tokenizing text"):
        sample = load_text(lm.tokenizer, text_opts, max_positions=lm.info.max_positions, is_causal=lm.info.is_causal)
    return lm, sample


def headlines_table(result: Any, command: str, *, timings: bool = False) -> Table:
    """The terminal summary most commands print: one row per headline number (and per timed step)."""
    from normscope.report import fmt_value

    t = Table(title=f"{command}: {result.payload.get('model', result.meta.get('model', {}).get('name', ''))}",
              show_header=True)
    t.add_column("measure", overflow="fold")
    t.add_column("value", justify="right")
    for key, v in result.headlines.items():
        t.add_row(result.label(str(key)), fmt_value(v))
    for key, sec in (result.timings.items() if timings else ()):
        t.add_row(f"time: {key}", f"{sec:.1f} s")
    return t


def finish(result: Any, slug_or_dir: str | Path, out: Path | None = None, *, quiet: bool, as_json: bool,
           table: Any = None) -> Any:
    """Write HTML/JSON/CSV atomically (and the folder's index), print the summary table and where it went.

    ``slug_or_dir``: the output folder (a Path), or a model slug whose default folder is reports/<slug>/."""
    from normscope.report import dumps_json, write_report

    folder = slug_or_dir if isinstance(slug_or_dir, Path) else output_dir(slug_or_dir, out)
    paths = write_report(result, folder)  # and the folder's index
    if as_json:
        sys.stdout.write(dumps_json(result.to_json_dict()) + "\n")
    if not quiet and not as_json:
        if table is not None:
            out_console.print(table)
        for line in result.summary[:3]:
            out_console.print(line, highlight=False)
        out_console.print(f"[bold green]report:[/] {paths.html}", highlight=False, soft_wrap=True)
        out_console.print(f"[dim]json:   {paths.json}[/]", highlight=False, soft_wrap=True)
    elif not as_json:
        out_console.print(str(paths.html), highlight=False, soft_wrap=True)
    return paths

"""Shared CLI plumbing: option types, error handling, progress bars and the load -> run -> report flow.

Every command is a thin function: parse options, call :func:`prepare`, call the analysis' ``run``, call
:func:`finish`. No math lives here.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

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

from normscope.errors import NormscopeError

err_console = Console(stderr=True)
out_console = Console()

F = TypeVar("F", bound=Callable[..., Any])

# ---- option types shared by every command ---------------------------------------------------------------
ModelArg = Annotated[
    str,
    typer.Argument(
        help="Bundled alias (smollm2-135m, minilm-l6), a model folder, a .gguf file, or a Hugging Face id (gpt2).",
        show_default=True,
    ),
]
RevisionOpt = Annotated[str | None, typer.Option("--revision", help="Hub revision (branch, tag or commit).")]
DtypeOpt = Annotated[
    str, typer.Option("--dtype", help="auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16, float16.")
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or mps.")]
TrustOpt = Annotated[
    bool,
    typer.Option(
        "--trust-remote-code",
        help="Run Python code shipped in the model repository. Off by default: that code runs with your rights.",
    ),
]
AllowPickleOpt = Annotated[
    bool,
    typer.Option("--allow-pickle", help="Load pickle-only checkpoints (.bin). Off by default: a pickle can run code."),
]
TextOpt = Annotated[
    list[Path] | None,
    typer.Option("--text", help="Text files (.txt, .jsonl) or folders; repeat for several. Default: built-in prompts."),
]
DatasetOpt = Annotated[str | None, typer.Option("--dataset", help="A datasets name[:split], when online.")]
MaxTokensOpt = Annotated[int, typer.Option("--max-tokens", min=1, help="Stop after this many tokens.")]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Sequences per forward pass.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for sampling and the random-token controls.")]
BosOpt = Annotated[str, typer.Option("--bos", help="Prepend BOS: auto (as the tokenizer does), yes, no.")]
OutOpt = Annotated[Path | None, typer.Option("--out", help="Output folder. Default: reports/MODEL/.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary table.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the JSON result to stdout.")]


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
    except Exception:  # pragma: no cover - transformers missing is caught at load time
        pass


@dataclass
class Progressor:
    """A rich progress bar on stderr, or nothing when quiet."""

    quiet: bool = False

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


def default_out(slug: str, out: Path | None) -> Path:
    """reports/<slug>/ unless --out is given."""
    return out if out is not None else Path("reports") / slug


def version_callback(value: bool) -> None:
    if value:
        from normscope import __version__

        out_console.print(f"normscope {__version__}")
        raise typer.Exit()


def eprint(msg: str) -> None:
    err_console.print(msg, highlight=False)


def is_tty() -> bool:
    return sys.stderr.isatty()


# ---- the load -> run -> report flow -----------------------------------------------------------------------
def prepare(
    model: str,
    *,
    revision: str | None,
    dtype: str,
    device: str,
    trust_remote_code: bool,
    text: list[Path] | None,
    dataset: str | None,
    seq_len: int,
    max_tokens: int,
    batch_size: int,
    seed: int,
    bos: str,
    progress: Progressor,
    for_training: bool = False,
    allow_pickle: bool = False,
) -> tuple[Any, Any]:
    """Load the model and the text sample, with a spinner; every failure is a one-line NormscopeError."""
    from normscope.models import load_model
    from normscope.text import TextOptions, load_text

    quiet_libraries()
    if bos not in ("auto", "yes", "no"):
        raise NormscopeError(f"--bos must be auto, yes or no, not '{bos}'.")
    import torch

    torch.manual_seed(seed)
    with progress.status(f"loading {model}"):
        lm = load_model(model, revision=revision, dtype=dtype, device=device,
                        trust_remote_code=trust_remote_code, for_training=for_training,
                        allow_pickle=allow_pickle)
    from normscope.models import check_memory

    check_memory(lm, batch_size, seq_len, training=for_training)
    opts = TextOptions(paths=list(text) if text else None, dataset=dataset, seq_len=seq_len,
                       max_tokens=max_tokens, batch_size=batch_size, seed=seed, bos=bos)
    with progress.status("tokenizing text"):
        sample = load_text(lm.tokenizer, opts, max_positions=lm.info.max_positions, is_causal=lm.info.is_causal)
    return lm, sample


def headlines_table(result: Any, command: str, *, timings: bool = False) -> Table:
    """The terminal summary most commands print: one row per headline number (and per timed step)."""
    t = Table(title=f"{command}: {result.payload['model']}", show_header=True)
    t.add_column("measure")
    t.add_column("value", justify="right")
    for key, v in result.headlines.items():
        t.add_row(str(key), str(v))
    for key, sec in (result.timings.items() if timings else ()):
        t.add_row(f"time: {key}", f"{sec:.1f} s")
    return t


def finish(result: Any, slug: str, out: Path | None, *, quiet: bool, as_json: bool,
           table: Any = None) -> Any:
    """Write HTML/JSON/CSV atomically, print the summary table (stderr) and where the report is."""
    from normscope.report import dumps_json, write_report

    paths = write_report(result, default_out(slug, out))
    if as_json:
        sys.stdout.write(dumps_json(result.to_json_dict()) + "\n")
    if not quiet and not as_json:
        if table is not None:
            out_console.print(table)
        for line in result.summary[:3]:
            out_console.print(line, highlight=False, soft_wrap=False)
        out_console.print(f"[bold green]report:[/] {paths.html}", highlight=False)
        out_console.print(f"[dim]json:   {paths.json}[/]", highlight=False)
    elif not as_json:
        out_console.print(str(paths.html), highlight=False)
    return paths

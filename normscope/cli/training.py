"""Plumbing the fine-tuning commands (``remove-ln``, ``swap``) share: their two texts and the interrupted run.

No math lives here: the runs are :func:`normscope.removal.pipeline.run` and :func:`normscope.swap.pipeline.run`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from normscope.cli.common import eprint
from normscope.core.errors import NormscopeError
from normscope.core.options import TextOptions


def load_texts(lm: Any, progress: Any, *, paths: list[Path] | None, dataset: str | None, seq_len: int,
               max_tokens: int, batch_size: int, seed: int, bos: str, eval_text: list[Path] | None,
               eval_max_tokens: int, train_sample: Any = None) -> tuple[Any, Any, str]:
    """The training sample (unless one is given, e.g. self-generated), the held-out sample and the data note."""
    from normscope.core.text import load_text

    data_note = ""
    if train_sample is None:
        opts = TextOptions(paths=list(paths) if paths else None, dataset=dataset, seq_len=seq_len,
                           max_tokens=max_tokens, batch_size=batch_size, seed=seed, bos=bos, controls=False)
        with progress.status("tokenizing training text"):
            train_sample = load_text(lm.tokenizer, opts, max_positions=lm.info.max_positions, is_causal=True)
        data_note = train_sample.source
    eopts = TextOptions(paths=list(eval_text) if eval_text else None, seq_len=seq_len, max_tokens=eval_max_tokens,
                        batch_size=batch_size, seed=seed, bos=bos, controls=False)
    try:
        eval_sample = load_text(lm.tokenizer, eopts, max_positions=lm.info.max_positions, is_causal=True)
    except NormscopeError as exc:
        raise NormscopeError(f"--eval-text is unusable: {exc}") from None
    return train_sample, eval_sample, data_note


def run_training(run: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``run(*args, stop=StopFlag(), **kwargs)``; a SIGTERM or Ctrl-C saves a checkpoint and exits 143 / 130 with
    the line that says how to continue."""
    from normscope.removal import StopFlag, TrainingStopped

    try:
        return run(*args, stop=StopFlag(), **kwargs)
    except TrainingStopped as exc:
        eprint(f"{exc.signame}: saved a checkpoint after step {exc.step} in {exc.path}; continue with the same "
               "command plus --resume.")
        raise typer.Exit(code=143 if exc.signame == "SIGTERM" else 130) from None

"""Plumbing the fine-tuning commands (``remove-ln``, ``swap``) share: their two texts and the interrupted run.

No math lives here: the runs are :func:`normscope.removal.pipeline.run` and :func:`normscope.swap.pipeline.run`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from normscope.cli.common import eprint
from normscope.cli.options import Group
from normscope.core.errors import NormscopeError
from normscope.core.options import ModelOptions, TextOptions


def training_groups(name: str) -> tuple[Group, Group]:
    """The Model and Text option groups as a fine-tuning command composes them: its text defaults differ from the
    analyses' because it trains (see the notes in ``--help``)."""
    text = Group("text_opts", TextOptions, "Text", skip=("controls",),
                 defaults=(("seq_len", 128), ("max_tokens", None)),
                 notes=(("seq_len", f"{name} trains and evaluates on it: 128 by default, twice the analyses' 64, "
                                    "so each step sees longer contexts."),
                        ("max_tokens", "Training tokens to read (default: enough for every step to see new text).")))
    model = Group("model_opts", ModelOptions, "Model",
                  notes=(("dtype", f"{name} keeps float32 weights and AdamW state: bfloat16 trains under bf16 "
                                   "autocast; float16 is refused (it would need loss scaling)."),))
    return model, text


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

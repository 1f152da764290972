"""Progress reporting shared by the analyses: a bar task when the CLI gives a progressor, nothing in the API."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def progress_task(progress: Any, name: str, total: float) -> Iterator[Callable[[float], None] | None]:
    """A progress bar task when ``progress`` (a CLI ``Progressor``) is given; ``None`` for silent API calls."""
    if progress is None:
        yield None
    else:
        with progress.task(name, total) as adv:
            yield adv


def note(progress: Any, message: str) -> None:
    """Say ``message`` (what a pass will cost, say) through the CLI's progressor; nothing in the Python API."""
    say = getattr(progress, "note", None)
    if callable(say):
        say(message)

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

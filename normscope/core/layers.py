"""The one block-selection grammar of every command (``--layers``, ``--skip-layers``, ``--sites``):

* ``all`` (every block) or ``none`` (no block);
* comma-separated indices and inclusive ranges: ``0,3,10-12``;
* negative indices count from the end: ``-1`` is the last block, ``-3--1`` the last three.

:func:`check_syntax` runs before any model loads; :func:`parse_layers` resolves a spec once the number of
blocks is known. Both raise :class:`NormscopeError` with one sentence naming the flag.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from normscope.core.errors import NormscopeError

_PART = re.compile(r"^(-?\d+)(?:-(-?\d+))?$")
HELP = "all, none, or indices and ranges such as 0,3,10-12 (negative counts from the end: -1 is the last block)"


def _parts(spec: str, flag: str) -> list[tuple[int, int]]:
    out = []
    for raw in spec.split(","):
        part = raw.strip().replace(" ", "")
        m = _PART.match(part)
        if not m:
            raise NormscopeError(f"{flag} '{spec}' is malformed; write {HELP}.")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if (lo >= 0) == (hi >= 0) and hi < lo:
            raise NormscopeError(f"{flag} range '{part}' runs backwards; write it as {hi}-{lo}.")
        out.append((lo, hi))
    return out


def _as_text(spec: str | Sequence[int] | None) -> str | None:
    """The Python API may give block indices as a list: the same grammar, written out."""
    if spec is None or isinstance(spec, str):
        return spec
    return ",".join(str(int(v)) for v in spec)


def check_syntax(spec: str | Sequence[int] | None, flag: str = "--layers") -> None:
    """Refuse a malformed spec before anything loads (the block count is checked by :func:`parse_layers`)."""
    spec = _as_text(spec)
    if spec is None or spec.strip().lower() in ("all", "none", ""):
        return
    _parts(spec, flag)


def parse_layers(spec: str | Sequence[int] | None, n_layers: int, flag: str = "--layers") -> list[int] | None:
    """Sorted unique block indices of ``spec``; None for no spec (the caller's default), [] for ``none``."""
    spec = _as_text(spec)
    if spec is None or not spec.strip():
        return None
    word = spec.strip().lower()
    if word == "all":
        return list(range(n_layers))
    if word == "none":
        return []
    out: set[int] = set()
    for lo, hi in _parts(spec, flag):
        a, b = (v + n_layers if v < 0 else v for v in (lo, hi))
        if b < a:
            raise NormscopeError(f"{flag} range '{lo}-{hi}' runs backwards on a model of {n_layers} blocks.")
        if a < 0 or b >= n_layers:
            raise NormscopeError(f"{flag} '{spec}' asks for block {b if b >= n_layers else a}, but this model has "
                                 f"blocks 0-{n_layers - 1}.")
        out.update(range(a, b + 1))
    return sorted(out)

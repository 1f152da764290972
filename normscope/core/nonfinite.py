"""The inf/NaN (fp16/bf16 overflow) report that every analysis attaches to its result."""

from __future__ import annotations

from typing import Any

import torch


class FiniteWatch:
    """A reducer that keeps nothing: added at a hook point, it makes :class:`~normscope.core.capture.Capture` count the
    inf/NaN values there (Capture checks every point that has a reducer)."""

    def update(self, x: torch.Tensor, ctx: Any) -> None:
        """Nothing to fold in; ``x`` is ``[batch, pos, d_model]``."""


def watch_residual(cap: Any, layout: Any) -> None:
    """Count inf/NaN leaving every block (``blocks.{i}.hook_resid_post``), so that an overflow is named by layer
    even in an analysis that reads only a few other points."""
    for b in layout.blocks:
        cap.add(f"blocks.{b.index}.hook_resid_post", FiniteWatch())


def note_nonfinite(seen: dict[str, dict[str, Any]], point: str, x: torch.Tensor, batch: int) -> None:
    """Note under ``point`` in ``seen`` that ``x`` holds inf/NaN, for tensors that no Capture watches.

    The entries have the shape of :meth:`Capture.nonfinite_report`'s: ``{"point", "first_batch", "batches"}``
    (``batches``: how many calls found inf/NaN there). One host read per call.
    """
    if not x.is_floating_point():
        return
    if not bool(torch.isfinite(x.detach().sum(dtype=torch.float32))):
        seen.setdefault(point, {"point": point, "first_batch": batch, "batches": 0})["batches"] += 1


def merge_nonfinite(reports: list[list[dict[str, Any]]], order: list[str] | None = None) -> list[dict[str, Any]]:
    """Several passes' reports as one: each point once (from the first report that names it), sorted by
    ``order`` (e.g. ``Capture.points()``) when given, otherwise in the order first seen."""
    merged: dict[str, dict[str, Any]] = {}
    for report in reports:
        for row in report:
            merged.setdefault(row["point"], dict(row))
    rows = list(merged.values())
    if order is not None:
        rank = {p: i for i, p in enumerate(order)}
        rows.sort(key=lambda r: rank.get(r["point"], len(rank)))
    return rows


def nonfinite_warning(report: list[dict[str, Any]], consequence: str | None = None) -> str:
    """The one-line warning for a non-empty report: how many hook points, the first one and its batch."""
    first = report[0]
    n = len(report)
    what = consequence or "the statistics there are not meaningful"
    return (f"Warning: inf/NaN values appeared at {n} hook point{'s' if n != 1 else ''}, first at {first['point']} "
            f"(batch {first['first_batch']}): {what}; rerun with --dtype float32.")


def flag_nonfinite(result: Any, report: list[dict[str, Any]], consequence: str | None = None) -> None:
    """Attach an inf/NaN report to a :class:`~normscope.report.Result`, never leaving it to be silently averaged.

    Always sets ``result.payload["nonfinite"]`` (an empty list when every value was finite). When the report is
    not empty, the warning becomes the first summary line and ``nonfinite_points`` the first headline.
    ``consequence`` replaces "the statistics there are not meaningful" where the analysis did something about
    it (e.g. left the affected batches out).
    """
    result.payload["nonfinite"] = report
    if not report:
        return
    result.summary.insert(0, nonfinite_warning(report, consequence))
    if isinstance(result.headlines, dict):
        result.headlines = {"nonfinite_points": len(report), **result.headlines}

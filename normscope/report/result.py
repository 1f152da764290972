"""The result of an analysis: named tables, figures, headline numbers, summary lines and the settings it ran with."""

from __future__ import annotations

import importlib.metadata
import platform
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from normscope.report.jsonio import SCHEMA_VERSION, to_jsonable

_RESERVED_JSON_KEYS = ("schema_version", "analysis", "title", "meta", "headlines", "labels", "summary")

if TYPE_CHECKING:  # plotly is imported lazily: `import normscope.report` stays cheap
    import plotly.graph_objects as go


@dataclass
class Figure:
    """One plotly figure of a report, with the sentence that tells the reader what to look for."""

    title: str
    fig: go.Figure
    caption: str  # one sentence: what to look for in this figure


@dataclass
class Result:
    """Everything an analysis produced; :func:`write_report` serialises it and the Python API returns it.

    ``timings`` (seconds) are shown on the HTML page only, never in the JSON, so that the JSON is
    byte-identical across identical runs.
    """

    analysis: str  # "sinks", "depth", "grads", "hubness", "dla", "remove-ln"
    title: str  # "Attention and residual sinks"
    meta: dict[str, Any]  # {"model": {...}, "text": {...}, "versions": {...}, ...}: see make_meta
    payload: dict[str, Any]  # the analysis' own JSON fields (sink_rate, layers, heads, ...)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)  # each written as <analysis>_<name>.csv
    figures: list[Figure] = field(default_factory=list)
    headlines: dict[str, Any] = field(default_factory=dict)  # a few scalars for the terminal and summary card
    summary: list[str] = field(default_factory=list)  # interpretation paragraphs (plain text)
    references: list[str] = field(default_factory=list)  # "Gu et al. 2024, When Attention Sink Emerges (...)"
    timings: dict[str, float] = field(default_factory=dict)  # seconds; HTML only, never in the JSON
    axes: dict[str, str] = field(default_factory=dict)
    """Depth axis of each per-depth table: table name -> its column ("layer", "block" or "point"), so that
    ``compare`` overlays every per-layer table of every analysis without knowing its name."""
    labels: dict[str, str] = field(default_factory=dict)
    """Words for table and column names in titles and axes ("top1_abs" -> "top-1 |h|"); snake_case otherwise."""

    def label(self, name: str) -> str:
        """The words for a table or column name: its label, or the name with underscores as spaces."""
        return self.labels.get(name) or name.replace("_", " ")

    def depth_tables(self) -> dict[str, tuple[str, pd.DataFrame]]:
        """Every table with a depth axis: name -> (axis column, table)."""
        return {n: (ax, self.tables[n]) for n, ax in self.axes.items() if n in self.tables and ax in self.tables[n]}

    def write(self, out_dir: str | Path) -> ReportPaths:
        """Write ``<analysis>.html``, ``<analysis>.json`` and one CSV per table into ``out_dir``, atomically."""
        from normscope.report.html import write_report

        return write_report(self, Path(out_dir))

    def to_json_dict(self) -> dict[str, Any]:
        """``{"schema_version", "analysis", "title", "meta", "headlines", "labels", "summary", **payload}`` as JSON
        (``labels``: the words for the headline keys that have them).

        Raises ValueError when the payload reuses one of the four reserved keys (a programming error).
        """
        clash = [k for k in _RESERVED_JSON_KEYS if k in self.payload]
        if clash:
            raise ValueError(f"payload of {self.analysis!r} uses reserved key(s) {clash}")
        out: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "analysis": self.analysis,
            "title": self.title,
            "meta": self.meta,
            "headlines": self.headlines,
            "labels": {str(k): self.labels[str(k)] for k in self.headlines if str(k) in self.labels},
            "summary": self.summary,
        }
        out.update(self.payload)
        return to_jsonable(out)


@dataclass
class ReportPaths:
    """Where :func:`write_report` wrote a result."""

    html: Path
    json: Path
    csvs: list[Path]


def collect_versions() -> dict[str, str]:
    """Versions that decide a report's numbers: python, normscope, torch, transformers, transformer-lens."""
    out = {"python": platform.python_version()}
    for dist in ("normscope", "torch", "transformers", "transformer-lens"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def make_meta(model: Any = None, text: Mapping[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """The ``meta`` dict of a :class:`Result`, in the layout :func:`render_html` reads.

    model: a ``ModelInfo`` (anything with ``to_dict()``) or a dict (``name``, ``revision``, ``dtype``, ...).
    text: ``{"source", "n_tokens", "seq_len", "bos_prepended", "seed", ...}``.
    extra: further settings (e.g. ``options={...}``), shown under "More settings".
    """
    if model is not None and not isinstance(model, Mapping):
        model = model.to_dict()
    meta: dict[str, Any] = {
        "model": dict(model or {}),
        "text": dict(text or {}),
        "versions": collect_versions(),
    }
    meta.update(extra)
    return meta


def build_meta(lm: Any, sample: Any, **settings: Any) -> dict[str, Any]:
    """The settings block of a report: model, text, the command's own settings, package versions."""
    return make_meta(lm.info, sample.to_dict() if sample is not None else None, settings=settings)

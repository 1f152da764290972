"""Reports: :class:`Result` (what an analysis produced), its JSON, its plots, its HTML page and the index page.

* ``result.py``: :class:`Result`, :class:`Figure`, the settings block (``make_meta``);
* ``jsonio.py``: deterministic JSON (``to_jsonable``, ``dumps_json``);
* ``plots.py``: plotly helpers in the conventions of the field (layer on x, ``L{l}H{h}``, RdBu at 0);
* ``html.py``: the self-contained page, ``write_report``;
* ``index.py``: ``index.html`` of a report folder.

Only ``plots.py``, ``html.py`` and the analyses' ``report.py`` modules import plotly, and only inside functions.
"""

from __future__ import annotations

from normscope.core.io import atomic_dir, atomic_write_bytes, atomic_write_text
from normscope.report.html import csv_name, fmt_value, render_html, table_to_csv, write_report
from normscope.report.index import IndexEntry, render_index, write_index
from normscope.report.jsonio import SCHEMA_VERSION, dumps_json, to_jsonable
from normscope.report.plots import escape_figure_data, heatmap_layer_head, line_per_layer, plot_text
from normscope.report.result import Figure, ReportPaths, Result, build_meta, collect_versions, make_meta

__all__ = [
    "SCHEMA_VERSION", "Figure", "IndexEntry", "ReportPaths", "Result", "atomic_dir", "atomic_write_bytes",
    "atomic_write_text", "build_meta", "collect_versions", "csv_name", "dumps_json", "escape_figure_data",
    "fmt_value", "heatmap_layer_head", "line_per_layer", "make_meta", "plot_text", "render_html", "render_index",
    "table_to_csv", "to_jsonable", "write_index", "write_report",
]

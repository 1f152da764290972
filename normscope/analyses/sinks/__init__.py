"""Attention sinks, residual sinks (massive activations) and outlier-driven rescaling of the norm.

The package: ``options.py`` (settings, no torch), ``metrics.py`` (pure functions), ``reducers.py`` (the hook
reducers), ``analysis.py`` (the run and its result), ``report.py`` (figures and sentences); its names are
importable from here (``normscope.sinks.run(lm, sample)``, ``normscope.sinks.sink_rate``), loaded on first use.
"""

from __future__ import annotations

from normscope.analyses.base import lazy_exports, package_run

run = package_run("sinks")
__getattr__ = lazy_exports(__name__, ("options", "metrics", "reducers", "analysis", "report"))

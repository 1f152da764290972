"""Gradient flow: L2 gradient norms per block and parameter group, and ||dL/dh|| on the residual stream.

The package: ``options.py`` (settings, no torch), ``metrics.py`` (pure functions), ``params.py`` (parameter
groups), ``losses.py`` (the three losses), ``reducers.py`` (the residual-gradient reducer), ``analysis.py`` (the
measurement, the run and its result), ``report.py`` (figures, sentences, the terminal table); its names are
importable from here (``normscope.grads.run(lm, sample)``, ``normscope.grads.measure``), loaded on first use.
"""

from __future__ import annotations

from normscope.analyses.base import lazy_exports, package_run

run = package_run("grads")
__getattr__ = lazy_exports(__name__, ("options", "metrics", "params", "losses", "reducers", "analysis", "report"))

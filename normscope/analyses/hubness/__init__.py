"""Hubness of token representations in the residual stream, before and after each norm, and against W_U.

The package: ``options.py`` (settings, no torch), ``analysis.py`` (metrics, reducers, the run and its
result); its names are importable from here (``normscope.hubness.run(lm, sample)``), loaded on first use.
"""

from __future__ import annotations

from normscope.analyses.base import lazy_exports, package_run

run = package_run("hubness")
__getattr__ = lazy_exports(__name__, ("options", "analysis"))

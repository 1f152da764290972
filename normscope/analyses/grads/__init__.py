"""Gradient flow per layer: parameter-gradient norms per block and group, and the gradient on the residual stream.

The package: ``options.py`` (settings, no torch), ``analysis.py`` (metrics, reducers, the run and its
result); its names are importable from here (``normscope.grads.run(lm, sample)``), loaded on first use.
"""

from __future__ import annotations

from normscope.analyses.base import lazy_exports, package_run

run = package_run("grads")
__getattr__ = lazy_exports(__name__, ("options", "analysis"))

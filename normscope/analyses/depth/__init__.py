"""The curse of depth: variance growth, layer effectiveness and a LayerNorm Scaling what-if, per layer.

The package: ``options.py`` (settings, no torch), ``analysis.py`` (metrics, reducers, the run and its
result); its names are importable from here (``normscope.depth.run(lm, sample)``), loaded on first use.
"""

from __future__ import annotations

from normscope.analyses.base import lazy_exports, package_run

run = package_run("depth")
__getattr__ = lazy_exports(__name__, ("options", "analysis"))

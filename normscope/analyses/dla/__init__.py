"""Direct logit attribution with the cached final-norm scale, against the true direct effect; entropy neurons.

The package: ``options.py`` (settings, no torch), ``analysis.py`` (metrics, reducers, the run and its
result); its names are importable from here (``normscope.dla.run(lm, sample)``), loaded on first use.
"""

from __future__ import annotations

from normscope.analyses.base import lazy_exports, package_run

run = package_run("dla")
__getattr__ = lazy_exports(__name__, ("options", "analysis"))

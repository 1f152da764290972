"""Hubness of token representations in the residual stream, before and after each norm, and against W_U.

The package: ``options.py`` (settings, no torch), ``metrics.py`` (k-NN search and hubness measures, pure),
``reducers.py`` (the matrix collector), ``plan.py`` (hook points, passes under the memory cap, token
bookkeeping), ``analysis.py`` (the passes and the Result) and ``report.py`` (labels, sentences and figures: the
only one that imports plotly). Their names are importable from here (``normscope.hubness.run(lm, sample)``,
``hubness.knn_indices``), loaded on first use.
"""

from __future__ import annotations

from normscope.analyses.base import lazy_exports, package_run

run = package_run("hubness")
__getattr__ = lazy_exports(__name__, ("options", "metrics", "reducers", "plan", "analysis", "report"))

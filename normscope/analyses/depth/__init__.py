"""The curse of depth: variance growth, layer effectiveness and a LayerNorm Scaling what-if, per layer.

The package: ``options.py`` (settings, no torch), ``metrics.py`` (pure functions), ``reducers.py`` (hooks that
fold per batch), ``interventions.py`` (hooks that change the pass: skip a block, scale a norm), ``analysis.py``
(the passes and the Result), ``summary.py`` (labels and sentences) and ``report.py`` (figures, the only one that
imports plotly). Their names are importable from here (``normscope.depth.run(lm, sample)``,
``depth.fit_growth``), loaded on first use.
"""

from __future__ import annotations

from normscope.analyses.base import lazy_exports, package_run

run = package_run("depth")
__getattr__ = lazy_exports(__name__, ("options", "metrics", "reducers", "interventions", "analysis", "summary",
                                      "report"))

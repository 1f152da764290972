"""Direct logit attribution with the cached final-norm scale, against the true direct effect; entropy neurons.

The package: ``options.py`` (settings, no torch), ``metrics.py`` (pure functions), ``plan.py`` (where the
attribution's pieces sit in a model), ``reducers.py`` (per-batch sums), ``direct.py`` and ``bridge.py`` (the two
backends: normscope's hooks and TransformerLens' bridge), ``analysis.py`` (the run and its result), ``report.py``
(figures and sentences); its names are importable from here (``normscope.dla.run(lm, sample)``,
``normscope.dla.plan_model``), loaded on first use.
"""

from __future__ import annotations

from normscope.analyses.base import lazy_exports, package_run

run = package_run("dla")
__getattr__ = lazy_exports(__name__, ("options", "metrics", "plan", "reducers", "direct", "bridge", "analysis",
                                      "report"))

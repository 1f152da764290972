"""normscope: mechanistic analysis of the normalization layers of pretrained transformers.

The Python API mirrors the command line::

    import normscope
    lm = normscope.load_model("smollm2-135m")
    sample = normscope.load_text(lm.tokenizer, normscope.TextOptions(seq_len=64))
    result = normscope.run("sinks", lm, sample, eps=0.3)   # or normscope.sinks.run(lm, sample)
    result.write("reports/smollm2-135m")                  # sinks.html, sinks.json, sinks_<table>.csv
    result.tables["layers"]                               # pandas DataFrames; result.payload is the JSON

``normscope.ANALYSES`` lists what ``run`` accepts (``sinks``, ``depth``, ``grads``, ``hubness``, ``dla``).
Everything is imported on first use, so ``import normscope`` (and ``normscope --help``) stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "load_model": "normscope.core.models",
    "place": "normscope.core.placement",
    "LoadedModel": "normscope.core.models",
    "find_norm_sites": "normscope.core.sites",
    "find_layout": "normscope.core.sites",
    "load_text": "normscope.core.text",
    "sample_from_ids": "normscope.core.text",
    "TextOptions": "normscope.core.options",
    "ModelOptions": "normscope.core.options",
    "NormscopeError": "normscope.core.errors",
    "run": "normscope.analyses",
    "RunContext": "normscope.analyses",
    "AnalysisSpec": "normscope.analyses",
    "Result": "normscope.report",
    "Figure": "normscope.report",
    "compare": "normscope.analyses.suite",
    "run_suite": "normscope.analyses.suite",
}
_PACKAGES = {"sinks", "depth", "grads", "hubness", "dla"}

__all__ = ["__version__", "ANALYSES", *_LAZY, *sorted(_PACKAGES)]


def __getattr__(name: str) -> Any:
    """Import lazily so that ``normscope --help`` does not pay for torch and transformers."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _PACKAGES:
        return importlib.import_module(f"normscope.analyses.{name}")
    if name == "ANALYSES":
        return tuple(importlib.import_module("normscope.analyses").REGISTRY)
    raise AttributeError(f"module 'normscope' has no attribute {name!r}")

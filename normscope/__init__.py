"""normscope: mechanistic analysis of the normalization layers of pretrained transformers.

The Python API mirrors the command line::

    import normscope
    lm = normscope.load_model("smollm2-135m")
    sites = normscope.find_norm_sites(lm.model)
    sample = normscope.load_text(lm.tokenizer, normscope.TextOptions(seq_len=64))
    result = normscope.sinks.run(lm, sample)      # a Result: .payload, .tables (DataFrames), .figures
"""

from __future__ import annotations

__version__ = "0.1.0"

from typing import Any

__all__ = ["__version__", "load_model", "find_norm_sites", "find_layout", "load_text", "TextOptions", "sinks"]


def __getattr__(name: str) -> Any:
    """Import lazily so that ``normscope --help`` does not pay for torch and transformers."""
    if name == "load_model":
        from normscope.models import load_model

        return load_model
    if name in ("find_norm_sites", "find_layout"):
        from normscope import sites

        return getattr(sites, name)
    if name in ("load_text", "TextOptions"):
        from normscope import text

        return getattr(text, name)
    if name in ("sinks", "depth", "grads", "hubness", "dla"):
        import importlib

        return importlib.import_module(f"normscope.{name}")
    raise AttributeError(f"module 'normscope' has no attribute {name!r}")

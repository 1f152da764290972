"""Shared fixtures: the bundled models load once per test session (seconds each, from the cache)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def smollm2():
    """The bundled SmolLM2-135M (LlamaForCausalLM, fp32, eager attention, eval mode, no grads).

    Shared by many tests: do not modify its weights; hooks must be removed (Capture does this).
    """
    import transformers

    from normscope.core.models import load_model

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return load_model("smollm2-135m", device="cpu")


@pytest.fixture(scope="session")
def minilm():
    """The bundled all-MiniLM-L6-v2 (BERT post-LN encoder)."""
    from normscope.core.models import load_model

    return load_model("minilm-l6", device="cpu")

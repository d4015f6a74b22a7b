# pagedserve: the two commands a new user runs are `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU host gets the CPU build of torch; on a GPU host the same pin takes the CUDA build from PyPI.
# Any torch in the project's range works: make TORCH_SPEC='torch>=2.6,<2.15' ...
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= test
# pip writes no bytecode at install (half of a fresh install's time goes to compiling the 17,000 modules of
# torch, ray and transformers); Python writes it for the modules a run imports, once, into the venv. A shell
# with PYTHONDONTWRITEBYTECODE set would then compile every import in every process (each Ray worker too),
# so the recipes here run with it unset.
export PYTHONDONTWRITEBYTECODE :=

.PHONY: install test test-slow generate bench bench-gpu demo-model clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed-$(EXTRAS): pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --no-compile "$(TORCH_SPEC)"
	$(BIN)/pip install --no-compile -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed-$(EXTRAS)

test: install
	$(BIN)/python -m pytest tests --durations=15

# The tests marked slow (pyproject.toml deselects them from `make test`): each runs a Ray cluster of its own,
# such as the several-node cluster of tests/serve_app/test_multinode.py, so they run alone.
test-slow: install
	$(BIN)/python -m pytest tests -m slow --durations=5

generate: install
	$(BIN)/pagedserve generate --prompt "The meaning of a module is" --prompt "A function returns" --max-tokens 48 --temperature 0.7 --seed 0

demo-model: install
	$(BIN)/python -m pagedserve.demo

# Engine vs transformers' generate_batch, then the service (local Ray, demo model) vs the offline engine.
bench: install
	$(BIN)/python bench/engine_bench.py
	$(BIN)/python bench/serve_bench.py --start-service --offline --num-requests 64 --concurrency 64 --max-tokens 64

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

# Serve the OpenAI-compatible API (config/serve.yaml: the built-in demo model at http://127.0.0.1:8000).
# Try it: curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \
#   -d '{"model": "pagedserve-demo", "prompt": "A function returns", "max_tokens": 32}'
# `serve run` on a local Ray whose Prometheus endpoint (metrics export port) and dashboard are on these ports
# (override: make serve PAGEDSERVE_METRICS_PORT=9100, or set them in the environment); it prints the OpenAI
# base URL, the metrics URL and the dashboard URL once the application answers. Ctrl-C (or SIGTERM) stops it.
PAGEDSERVE_METRICS_PORT ?= 8080
PAGEDSERVE_DASHBOARD_PORT ?= 8265
.PHONY: serve
serve: install
	PAGEDSERVE_METRICS_PORT=$(PAGEDSERVE_METRICS_PORT) PAGEDSERVE_DASHBOARD_PORT=$(PAGEDSERVE_DASHBOARD_PORT) \
	  exec $(BIN)/python -m pagedserve.serve_app.run_local config/serve.yaml

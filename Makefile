# The README's commands. `make test` installs first when needed (a fresh clone needs nothing else).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo cluster-demo test lint bench readme clean

setup: $(STAMP)

# torch is pinned on every pip call (constraints.txt): unpinned, deepspeed would pull a CUDA build.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -c constraints.txt -e '.[dev]'
	$(BIN)/python tools/warm_deepspeed.py
	touch $(STAMP)

# Corpus → block-diffusion model → served answers (tools/demo.py): local Ray, files, sqlite MLflow.
demo: setup
	$(BIN)/python tools/demo.py $(DEMO_ARGS)

# An autoscaling cluster on this machine (cluster/local-fake.yaml): nodes added, then removed idle.
cluster-demo: setup
	$(BIN)/python tools/cluster_demo.py

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: setup
	$(BIN)/python bench/attention.py
	$(BIN)/python bench/packing.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/decode.py
	$(BIN)/python bench/levers.py
	$(BIN)/python bench/editing.py
	$(BIN)/python bench/serve.py
	$(BIN)/python bench/pipeline.py
	$(BIN)/python bench/scale.py

# README.md from docs/README.template.md and the figures in bench/results (tests/test_readme.py).
readme: setup
	$(BIN)/python tools/render_readme.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis

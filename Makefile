# Two commands: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CORES ?= all
SNAKEMAKE := $(VENV)/bin/snakemake

.PHONY: venv demo test check lint typecheck bench report clean-results

# The venv sees system site-packages so a GPU machine's own torch is used; CPU torch 2.13.0 only if none.
$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(SNAKEMAKE) --cores $(CORES)
	$(SNAKEMAKE) --cores $(CORES) --report results/snakemake_report.html
	@echo "Report: $(CURDIR)/results/report.html (Snakemake report: $(CURDIR)/results/snakemake_report.html)"

# mypy on notice/ (settings, and why each is what it is, in pyproject.toml).
typecheck: venv
	$(VENV)/bin/mypy

# ruff (lint and format), snakefmt on the Snakefile and rules, and the type check; settings in pyproject.toml.
lint: venv typecheck
	$(VENV)/bin/ruff check notice tests workflow_scripts
	$(VENV)/bin/ruff format --check notice tests workflow_scripts
	$(VENV)/bin/snakefmt --check Snakefile rules

test: lint
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -rs --durations=15 -n auto --dist loadfile tests

# The inner loop: lint and the tests not marked slow (no workflow runs).
check: lint
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n auto --dist loadfile -m "not slow" tests

# `make bench FAMILIES="blip llava"` benches those families only (default: every family of the table).
FAMILIES ?=
bench: venv
	$(PY) -m notice.bench $(if $(strip $(FAMILIES)),--families $(FAMILIES))

clean-results:
	rm -rf results/* .snakemake

# feedback-predictor developer entry points.  Everything runs from the repo
# root with the project venv in .venv (created on demand).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
FBP    := $(PY) -m fbp.cli
PYTEST_ARGS ?=

.PHONY: help venv stack-deps stack-up stack-down stack-status test test-fast demo clean-stack

help:
	@echo "make venv        create/reuse .venv and install the project (+dev extras)"
	@echo "make stack-up    start Kafka + Redis + Prometheus locally (idempotent)"
	@echo "make stack-down  stop them"
	@echo "make test        run the whole test suite (starts the stack itself)"
	@echo "make demo        the whole pipeline: stack, bootstrap model, worker, trainer, replay, summary"

# Reinstall only when pyproject.toml changes; pip's own cache keeps torch.
$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

venv: $(VENV)/.installed

stack-deps:
	@missing=""; for c in java mvn redis-server prometheus; do \
	  command -v $$c >/dev/null 2>&1 || missing="$$missing $$c"; done; \
	if [ -n "$$missing" ]; then \
	  echo "missing programs:$$missing (apt-get install -y openjdk-17-jre-headless maven redis-server prometheus)" >&2; \
	  exit 1; fi

stack-up: venv stack-deps
	$(FBP) stack up

stack-down: venv
	$(FBP) stack down

stack-status: venv
	$(FBP) stack status

test: venv stack-deps
	$(PY) -m pytest -q tests/ $(PYTEST_ARGS)

# Unit tests only (no Kafka/Redis/Prometheus needed).
test-fast: venv
	$(PY) -m pytest -q tests/ -m "not integration" $(PYTEST_ARGS)

# The main job end to end: stack, bootstrap model, worker + trainer, replay, summary.
demo: venv stack-deps
	$(FBP) demo --json runs/demo/summary.json

# Stop the stack and delete its data (Kafka logs, Redis AOF, Prometheus TSDB);
# the downloaded Kafka jars are kept.
clean-stack: venv
	$(FBP) stack down
	rm -rf .stack/kafka .stack/redis .stack/prometheus

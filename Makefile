# feedback-predictor developer entry points.  Everything runs from the repo
# root with the project venv in .venv (created on demand).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
FBP    := $(PY) -m fbp.cli
PYTEST_ARGS ?=

.PHONY: help system-deps venv stack-deps stack-up stack-down stack-status test test-fast test-cluster test-docker demo clean-stack

help:
	@echo "make system-deps install the Debian packages the stack and tests need (root; else prints the command)"
	@echo "make venv        create/reuse .venv and install the project (+dev extras)"
	@echo "make stack-up    start Kafka + Redis + Prometheus locally (idempotent)"
	@echo "make stack-down  stop them"
	@echo "make test        run the whole test suite (starts the stack itself)"
	@echo "make test-cluster the end-to-end tests on a 3-broker Kafka + 3+3 Redis Cluster (WAIT 1)"
	@echo "make test-docker docker compose up on a real Docker engine (root: installs and starts one)"
	@echo "make demo        the whole pipeline: stack, bootstrap model, worker, trainer, replay, summary"

# Debian packages (redis-server, prometheus, Java, Maven, ...): installed when
# missing if run as root, otherwise the exact apt-get command is printed.
# The one list lives in the script; .ci/run calls it too.
system-deps:
	@bash scripts/install-system-deps.sh

# Reinstall only when pyproject.toml changes; pip's own cache keeps torch.
# (demo/test/stack-up list system-deps before venv: the venv needs python3.11-venv.)
$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

venv: $(VENV)/.installed

stack-deps: system-deps

stack-up: system-deps venv
	$(FBP) stack up

stack-down: venv
	$(FBP) stack down

stack-status: venv
	$(FBP) stack status

test: system-deps venv
	$(PY) -m pytest -q tests/ $(PYTEST_ARGS)

# The end-to-end and integration tests against the clusters `fbp stack up
# --kafka-brokers 3 --redis-cluster` starts (RF 3, min.insync.replicas 2, a
# replica acknowledging each state write).  The fault suite is left out: it
# starts private single-node stacks of its own (its cluster scenarios are in
# tests/faults/test_cluster_failover.py, part of `make test`).
CLUSTER_ENV := FBP_STACK__KAFKA_BROKERS=3 FBP_STACK__REDIS_CLUSTER=true \
	FBP_KAFKA__BOOTSTRAP_SERVERS=127.0.0.1:9192,127.0.0.1:9193,127.0.0.1:9194 \
	FBP_KAFKA__REPLICATION_FACTOR=3 FBP_KAFKA__MIN_INSYNC_REPLICAS=2 \
	FBP_REDIS__URL=redis://127.0.0.1:7100/0 FBP_REDIS__CLUSTER_NODES=127.0.0.1:7101,127.0.0.1:7102 \
	FBP_REDIS__CLUSTER=true FBP_REDIS__WAIT_REPLICAS=1
CLUSTER_TESTS := test_stream_e2e test_exactly_once test_keys test_poison_pill test_batch_consumer \
	test_record_faults test_fuzz_events test_unkeyed_takeover test_hot_swap test_foreign_producers \
	test_kcat test_toy_family_e2e test_movie_side_store test_state_store test_trainer_service \
	test_api_fuzz test_dlq_cli test_replay test_live_page test_dashboard test_finetune test_redis_cluster
test-cluster: system-deps venv
	$(FBP) stack up --kafka-brokers 3 --redis-cluster
	$(CLUSTER_ENV) $(PY) -m pytest -q $(patsubst %,tests/%.py,$(CLUSTER_TESTS)) $(PYTEST_ARGS)

# docker-compose.yml's main job on a real engine (tests/test_docker.py): as root
# it installs docker.io + debootstrap and starts dockerd when none runs; cold,
# it builds a ~4 GB image (torch from PyPI), warm it reuses the layers.
test-docker: system-deps venv
	FBP_TEST_DOCKER=1 $(PY) -m pytest -q -s tests/test_docker.py $(PYTEST_ARGS)

# Unit tests only (no Kafka/Redis/Prometheus needed).
test-fast: venv
	$(PY) -m pytest -q tests/ -m "not integration" $(PYTEST_ARGS)

# The main job end to end: stack, bootstrap model, worker + trainer, replay, summary.
demo: system-deps venv
	$(FBP) demo --json runs/demo/summary.json

# Stop the stack and delete its data (Kafka logs, Redis AOF, Prometheus TSDB);
# the downloaded Kafka jars are kept.
clean-stack: venv
	$(FBP) stack down
	rm -rf .stack/kafka .stack/redis .stack/prometheus .stack/kafka-[0-9]* .stack/kafka-cluster.id .stack/redis-node-*

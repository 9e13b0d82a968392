# The two commands of the README: `make demo` and `make test`. Everything else is set up on the way.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export OMP_NUM_THREADS ?= 2

.PHONY: demo test bootstrap binaries lint unit cluster crd

bootstrap:
	@bash scripts/bootstrap.sh

# Local training run of examples/local-demo.yaml on the bundled pairs with a tiny model: no cluster.
demo: bootstrap
	@$(VENV)/bin/kontext-lora demo

# Real servers for the tests (Kubernetes, KWOK, MinIO, helm; cached in ~/.cache/kontext-lora) + Prometheus.
binaries:
	@bash tests/cluster/build_binaries.sh
	@bash tests/cluster/install_system_tools.sh

lint: bootstrap
	@$(VENV)/bin/ruff check .
	@$(VENV)/bin/kontext-lora crd --check
	@$(VENV)/bin/kontext-lora chart --check

# The whole suite: lint, CRD freshness, unit, cluster, e2e. Never skips the cluster tests.
test: bootstrap binaries lint
	@$(VENV)/bin/pytest

crd: bootstrap
	@$(VENV)/bin/kontext-lora crd

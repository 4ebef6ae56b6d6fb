# One entry point for people and CI. `make run` and `make test` set everything up themselves.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
XDS_ADDRESS ?= 127.0.0.1:15010
PYTEST_ARGS ?=

.PHONY: setup run test bench bench-smoke clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "xds-server needs Python >= 3.11 (found $$($(PYTHON) --version))"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

setup: $(STAMP)

# The main job: the server on the embedded default (no cluster needed).
run: setup
	$(BIN)/xds-server serve --resources examples/resources --xds-address $(XDS_ADDRESS)

# Every test: unit, protocol conformance, real Envoy, the stock grpcio xDS client, bench smoke.
test: setup
	$(BIN)/python -m pytest -n 2 --dist loadgroup -p no:cacheprovider $(PYTEST_ARGS)

bench: setup
	$(BIN)/python bench/push_bench.py

clean:
	rm -rf $(VENV) .pytest_cache bench/out

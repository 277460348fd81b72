# Two commands do all set-up on a fresh machine:
#   make run    install, then run one Tandem job on the default model (no servers)
#   make test   install (the Python packages, then what the tests need beyond them:
#               scripts/install_test_deps.sh), then lint and run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
QUESTION ?= Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether in April and May?
PYTEST_ARGS ?=
# llama-cpp-python, built once per machine by scripts/llama_wheel.sh (same version as pyproject.toml)
LLAMA_CPP_VERSION = 0.3.36

.PHONY: install test-deps run test test-fast lint bench deploy-check clean

$(BIN)/tandem: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$$(PYTHON=$(BIN)/python scripts/llama_wheel.sh $(LLAMA_CPP_VERSION))"
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(BIN)/tandem

install: $(BIN)/tandem

# Chromium, bubblewrap, iproute2, pgbouncer, kubectl, the docker compose CLI (and Postgres and
# Redis where neither answers nor is installed); quick when all are there; never fails: where
# something cannot be installed (not root), the tests that need it skip, naming the script.
# The torch extra too: the GPU classifier pool's scoring backend is tested on CPU against
# llama.cpp (torch is pinned to the CPU build; pip takes it from this machine's registry).
test-deps: install
	$(BIN)/pip install --quiet -e '.[dev,torch]' || echo "the torch extra did not install: its test skips"
	PYTHON=$(BIN)/python bash scripts/install_test_deps.sh

run: install
	$(BIN)/tandem run "$(QUESTION)"

lint: install
	$(BIN)/ruff check .

test: install test-deps lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: install test-deps
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

bench: install
	$(BIN)/python bench/engine.py

deploy-check:
	bash scripts/deploy_check.sh

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache tandem.db

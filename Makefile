# Two commands on a fresh machine:  make demo   and   make test
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.olmo-miras-installed
TORCH  ?= torch==2.13.0
# Triton only for the tests: its interpreter runs the memory kernels on CPU (tests/test_triton_linear.py).
TRITON ?= triton==3.6.0

.PHONY: setup demo test test-fast bench clean

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo ">> installing $(TORCH), olmo-miras (+dev extras) and $(TRITON) into $(VENV)"
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[dev]" "$(TRITON)"
	@touch $(STAMP)

setup: $(STAMP)

## Train the tiny embedded default (offline, CPU, a few minutes) and save a checkpoint under runs/.
demo: setup
	WANDB_MODE=offline $(BIN)/python scripts/train.py train_configs/tiny_miras.py

## Set up, then run the whole test suite.
test: setup
	$(BIN)/python -m pytest -q

## Skip the slower tests (still all CPU).
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

bench: setup
	$(BIN)/python scripts/bench_memory.py --seq 1024 4096 --d-model 256 --heads 4 --head-dim 64

clean:
	rm -rf $(VENV) runs .pytest_cache

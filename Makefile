# Two commands do all the set-up on a fresh machine:
#   make train   create .venv, install, run `python train.py --trace azure`
#   make test    create .venv, install, run the test suite
# and one reruns the headline numbers (docs/RESULTS.md "Main table", about 10 minutes on 2 cores):
#   make evaluate   every controller on the held-out split, shipped policy, into results/
# torch is installed first and pinned so pip does not pull a CUDA build on CPU machines.
# GPU users: make train TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TRAIN_ARGS ?=
TEST_ARGS ?=
CHECKPOINT ?= checkpoints/ppo-default
RESULTS ?= results

BIN := $(VENV)/bin
STAMP := $(VENV)/.opscale-installed

.PHONY: install train test evaluate clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install $(TORCH)
	$(BIN)/python -m pip install -e '.[dev,cluster]'
	touch $(STAMP)

train: $(STAMP)
	$(BIN)/python train.py --trace azure $(TRAIN_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(TEST_ARGS)

evaluate: $(STAMP)
	$(BIN)/python -m agents.evaluate --trace azure --split test \
	  --controllers static,model-level,model-level-ongoing,operator-queueing,ppo \
	  --checkpoint $(CHECKPOINT) --json $(RESULTS)/test_reference.json --plots $(RESULTS) \
	  --budget-gpus 24 --budget-fidelity reference

clean-venv:
	rm -rf $(VENV)

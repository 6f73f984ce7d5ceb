# kotune — set-up and main jobs. Every target creates .venv if it is missing.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
CONFIG  ?= configs/civil_law.yaml
RUN     ?= runs/civil_law
PYTEST_ARGS ?=

.PHONY: setup demo train chat test test-fast clean docs lint

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch first and pinned: an unpinned torch would pull several GB of CUDA wheels.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

## Main job: fine-tune the civil-law chatbot on CPU, then answer the quick-test questions.
demo: setup
	@if [ -f $(RUN)/adapter/adapter_model.safetensors ]; then \
		echo "$(RUN) is already trained (delete it, or use 'make train', to train again)"; \
	elif [ -d $(RUN)/checkpoints ] && ls $(RUN)/checkpoints | grep -q '^step-'; then \
		$(BIN)/kotune train --config $(CONFIG) --resume; \
	else \
		$(BIN)/kotune train --config $(CONFIG); \
	fi
	$(BIN)/kotune chat $(RUN) --quick_test

train: setup
	$(BIN)/kotune train --config $(CONFIG) --overwrite

chat: setup
	$(BIN)/kotune chat $(RUN)

## Tests: everything, including the slow test on the real default model.
## Style (ruff: line length 120, import order, pyflakes), then the whole suite.
lint: setup
	$(BIN)/ruff format --check src tests bench
	$(BIN)/ruff check src tests bench

test: setup lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

docs: setup
	$(BIN)/kotune config --reference > docs/config.md

clean:
	rm -rf $(VENV) runs .pytest_cache

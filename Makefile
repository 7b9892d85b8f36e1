# Two entry points for a newcomer: `make demo` (prune the embedded SmolLM2 at 20 %) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-fast fuzz compat lint cuda-compile package-check

setup:
	bash scripts/setup.sh

demo: setup
	$(VENV)/bin/fastprune prune --model smollm2 --ratio 0.2

test: setup
	$(MAKE) lint
	bash scripts/compile_cuda.sh
	FASTPRUNE_REQUIRE_EXT=1 FASTPRUNE_REQUIRE_TRITON=1 $(PY) -m pytest -q

test-fast:
	$(PY) -m pytest -q -m "not slow"

# fuzzed equivalence and save/load on 500 random models and plans (seeds 0-499; every test run checks 0-29)
fuzz:
	FASTPRUNE_FUZZ_CASES=500 $(PY) -m pytest -q tests/test_fuzz.py

# the fast tests at the oldest supported transformers, peft, accelerate ... (README "Supported versions");
# reuses the C++ extension `make setup` built (or builds it), in a second venv, .venv-low
compat:
	bash scripts/compat.sh

lint:
	$(VENV)/bin/ruff check .

cuda-compile:
	bash scripts/compile_cuda.sh

# sdist -> wheel -> fresh venv -> CLI end to end, and without a compiler (run by CI, about 4 minutes)
package-check: setup
	$(PY) scripts/package_check.py

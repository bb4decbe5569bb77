# studio: `make demo` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

CHROMIUM ?= /usr/bin/chromium

.PHONY: install browser demo test lint bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev,ray]'
	touch $(STAMP)

install: $(STAMP)

# Debian's Chromium, driven by Playwright in the web UI's browser tests (tests/test_ui_browser.py)
$(CHROMIUM):
	@command -v apt-get >/dev/null || { echo "install Chromium at $(CHROMIUM) (or set CHROMIUM=path)"; exit 1; }
	SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium

browser: $(CHROMIUM)

demo: install
	$(BIN)/studio demo

test: install browser
	STUDIO_CHROMIUM=$(CHROMIUM) $(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check studio adapters pipelines tests bench app.py

bench: install
	$(BIN)/python bench/generate.py

clean:
	rm -rf $(VENV) out outputs .pytest_cache build *.egg-info

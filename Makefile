# Set-up is one resolver pass into .venv (pins live in pyproject.toml); the stamp refreshes it
# whenever pyproject.toml changes.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.xmodal-installed
PYTEST_ARGS ?=

.PHONY: install demo test clean

$(STAMP): pyproject.toml
	@command -v npm >/dev/null || { echo "npm is required (the emoji corpus ships in npm packages): install Node.js/npm" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/xmodal demo

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) xmodal.egg-info

# Set-up is one resolver pass into .venv (pins live in pyproject.toml); the stamp refreshes it
# whenever pyproject.toml changes.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.xmodal-installed
PYTEST_ARGS ?=

.PHONY: install demo test clean browser

# The web page test drives Debian's chromium; without it that one test skips and says why.
browser:
	@if [ -x /usr/bin/chromium ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian's chromium for the browser test"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null; \
	else echo "note: /usr/bin/chromium is missing and cannot be installed here: the browser test will be skipped"; fi

$(STAMP): pyproject.toml
	@command -v npm >/dev/null || { echo "npm is required (the emoji corpus ships in npm packages): install Node.js/npm" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps \
	  $$($(BIN)/python -c "import tomllib; print(' '.join(tomllib.load(open('pyproject.toml', 'rb'))['tool']['xmodal']['no-deps']))")
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/xmodal demo

test: $(STAMP) browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) xmodal.egg-info

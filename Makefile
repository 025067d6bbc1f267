# Set-up is one resolver pass into .venv (pins live in pyproject.toml) of every part
# (`.[all,test]`); the stamp refreshes it whenever pyproject.toml changes.
PYTHON ?= python3
# The Pythons every part installs on. The client alone also installs on 3.13, the full stack does
# not: nvidia-pytriton (the tritonserver) requires numpy<2, which has no wheel for 3.13.
FULL_STACK_PYTHONS := 3.11 3.12
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.xmodal-installed
PYTEST_ARGS ?=

.PHONY: install demo test clean browser

# The web page test drives Debian's chromium; without it that test fails and says why.
browser:
	@if [ -x /usr/bin/chromium ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian's chromium for the browser test"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null; \
	else echo "note: /usr/bin/chromium is missing and cannot be installed here: the browser test will fail"; fi

$(STAMP): pyproject.toml
	@version=$$($(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])') || exit 1; \
	case " $(FULL_STACK_PYTHONS) " in *" $$version "*) ;; *) \
	  echo "make demo/test need one of the Python versions $(FULL_STACK_PYTHONS), but $(PYTHON) is $$version;" \
	    "choose one with PYTHON=, e.g. make test PYTHON=python3.12. (On 3.13 the client alone installs," \
	    "pip install .; the full stack does not: nvidia-pytriton requires numpy<2, which has no wheel for 3.13.)" >&2; \
	  exit 1;; esac
	@command -v npm >/dev/null || { echo "npm is required (the emoji corpus ships in npm packages): install Node.js/npm" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[all,test]'
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

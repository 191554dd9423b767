# Two commands on a fresh machine, one virtual environment for both:
#   make demo   set up .venv if needed, then run the demo on a generated scene
#   make test   set up .venv if needed, then run the test suite
# Set-up uses uv (the pinned set is 7 GB with torch's CUDA libraries: about a minute with uv,
# ten with pip). It adds the package indexes pip is configured with, if any, and a local folder
# of wheels named by VITAD_WHEELS, if it exists; neither is needed.
PYTHON ?= python3.11
VENV ?= .venv
UV_VERSION := 0.13.9
STAMP := $(VENV)/.installed

.PHONY: demo test setup clean-venv

demo: $(STAMP)
	$(VENV)/bin/vitad demo --out runs/demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q --durations=15

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q uv==$(UV_VERSION)
	UV_EXTRA_INDEX_URL="$$($(PYTHON) -m pip config get global.extra-index-url 2>/dev/null || true)" \
	    $(VENV)/bin/uv pip install -q -p $(VENV) --index-strategy unsafe-best-match \
	    $$(if [ -d "$${VITAD_WHEELS:-}" ]; then echo --find-links "$$VITAD_WHEELS"; fi) \
	    -e '.[test]'
	touch $(STAMP)

clean-venv:
	rm -rf $(VENV)

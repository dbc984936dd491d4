# Two commands do all set-up on a fresh machine:  make test   |   make demo
# torch/torchvision must be a matching pair (torch 2.14.1 + torchvision 0.29.1 on the CI machine).
VENV   ?= .venv
PYTHON ?= python3
PY      = $(VENV)/bin/python
PYTEST_ARGS ?= -q

.PHONY: test test-all demo demo-full demo-readme venv system-deps clean-demo

$(VENV)/.installed: requirements.txt requirements-test.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip >/dev/null
	$(PY) -m pip install -q -r requirements-test.txt
	$(PY) -m pip install -q --no-deps -e . --config-settings editable_mode=strict
	@touch $@

venv: $(VENV)/.installed

# Debian data package used by the DigitsDG-mini open-set split (Fashion-MNIST); installed when we are root.
system-deps:
	@if [ ! -d /usr/share/datasets/fashion-mnist ]; then \
	  if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null; then \
	    (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	     (apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null)) || \
	    echo "warning: could not install dataset-fashion-mnist (tests that need it are skipped)"; \
	  else echo "note: run 'sudo apt-get install dataset-fashion-mnist' for the Fashion-MNIST open-set data"; fi; \
	fi

test: venv system-deps
	cd $(CURDIR) && HF_HUB_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS) tests

test-all: venv system-deps
	cd $(CURDIR) && HF_HUB_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS) -m "slow or not slow" tests

demo: venv system-deps
	cd CoOp && HF_HUB_OFFLINE=1 ../$(PY) -m demo

# the stronger variant: seeds 1-5, CoCoOp, CRoFT over the official lambda2 grid
demo-full: venv system-deps
	cd CoOp && HF_HUB_OFFLINE=1 ../$(PY) -m demo --full

# run (or reuse) the demo and write its tables and figures into README.md and docs/demo/
demo-readme: venv system-deps
	cd CoOp && HF_HUB_OFFLINE=1 ../$(PY) -m demo --readme ../docs/demo.md --figures ../docs/demo

clean-demo:
	rm -rf .cache/demo .cache/demo-full

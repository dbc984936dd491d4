# Two commands do all set-up on a fresh machine:  make test   |   make demo
# torch/torchvision must be a matching pair (torch 2.14.1 + torchvision 0.29.1 on the CI machine).
VENV   ?= .venv
PYTHON ?= python3
PY      = $(VENV)/bin/python
PYTEST_ARGS ?= -q

.PHONY: test test-all test-kernels demo demo-full demo-readme venv system-deps clean-demo

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

# The numerics-sensitive tests once per KERNEL_ENVS entry: other PyTorch (ATen), oneDNN and MKL CPU kernels on
# this machine, as another CPU of the machine kind would run them (tests/README.md, "Other CPUs").
KERNEL_TESTS ?= tests/test_croft_parity.py tests/test_croft_trainer.py tests/test_clip_package.py \
	tests/test_scores.py tests/test_precision.py tests/test_knn_id_side.py tests/test_eval_onepass.py \
	tests/test_feature_cache.py::test_views_do_not_depend_on_where_the_data_lies \
	tests/test_feature_cache.py::test_cache_is_built_once_and_reused \
	tests/test_feature_cache.py::test_cached_test_features_equal_direct_encoding \
	tests/test_feature_cache.py::test_a_cached_feature_does_not_depend_on_its_batch \
	tests/test_stacked.py::test_member_stack_equals_separate_runs
KERNEL_ENVS ?= "ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_CBWR=COMPATIBLE" "ATEN_CPU_CAPABILITY=default"
test-kernels: venv system-deps
	@cd $(CURDIR) && for kernels in $(KERNEL_ENVS); do \
	  echo "== CPU kernels: $$kernels (ATen: $$(env $$kernels $(PY) -c 'import torch; \
	    print(torch.backends.cpu.get_cpu_capability())'))"; \
	  env $$kernels HF_HUB_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS) $(KERNEL_TESTS) || exit 1; \
	done

demo: venv system-deps
	cd CoOp && HF_HUB_OFFLINE=1 ../$(PY) -m demo

# the stronger variant: 30 epochs, CoCoOp, CRoFT over the official lambda2 grid
demo-full: venv system-deps
	cd CoOp && HF_HUB_OFFLINE=1 ../$(PY) -m demo --full

# run (or reuse) the demo and write its section into docs/demo.md, its headline into README.md, figures to docs/demo/
demo-readme: venv system-deps
	cd CoOp && HF_HUB_OFFLINE=1 ../$(PY) -m demo --readme ../docs/demo.md --headline ../README.md --figures ../docs/demo

# everything the demo made (data, tiny CLIP copy, feature cache, runs); the npm download stays
clean-demo:
	rm -rf .cache/demo .cache/demo-full .cache/demo-quick .cache/data .cache/features .cache/tinyclip \
	  .cache/tinyclip-pretrained

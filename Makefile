# Two entry points for a fresh machine: `make demo` and `make test`. Each sets itself up.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BUILD := .build

.PHONY: demo test lint venv clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[torch,serve,dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/stepaudio2 tiny --out $(BUILD)/tiny --seed 0
	$(BIN)/stepaudio2 generate --checkpoint $(BUILD)/tiny --task asr --audio stepaudio2/assets/hello_en.wav --max-new-tokens 24
	$(BIN)/stepaudio2 generate --checkpoint $(BUILD)/tiny --task chat --text "Hello, who are you?" --max-new-tokens 24 --json

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) $(BUILD)

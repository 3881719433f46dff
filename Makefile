# sd35trt: `make engines GPU=ada` builds the tiny default end to end; `make test` runs the suite.
# Everything runs inside .venv, created and filled from requirements.lock on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CLI := $(VENV)/bin/sd35trt
STAMP := $(VENV)/.installed

GPU ?= ada
MODEL ?= tiny
BACKEND ?= auto
WORK ?= build/$(MODEL)
ENGINES ?= engines
PROMPTS ?= calibration/prompts.txt
NUM_PROMPTS ?= 8
STEPS ?= 4

.PHONY: install engines export calibrate build test lock clean help

help:
	@echo "make engines GPU=ada [MODEL=tiny]   export -> calibrate -> build one engine bundle (steps skip when unchanged)"
	@echo "make test                           run the test suite (CPU, tiny preset)"
	@echo "make install                        create $(VENV) with the pinned stack (requirements.lock)"

$(STAMP): requirements.lock pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	@touch $@

install: $(STAMP)

export: $(STAMP)
	$(CLI) export --model $(MODEL) --out $(WORK)

calibrate: export
	$(CLI) calibrate --model $(MODEL) --out $(WORK) --prompts $(PROMPTS) --num-prompts $(NUM_PROMPTS) --steps $(STEPS)

build: calibrate
	$(CLI) build --gpu $(GPU) --backend $(BACKEND) --onnx $(WORK) --out $(ENGINES)

engines: build

test: $(STAMP)
	$(PY) -m pytest -q tests

lock:
	$(PY) -m pip freeze --exclude-editable | sed 's/+cpu//' > requirements.lock.new && mv requirements.lock.new requirements.lock

clean:
	rm -rf build

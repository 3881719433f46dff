# sd35trt: `make engines GPU=ada` builds the tiny default end to end; `make test` runs the suite.
# Everything runs inside .venv, created and filled from requirements.lock on first use.
# SYSTEM_PYTHON=1 uses the current python3 and its packages instead (a GPU host with its own CUDA stack).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
ifeq ($(SYSTEM_PYTHON),1)
PY := $(PYTHON)
CLI := $(PYTHON) -m sd35trt
STAMP :=
else
PY := $(VENV)/bin/python
CLI := $(VENV)/bin/sd35trt
STAMP := $(VENV)/.installed
endif

GPU ?= ada
MODEL ?= tiny
BACKEND ?= auto
WORK ?= build/$(MODEL)
ENGINES ?= engines
PROMPTS ?= calibration/prompts.txt
# FP8 components (transformer,t5 adds T5-XXL in FP8: docs/BENCHMARKS.md has its measured error), calibration
# workers (SHARDS=2: one per GPU), and extra build options (BUILD_FLAGS=--portable for full TensorRT).
FP8 ?= transformer
SHARDS ?= 1
BUILD_FLAGS ?=
# Calibration size (sd35trt.calibrate.calibration_size says why): tiny 8 x 4 at 512 px, real SD3.5 32 prompts
# x 20 steps at 1024 px.
NUM_PROMPTS ?= $(if $(filter tiny,$(MODEL)),8,32)
STEPS ?= $(if $(filter tiny,$(MODEL)),4,20)
SIZE ?= $(if $(filter tiny,$(MODEL)),512,1024)

.PHONY: install engines export calibrate build test lint selftest lock clean help

help:
	@echo "make engines GPU=ada [MODEL=tiny]   calibrate -> export -> build one engine bundle (steps skip when unchanged)"
	@echo "make test                           run the test suite (CPU, tiny preset)"
	@echo "make selftest                       on a GPU host: tiny engines for this GPU, generate and compare through them"
	@echo "make install                        create $(VENV) with the pinned stack (requirements.lock)"

$(VENV)/.installed: requirements.lock pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	@touch $@

install: $(VENV)/.installed

calibrate: $(STAMP)
	$(CLI) calibrate --model $(MODEL) --out $(WORK) --prompts $(PROMPTS) --num-prompts $(NUM_PROMPTS) --steps $(STEPS) \
	  --height $(SIZE) --width $(SIZE) --components $(FP8) --shards $(SHARDS)

export: calibrate
	$(CLI) export --model $(MODEL) --out $(WORK)

build: export
	$(CLI) build --gpu $(GPU) --backend $(BACKEND) --onnx $(WORK) --out $(ENGINES) $(BUILD_FLAGS)

engines: build

test: $(STAMP)
	$(PY) -m pytest -q tests

selftest: $(STAMP)
	$(CLI) selftest --out build/selftest

lint: $(STAMP)
	$(PY) -m ruff check sd35trt tests bench
	# engine code against the TensorRT 11.4 and TensorRT-RTX 1.7 APIs (typings/, sd35trt/typecheck.py)
	$(PY) -m mypy --always-false CHECK_RTX sd35trt/backends.py sd35trt/runners.py sd35trt/portability.py
	$(PY) -m mypy --always-true CHECK_RTX sd35trt/backends.py sd35trt/runners.py

lock:
	$(PY) -m pip freeze --exclude-editable | sed 's/+cpu//' > requirements.lock.new && mv requirements.lock.new requirements.lock

clean:
	rm -rf build

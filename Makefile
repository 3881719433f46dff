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
# A preset's name, or a model directory's own name (MODEL=/data/sd3.5-large/ -> build/sd3.5-large).
# QUANT=int4|nvfp4: a 4-bit transformer; QUANT=mixed: FP8 with INT4 in the layers that cost least, to fit
# MIXED_GIB= (the transformer's weights in GiB; default midway between all FP8 and all INT4); T5=0: CLIP-only. Each
# has its own work dir and bundle folder (-int4, -mixed, -clip) beside the full FP8 ones: one never recalibrates or
# replaces the other.
QUANT ?= fp8
MIXED_GIB ?=
MIXED_FLAG := $(if $(MIXED_GIB),--max-transformer-gib $(MIXED_GIB))
T5 ?= 1
WORK ?= build/$(shell basename -- "$(MODEL)")$(if $(filter-out fp8,$(QUANT)),-$(QUANT))$(if $(filter 0,$(T5)),-clip)
ENGINES ?= engines
PROMPTS ?= calibration/prompts.txt
ORT_VERSION := $(shell sed -n 's/^onnxruntime==//p' requirements.lock)
# The components calibrated to QUANT's format (FP8= is this knob's older name): transformer,t5 adds T5-XXL in FP8
# (docs/BENCHMARKS.md has its measured error); 4-bit formats quantize the transformer only. INT8=clip_l,clip_g[,t5]:
# those components' weights stored in INT8 (weight-only, per output channel; no calibration), half their FP16 size,
# on every GPU target. Calibration workers (SHARDS=2: one per GPU), and extra build options (BUILD_FLAGS=--portable
# for full TensorRT).
FP8 ?= transformer
QUANTIZE ?= $(FP8)
INT8 ?=
INT8_FLAG := $(if $(INT8),--int8 "$(INT8)")
SHARDS ?= 1
BUILD_FLAGS ?=
# Where calibrate and export run torch (auto: the GPU when there is one): DEVICE=cpu on a build box whose GPU is too
# small or busy (slower; host memory instead).
DEVICE ?=
DEVICE_FLAG := $(if $(DEVICE),--device "$(DEVICE)")
# Engine shape ranges (export's --height/--width, MIN:OPT:MAX pixels; default 512:1024:1536; --batch images per
# prompt, default 1:1:4): checked by preflight. An engine holds activation memory for its largest shapes, so ranges
# that end where a small card's requests end (`sd35trt doctor BUNDLE --vram 8` names them) shrink its plans.
HEIGHT ?=
WIDTH ?=
BATCH ?=
RANGE_FLAGS := $(if $(HEIGHT),--height "$(HEIGHT)") $(if $(WIDTH),--width "$(WIDTH)") $(if $(BATCH),--batch "$(BATCH)")
# T5=0: a CLIP-only bundle (no T5-XXL: 9.5 GB less at SD3.5 size), calibrated on CLIP-only traffic.
T5_FLAG := $(if $(filter 0,$(T5)),--no-t5,)
# LORA=adapter.safetensors[:scale][,more]: style adapters fused into the model before calibration.
LORA ?=
LORA_FLAG := $(if $(LORA),--lora "$(LORA)",)
# RECIPE=mine.toml: your own recipe (calibration/fp8.toml's format: excludes, FP32-island sites, margin) for calibrate
# and export (INT8 takes its layers from it).
RECIPE ?=
RECIPE_FLAG := $(if $(RECIPE),--config "$(RECIPE)",)
# Calibration size: by default calibrate chooses it from the model (sd35trt.producers.calibrate.calibration_size:
# a test-size model 8 x 4 at 512 px, real SD3.5 32 prompts x 20 steps at 1024 px, Turbo its 4 steps); set to override.
NUM_PROMPTS ?=
STEPS ?=
SIZE ?=
CALIB_SIZE := $(if $(NUM_PROMPTS),--num-prompts $(NUM_PROMPTS)) $(if $(STEPS),--steps $(STEPS)) \
  $(if $(SIZE),--height $(SIZE) --width $(SIZE))

.PHONY: install preflight engines export calibrate build test test-fast lint selftest lock clean help

help:
	@echo "make engines GPU=ada [MODEL=tiny]   preflight -> calibrate -> export -> build one engine bundle (steps skip when unchanged)"
	@echo "  knobs: MODEL= GPU= QUANT=fp8|int4|nvfp4|mixed MIXED_GIB= INT8=clip_l,clip_g T5=0 HEIGHT= WIDTH= BATCH= QUANTIZE=transformer,t5 LORA=a.safetensors[:scale] RECIPE=mine.toml SHARDS=2 DEVICE=cpu BUILD_FLAGS=..."
	@echo "make test                           run the test suite (CPU, tiny preset; what CI runs)"
	@echo "make test-fast                      the pure-function tier (no model, no build): under 90 s"
	@echo "make selftest                       on a GPU host: tiny engines for this GPU, generate and compare through them"
	@echo "make install                        create $(VENV) with the pinned stack (requirements.lock)"

$(VENV)/.installed: requirements.lock pyproject.toml
	@echo "creating $(VENV) with the pinned stack (requirements.lock: torch CPU, diffusers, ModelOpt, TensorRT-RTX, ...):"
	@echo "  about 1.5 min and 1.9 GB the first time; later runs reuse it"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@{ $(PY) -m pip install -q --upgrade pip && $(PY) -m pip install -q -r requirements.lock && \
	   $(PY) -m pip install -q --no-deps --no-build-isolation -e . ; } > $(VENV)/install.log 2>&1 || \
	   { grep -v '^WARNING: Location' $(VENV)/install.log | tail -30; echo "installing $(VENV) failed: $(VENV)/install.log has it all"; exit 1; }
	@# A GPU host validates exports on onnxruntime's CUDA provider: the same version, GPU build, in place of the CPU one.
	@if nvidia-smi -L > /dev/null 2>&1; then echo "  NVIDIA GPU found: onnxruntime-gpu $(ORT_VERSION) replaces the CPU onnxruntime"; \
	   $(PY) -m pip uninstall -q -y onnxruntime >> $(VENV)/install.log 2>&1; \
	   $(PY) -m pip install -q onnxruntime-gpu==$(ORT_VERSION) >> $(VENV)/install.log 2>&1 || \
	   { echo "installing onnxruntime-gpu failed ($(VENV)/install.log)"; exit 1; }; fi
	@touch $@

install: $(VENV)/.installed

# Model, target and options are checked before any step (a bad GPU= or MODEL= fails in seconds, not after export).
preflight: $(STAMP)
	@$(CLI) preflight --model "$(MODEL)" --gpu "$(GPU)" --backend "$(BACKEND)" --quantize "$(QUANTIZE)" --format "$(QUANT)" --work "$(WORK)" \
	  --engines "$(ENGINES)" $(RANGE_FLAGS) $(T5_FLAG) $(LORA_FLAG) $(DEVICE_FLAG) $(INT8_FLAG) $(RECIPE_FLAG)

calibrate: preflight
	$(CLI) calibrate --model "$(MODEL)" --out "$(WORK)" --prompts "$(PROMPTS)" $(strip $(CALIB_SIZE)) \
	  --components "$(QUANTIZE)" --format "$(QUANT)" $(MIXED_FLAG) --shards "$(SHARDS)" $(T5_FLAG) $(LORA_FLAG) $(DEVICE_FLAG) \
	  $(RECIPE_FLAG)

export: calibrate
	$(CLI) export --model "$(MODEL)" --out "$(WORK)" --gpu "$(GPU)" $(RANGE_FLAGS) $(T5_FLAG) $(LORA_FLAG) $(DEVICE_FLAG) $(INT8_FLAG) \
	  $(RECIPE_FLAG)

build: export
	$(CLI) build --gpu "$(GPU)" --backend "$(BACKEND)" --onnx "$(WORK)" --out "$(ENGINES)" $(T5_FLAG) $(INT8_FLAG) $(BUILD_FLAGS)

engines: build

# Two test workers (pytest-xdist, one per core of the 2-core CI box), a test module per worker at a time, the
# costliest modules first (tests/conftest.py HEAVY_FIRST; xdist would otherwise reorder by test count).
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -m fast tests

selftest: $(STAMP)
	$(CLI) selftest --out build/selftest

ENGINE_CODE := sd35trt/core/trt_api.py sd35trt/producers/trt_builder.py sd35trt/producers/refit.py sd35trt/runtime/trt.py sd35trt/runtime/session.py \
  sd35trt/runtime/runners.py

lint: $(STAMP)
	$(PY) -m ruff check sd35trt tests bench
	# the layers: the runtime never imports a producer, no import circle (tests/test_layers.py reads the source);
	# no function over 60 lines outside tests/test_legibility.py's list of exceptions and their reasons
	$(PY) -m pytest -q -p no:cacheprovider tests/test_layers.py tests/test_legibility.py -k "not host_without"
	# engine code against the TensorRT 11.4 and TensorRT-RTX 1.7 APIs (typings/, sd35trt/core/trt_api.py)
	$(PY) -m mypy --always-false CHECK_RTX $(ENGINE_CODE) sd35trt/core/portability.py
	$(PY) -m mypy --always-true CHECK_RTX $(ENGINE_CODE)

lock:
	$(PY) -m pip freeze --exclude-editable | sed 's/+cpu//' > requirements.lock.new && mv requirements.lock.new requirements.lock

clean:
	rm -rf build

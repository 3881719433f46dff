#!/usr/bin/env bash
# #31 "reach the refusal", on the GPU machine (H200, compute capability 9.0, which TensorRT-RTX does not run): every
# command that opens engines must get as far as TensorRT-RTX's own compute-capability refusal ("Error Code 6 ...
# compute capability 9.0") and fail there in one line, not earlier on anything of sd35trt's.
#
#   bash bench/reach_refusal.sh [RUN]     RUN: a work folder (default /tmp/refusal); results in RUN/refusal.jsonl
#
# Builds the tiny bundle for SM89 ahead of time (`make engines GPU=ada`, calibration on the GPU) and a refittable one
# (`build --refittable`: TensorRT-RTX needs a CUDA driver for those, which this machine has), then runs generate,
# bench, compare (sd35trt's engine session and polygraphy's TrtRunner twin), selftest (it builds for this GPU:
# TensorRT-RTX has no ahead-of-time SM90 target, so it builds for CURRENT), refit and doctor, and records each one's
# exit code and last line. Then EngineSession's own CUDA paths on the real GPU (tests/test_session_gpu.py).
set -uo pipefail
RUN=${1:-/tmp/refusal}; PY=${PY:-python3}
CLI="$PY -m sd35trt"
mkdir -p "$RUN"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
RESULTS=$RUN/refusal.jsonl
BUNDLE=$RUN/engines/tiny/ada-tensorrt-rtx

record() {  # LABEL -- COMMAND...: run it, keep its exit code, its stderr's last line and whether the runtime said it
  local label=$1; shift 2
  local start=$SECONDS
  "$@" > "$RUN/out.txt" 2> "$RUN/err.txt"
  local rc=$?
  "$PY" - "$RESULTS" "$label" "$rc" "$((SECONDS - start))" "$RUN/err.txt" "$*" <<'PYEOF'
import json, sys
results, label, rc, seconds, err, command = sys.argv[1:]
lines = [l for l in open(err, encoding="utf-8", errors="replace").read().splitlines() if l.strip()]
last = lines[-1] if lines else ""
row = {"command": label, "exit_code": int(rc), "seconds": int(seconds), "last_line": last[:1500],
       "runtime_refusal": "Error Code 6" in last or "compute capability 9.0" in last,
       "traceback": any(l.startswith("Traceback") for l in lines), "argv": command}
open(results, "a").write(json.dumps(row) + "\n")
print(json.dumps(row)[:600])
PYEOF
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader
  "$PY" -c "import tensorrt_rtx_bindings as t, torch; print('tensorrt-rtx', t.__version__, 'torch', torch.__version__)"; } \
  > "$RUN/machine.txt" 2>&1
make engines MODEL=tiny GPU=ada WORK="$RUN/work" ENGINES="$RUN/engines" NUM_PROMPTS=4 STEPS=2 SYSTEM_PYTHON=1 \
  PYTHON="$PY" > "$RUN/make.log" 2>&1 || { echo "make engines failed"; tail -20 "$RUN/make.log"; }
$CLI build --onnx "$RUN/work" --out "$RUN/engines-refit" --refittable > "$RUN/refit-build.log" 2>&1 \
  || tail -5 "$RUN/refit-build.log"
small=(--steps 2 --height 512 --width 512)
record "generate --bundle" -- $CLI generate --bundle "$BUNDLE" --prompt "a lighthouse" "${small[@]}" --out "$RUN/x.png"
record "bench --bundle" -- $CLI bench --bundle "$BUNDLE" --steps 1 --images 1 --loop-steps 2 --height 512 --width 512
record "compare --bundle (sd35trt session + polygraphy TrtRunner)" -- $CLI compare --bundle "$BUNDLE" --model tiny \
  --prompts 1 --steps 2 --out "$RUN/compare"
record "doctor BUNDLE" -- $CLI doctor "$BUNDLE"
record "refit (a --refittable bundle)" -- $CLI refit "$RUN/engines-refit/tiny/ada-tensorrt-rtx" --onnx "$RUN/work" \
  --out "$RUN/refit"
record "selftest (builds for this GPU)" -- $CLI selftest --out "$RUN/selftest" --json
cp "$RUN/selftest/selftest.json" "$RUN/selftest-report.json" 2>/dev/null
record "pytest tests/test_session_gpu.py (EngineSession on the real GPU)" -- $PY -m pytest -q -p no:cacheprovider \
  tests/test_session_gpu.py

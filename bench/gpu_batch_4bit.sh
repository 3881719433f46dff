#!/usr/bin/env bash
# One GPU-machine round (H200) for #31, #33 and #35, in resumable stages run by one detached chain:
#   refusal   bash bench/reach_refusal.sh: every engine command reaches TensorRT-RTX's own CC 9.0 refusal
#   batch     #33: generate --prompts, torch runner BF16, SD3.5-Medium (random weights), 1024², 28 steps, 16 images
#             (4 prompts x 4) at --batch 1, 2, 4, auto, then --batch auto --max-power 400; one summary JSON each
#   nvfp4     #35: the tiny NVFP4 chain with calibrate on CUDA, export, TensorRT-RTX build for SM120 (ahead of time)
#   int4      #35: SD3.5-Medium INT4 (AWQ on the GPU, small calibration), export validated on onnxruntime-gpu
#             (held-out traffic vs FP32), SM89 build: engine size and INT4 weight count
#
#   bash bench/gpu_batch_4bit.sh launch [STAGES...]   detached (setsid); returns at once
#   bash bench/gpu_batch_4bit.sh wait SECONDS         until done or SECONDS; copies results to $OUT
set -uo pipefail
STAGE=${1:?stage}; shift
RUN=${RUN:-/tmp/round}; PY=${PY:-python3}
CLI="$PY -m sd35trt"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
source bench/chain.sh

stage_batch() {
  head -4 calibration/prompts.txt > "$RUN/p4.txt"
  local common=(--prompts "$RUN/p4.txt" --images-per-prompt 4 --torch --model sd3.5-medium --height 1024 --width 1024
                --steps 28 --json)
  for b in ${BATCHES:-1 2 4 auto}; do
    $CLI generate "${common[@]}" --batch $b --out "$RUN/batch/b$b" > "$RUN/batch-b$b.json" 2> "$RUN/batch-b$b.log"
  done
  $CLI generate "${common[@]}" --batch auto --max-power 400 --out "$RUN/batch/gov" > "$RUN/batch-gov.json" \
    2> "$RUN/batch-gov.log"
  cp "$RUN/batch/gov/index.jsonl" "$RUN/batch-gov-index.jsonl" 2>/dev/null
  "$PY" - "$RUN" <<'PYEOF'
import json, sys, numpy as np
from pathlib import Path
from PIL import Image
run = Path(sys.argv[1]); base = run / "batch" / "b1"
worst = {}
for other in ("b2", "b4", "bauto", "gov"):
    errs = []
    for png in sorted(base.glob("*.png")):
        twin = run / "batch" / other / png.name
        if twin.exists():
            a, b = (np.asarray(Image.open(p), dtype=np.float64) for p in (png, twin))
            errs.append(float(np.linalg.norm(a - b) / np.linalg.norm(a)))
    worst[other] = max(errs) if errs else None
json.dump(worst, open(run / "batch-same-image.json", "w"))
print("same (prompt, seed) vs batch 1, worst rel-L2:", worst)
PYEOF
}

stage_nvfp4() {
  local w=$RUN/nvfp4
  $CLI calibrate --model tiny --format nvfp4 --out "$w" --num-prompts 4 --steps 2 --height 512 --width 512 > "$RUN/nvfp4.log" 2>&1
  $CLI export --model tiny --out "$w" --gpu blackwell >> "$RUN/nvfp4.log" 2>&1
  $CLI build --onnx "$w" --gpu blackwell --out "$RUN/nvfp4-engines" >> "$RUN/nvfp4.log" 2>&1
  cp "$w/calibration/calibration.json" "$RUN/nvfp4-calibration.json"
  cp "$RUN/nvfp4-engines/tiny/blackwell-tensorrt-rtx-nvfp4/manifest.json" "$RUN/nvfp4-manifest.json"
}

stage_int4() {
  local w=$RUN/int4-medium
  "$PY" bench/measure.py "$RUN/int4-measure.jsonl" "calibrate medium int4" -- \
    $CLI calibrate --model sd3.5-medium --format int4 --out "$w" --num-prompts 8 --steps 8 > "$RUN/int4.log" 2>&1
  "$PY" bench/measure.py "$RUN/int4-measure.jsonl" "export medium int4 --gpu ada" -- \
    $CLI export --model sd3.5-medium --out "$w" --gpu ada >> "$RUN/int4.log" 2>&1
  cp "$w/calibration/calibration.json" "$RUN/int4-calibration.json"
  cp "$w/onnx-int4/transformer/manifest.json" "$RUN/int4-onnx-manifest.json"
  "$PY" bench/measure.py "$RUN/int4-measure.jsonl" "build medium int4 ada" -- \
    $CLI build --onnx "$w" --gpu ada --out "$RUN/int4-engines" --components transformer >> "$RUN/int4.log" 2>&1
  cp "$RUN"/int4-engines/*/ada-tensorrt-rtx-int4/manifest.json "$RUN/int4-manifest.json"
}

stage_refusal() {
  bash bench/reach_refusal.sh "$RUN/refusal" > "$RUN/refusal.log" 2>&1
}

case "$STAGE" in
launch) chain_launch "$@" ;;
chain) chain_run "$@" ;;
wait)
  chain_wait "${1:?seconds}"
  cp "$RUN/refusal/refusal.jsonl" "$RUN/refusal-results.jsonl" 2>/dev/null
  (cd "$RUN" && tar czf "$OUT/round.tgz" --exclude='*.png' --exclude='*.plan' --exclude='*.onnx' --exclude='*.pt' \
     --exclude='*.data' --exclude='batch' --exclude='refusal/work' --exclude='refusal/engines*' --exclude='nvfp4' \
     --exclude='int4-medium' --exclude='*-engines' --exclude='refusal/selftest' --exclude='refusal/refit' . ) ;;
*) echo "unknown stage $STAGE" >&2; exit 2 ;;
esac

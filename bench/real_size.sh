#!/usr/bin/env bash
# Real-size SD3.5 benchmark on the GPU machine, as resumable stages of < 10 minutes each.
# Intermediate files stay in $WORK (/tmp by default) so stages can run as consecutive commands.
#
#   bash bench/real_size.sh STAGE [MODEL]      STAGE: export | calibrate | build | torch | all
#   MODEL: sd3.5-medium (default) | sd3.5-large | tiny (a dry run on any CPU machine)
#
# Results: $RESULTS (JSON lines, one per measured command) plus each step's own manifest/report, copied
# to $OUT when set. Every model here has RANDOM weights (no download is possible); say so in every table.
set -euo pipefail
STAGE=${1:?stage}; MODEL=${2:-sd3.5-medium}
WORK=${WORK:-/tmp/sd35trt-bench/$MODEL}
RESULTS=${RESULTS:-$WORK/results.jsonl}
PY=${PY:-python3}
CLI="$PY -m sd35trt"
M="$PY bench/measure.py $RESULTS"
PROMPTS=${PROMPTS:-32}; STEPS=${STEPS:-8}; SIZE=${SIZE:-1024}
mkdir -p "$WORK"
export PYTHONUNBUFFERED=1

stage_export() {
  $M "$MODEL export transformer fp16 (validated)" -- $CLI export --model "$MODEL" --out "$WORK" \
    --components transformer --precision fp16 --force
  $M "$MODEL export t5 fp16 (validated)" -- $CLI export --model "$MODEL" --out "$WORK" \
    --components t5 --precision fp16 --force
}

stage_calibrate() {
  $M "$MODEL calibrate transformer ${PROMPTS}x${STEPS} @${SIZE} + FP8 ONNX export" -- $CLI calibrate \
    --model "$MODEL" --out "$WORK" --num-prompts "$PROMPTS" --steps "$STEPS" --height "$SIZE" --width "$SIZE" \
    --components transformer --no-fp16 --no-onnx-report ${VALIDATE:---no-validate} --force --json
}

stage_build() {
  for precision in fp8 fp16; do
    $M "$MODEL build transformer $precision SM89 tensorrt-rtx" -- $CLI build --gpu ada --backend tensorrt-rtx \
      --onnx "$WORK" --out "$WORK/engines-$precision" --components transformer --precision "$precision" --force
  done
}

stage_proj_out() {
  $M "$MODEL proj_out FP8 vs high precision (${PROMPTS}x${STEPS} @${SIZE})" -- $PY bench/proj_out.py --model "$MODEL" \
    --out "$WORK/proj_out.json" --prompts "$PROMPTS" --steps "$STEPS" --size "$SIZE"
}

stage_torch() {
  $M "$MODEL torch transformer latency bf16 eager/compile + fake-quant numerics" -- \
    $PY bench/torch_anchor.py --model "$MODEL" --out "$WORK/torch_anchor.json"
}

archive() {  # always, also after a failed step: the device returns at most 8 files, so one archive
  [ -n "${OUT:-}" ] || return 0
  mkdir -p "$OUT"
  du -b "$WORK"/onnx-*/transformer/* "$WORK"/onnx-*/t5/* "$WORK"/engines-*/*/*/*.plan >> "$WORK/sizes.txt" 2>/dev/null || true
  (cd "$WORK" && tar czf "$OUT/$MODEL-$STAGE.tar.gz" --ignore-failed-read results.jsonl sizes.txt \
     $(ls calibration/calibration.json torch_anchor.json proj_out.json onnx-*/*/manifest.json onnx-*/*/export.json \
          engines-*/*/*/manifest.json engines-*/*/*/layers/*.txt 2>/dev/null)) || true
}
trap archive EXIT

case "$STAGE" in
  export) stage_export ;;
  calibrate) stage_calibrate ;;
  build) stage_build ;;
  torch) stage_torch ;;
  proj_out) stage_proj_out ;;
  all) stage_export; stage_calibrate; stage_build; stage_torch ;;
  *) echo "unknown stage $STAGE" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# Real-size SD3.5 benchmark on the GPU machine, as resumable stages of < 10 minutes each.
# Intermediate files stay in $WORK (/tmp by default) so stages can run as consecutive commands.
#
#   bash bench/real_size.sh STAGE [MODEL]
#   STAGE: make_engines | make_calibrate | make_export | make_build (the Makefile's own steps, as a user runs them)
#          | fp8_transformer (after make_calibrate: FP8 transformer ONNX + SM89 engine)
#          | build_memory (#15) | t5_fp8 (#15) | selftest (#12) | shards (#16: SHARDS=N)
#          | export | calibrate | build | torch | proj_out | ort_export | components | ort_gpu | torch_loop | all
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
  $M "$MODEL calibrate transformer ${PROMPTS}x${STEPS} @${SIZE}" -- $CLI calibrate \
    --model "$MODEL" --out "$WORK" --num-prompts "$PROMPTS" --steps "$STEPS" --height "$SIZE" --width "$SIZE" \
    --components transformer --force --json
  $M "$MODEL export transformer fp8" -- $CLI export --model "$MODEL" --out "$WORK" --components transformer \
    --precision fp8 ${VALIDATE:---no-validate}
}

stage_fp8_transformer() {  # after make_calibrate: the FP8 transformer ONNX (unvalidated: the CPU-provider checks take
  # minutes at Large size) and its SM89 engine, whose layers/transformer.txt shows the FP32 islands
  $M "$MODEL export transformer fp8 (--no-validate)" -- $CLI export --model "$MODEL" --out "$WORK" \
    --components transformer --precision fp8 --no-validate
  $M "$MODEL build transformer fp8 SM89 tensorrt-rtx" -- $CLI build --gpu ada --backend tensorrt-rtx --onnx "$WORK" \
    --out "$WORK/engines" --components transformer
}

stage_make() {  # STEP: one target of `make engines`, exactly as the Makefile runs it (its prerequisites skip when
  # done, so a step cut off by the 10-minute limit resumes on the next call). SYSTEM_PYTHON=1: the GPU machine's
  # own torch/CUDA stack plus the staged wheels instead of a fresh .venv (it has no package index).
  local step=$1
  $M "make engines $MODEL: $step" -- make "$step" MODEL="$MODEL" GPU="${GPU:-ada}" WORK="$WORK" \
    ENGINES="$WORK/engines" SYSTEM_PYTHON=1 PYTHON="$PY"
  $PY - "$WORK" "$RESULTS" "$MODEL" "$step" <<'PYEOF'
import json, subprocess, sys, time
work, results, model, step = sys.argv[1:]
used = int(subprocess.run(["du", "-sb", work], capture_output=True, text=True).stdout.split()[0])
with open(results, "a") as f:
    f.write(json.dumps({"label": f"make engines {model}: {step} (disk used after)", "disk_used_gb": round(used / 1e9, 2),
                        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")
PYEOF
}

stage_build_memory() {  # #15: builder memory at real size, one engine per measured command. A short calibration
  # (2 prompts x 2 steps: scales only need to exist for a memory measurement), then FP8 and FP16 transformer and
  # FP16 T5, exported --no-validate. BUILD_JOBS: COMPONENT:PRECISION[:PARTS] (sd35trt build --parts). Every
  # sd35trt step skips when its inputs are unchanged, so a cut-off call resumes where it stopped.
  $CLI calibrate --model "$MODEL" --out "$WORK" --num-prompts 2 --steps 2 --holdout 1 --calib-batch 2 \
    --components "${CALIB_COMPONENTS:-transformer}" > /dev/null
  for job in ${BUILD_JOBS:-transformer:fp8 transformer:fp16 t5:fp16}; do
    IFS=: read -r c precision parts <<< "$job"; parts=${parts:-1}
    $CLI export --model "$MODEL" --out "$WORK" --components "$c" --precision "$precision" --no-validate > /dev/null
    dest="$WORK/engines-$precision-$c-p$parts"
    [ -f "$dest/done" ] && continue
    how="whole"; [ "$parts" -gt 1 ] && how="in $parts parts"
    $M "$MODEL build $c $precision SM89 tensorrt-rtx $how (child process, streamed plan)" -- $CLI build --gpu ada \
      --backend tensorrt-rtx --onnx "$WORK" --out "$dest" --components "$c" --precision "$precision" \
      --parts "$c=$parts" --json
    touch "$dest/done"
    rm -f "$dest"/*/*/*.plan  # the numbers are in the manifest; keep the disk free
  done
}

stage_t5_fp8() {  # #15: T5-XXL in FP8. T5 runs once per prompt (not per step), so 1 denoising step sees all of its
  # calibration traffic; the report has its FP8 error on held-out T5 calls against FP32 (TF32 off).
  $M "$MODEL calibrate t5 ${PROMPTS}x1" -- $CLI calibrate --model "$MODEL" --out "$WORK/t5fp8" --components t5 \
    --num-prompts "$PROMPTS" --steps 1 --height "$SIZE" --width "$SIZE" > "$WORK/t5fp8-report.txt"
  cp "$WORK/t5fp8/calibration/calibration.json" "$WORK/calibration-t5fp8.json"
  $CLI export --model "$MODEL" --out "$WORK/t5fp8" --components t5 --precision fp8 --no-validate > /dev/null
  $M "$MODEL build t5 fp8 SM89 tensorrt-rtx (child process, streamed plan)" -- $CLI build --gpu ada \
    --backend tensorrt-rtx --onnx "$WORK/t5fp8" --out "$WORK/engines-fp8-t5" --components t5 --precision fp8
}

stage_selftest() {  # #12: the engine self-test users run first, on this machine (CC 9.0: TensorRT-RTX refuses it)
  set +e
  $CLI selftest --out "$WORK/selftest" --json > "$WORK/selftest-stdout.json" 2> "$WORK/selftest-stderr.txt"
  echo "selftest rc $?" | tee -a "$WORK/selftest-stderr.txt"
  cp "$WORK/selftest/selftest.json" "$WORK/selftest.json" 2>/dev/null
  set -e
}

stage_shards() {  # #16: calibration on 1 vs N GPUs, same prompts; scales must be byte-identical
  local n=${SHARDS:-2}
  $M "$MODEL calibrate ${PROMPTS}x${STEPS} @${SIZE} on $n GPU(s) (--shards $n)" -- $CLI calibrate --model "$MODEL" \
    --out "$WORK/shards-$n" --num-prompts "$PROMPTS" --steps "$STEPS" --height "$SIZE" --width "$SIZE" --shards "$n" \
    --force > /dev/null
  cp "$WORK/shards-$n/calibration/scales.json" "$WORK/scales-$n.json"
  cp "$WORK/shards-$n/calibration/calibration.json" "$WORK/calibration-$n.json"
  ls "$WORK"/scales-*.json | xargs sha256sum | tee -a "$WORK/scales.sha256"
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

stage_ort_export() {  # all five components in FP16, validated (on onnxruntime-gpu's CUDA EP when staged)
  for c in transformer clip_l clip_g vae_decoder t5; do  # no --force: a re-run resumes after the finished ones
    $M "$MODEL export $c fp16 (validated, --provider ${PROVIDER:-auto})" -- $CLI export --model "$MODEL" \
      --out "$WORK" --components "$c" --precision fp16 --provider "${PROVIDER:-auto}"
  done
}

stage_components() {  # CLIP-L, CLIP-G, VAE decoder, T5-XXL: FP16 ONNX and SM89 FP16 engines, one command each
  for c in ${COMPONENTS:-clip_l clip_g vae_decoder t5}; do  # COMPONENTS="t5": one per call when time is short
    $M "$MODEL export $c fp16" -- $CLI export --model "$MODEL" --out "$WORK" --components "$c" --precision fp16 \
      ${VALIDATE:---no-validate}
    $M "$MODEL build $c fp16 SM89 tensorrt-rtx" -- $CLI build --gpu ada --backend tensorrt-rtx --onnx "$WORK" \
      --out "$WORK/engines-fp16-$c" --components "$c" --precision fp16
  done
}

loop_bench() {  # FILE LABEL RUNNER-OPTIONS...: the whole sd35trt loop timed by `sd35trt bench`, JSON into $WORK/FILE
  local file=$1 label=$2; shift 2
  $M "$MODEL sd35trt loop on $label, ${SIZE}² ${LOOP_STEPS:-28} steps" -- $CLI bench --model "$MODEL" "$@" \
    --height "$SIZE" --width "$SIZE" --steps 20 --loop-steps "${LOOP_STEPS:-28}" --images 2 --json > "$WORK/$file"
}

stage_ort_gpu() {  # the peer without TensorRT: the loop on the FP16 ONNX through onnxruntime-gpu
  loop_bench ort_gpu_bench.json "FP16 ONNX, onnxruntime CUDA EP" --onnx "$WORK" --precision fp16 --provider cuda
}

stage_torch_loop() {  # the same loop on diffusers' torch modules (BF16 on the GPU)
  loop_bench torch_loop_bench.json "torch modules, bf16 cuda" --torch --device cuda --dtype bf16
}

stage_torch() {
  $M "$MODEL torch transformer latency bf16 eager/compile + fake-quant numerics" -- \
    $PY bench/torch_anchor.py --model "$MODEL" --out "$WORK/torch_anchor.json"
}

archive() {  # always, also after a failed step: the device returns at most 8 files, so one archive
  [ -n "${OUT:-}" ] || return 0
  mkdir -p "$OUT"
  du -b "$WORK"/onnx-*/*/* "$WORK"/engines-*/*/*/*.plan "$WORK"/engines/*/*/*.plan "$WORK"/calibration/* \
    >> "$WORK/sizes.txt" 2>/dev/null || true
  (cd "$WORK" && tar czf "$OUT/$MODEL-$STAGE.tar.gz" --ignore-failed-read results.jsonl sizes.txt \
     $(ls calibration/calibration.json calibration/census.json calibration/manifest.json engines/*/*/manifest.json \
          engines/*/*/layers/*.txt torch_anchor.json proj_out.json ort_gpu_bench.json torch_loop_bench.json onnx-*/*/manifest.json onnx-*/*/export.json \
          engines-*/*/*/manifest.json engines-*/*/*/layers/*.txt selftest.json selftest-*.* scales-*.json \
          calibration-*.json scales.sha256 t5fp8-report.txt 2>/dev/null)) || true
}
trap archive EXIT

case "$STAGE" in
  make_calibrate) stage_make calibrate ;;
  make_export) stage_make export ;;
  make_build) stage_make build ;;
  make_engines) stage_make calibrate; stage_make export; stage_make build ;;
  fp8_transformer) stage_fp8_transformer ;;
  export) stage_export ;;
  calibrate) stage_calibrate ;;
  build) stage_build ;;
  build_memory) stage_build_memory ;;
  selftest) stage_selftest ;;
  t5_fp8) stage_t5_fp8 ;;
  shards) stage_shards ;;
  torch) stage_torch ;;
  proj_out) stage_proj_out ;;
  ort_export) stage_ort_export ;;
  components) stage_components ;;
  ort_gpu) stage_ort_gpu ;;
  torch_loop) stage_torch_loop ;;
  all) stage_export; stage_calibrate; stage_build; stage_torch ;;
  *) echo "unknown stage $STAGE" >&2; exit 2 ;;
esac

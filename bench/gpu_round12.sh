#!/usr/bin/env bash
# One GPU-machine round (H200) for #30 and #33, in resumable stages run by one detached chain:
#   userpath  #30: `make export MODEL=sd3.5-medium GPU=ada SYSTEM_PYTHON=1` for three work dirs at once (default,
#             T5=0, LORA=.gpu/lora.safetensors:0.8 made by bench/make_lora.py; the last two NUM_PROMPTS=16 for device
#             time), each measured (wall, peak RSS of the process tree)
#   compare   #30: `compare --onnx WORK --height 1024 --width 1024 --steps 8 --prompts 2` on each work dir, one at a
#             time (FP32 reference on the GPU, TF32 off), wall and peak RSS
#   batch     #33: 64 images (16 prompts x 4), torch runner BF16, SD3.5-Medium, 1024², 28 steps: --batch auto killed
#             (SIGKILL) after >= 32 images and re-run (resume); --batch auto --max-power 400 with nvidia-smi sampling
#             power and temperature every 200 ms for the plot; then --batch 1 if the chain still has time
#   sizes     #33: the same 64 images at --batch 1, 2, 4 and auto (SIZES="1 2 4 auto"), one after another in one chain, each
#             index kept as soon as it ends; then the same-image check against auto
#   refusal   bench/reach_refusal.sh: every command that opens engines reaches TensorRT-RTX's compute-capability refusal
#   fourbit   #35: `make engines MODEL=M GPU=ada QUANT=q [T5=0]` for each "M:q[:clip[:fit[:int8]]]" of FOURBIT (nvfp4
#             builds GPU=blackwell; ":fit" adds doctor's 8 GB ranges BATCH=1:1:1 HEIGHT/WIDTH=512:1024:1024, ":int8" the
#             text encoders' weights in INT8, INT8=clip_l,clip_g[,t5]) (default "sd3.5-large:int4:clip:fit:int8 |
#             sd3.5-medium:int4:clip:fit:int8 sd3.5-medium:nvfp4:clip": groups split by "|"
#             run side by side — a Large export peaks at 55 GB of GPU memory, so on an H100 run Large alone, on an
#             H200 beside one Medium group, never two Large at once: round 17's did not fit), each measured (wall,
#             peak RSS), then `doctor BUNDLE --vram 8 --no-t5` (the CLIP-only 8 GB plan from
#             the manifests), plan sizes, layer summaries and the calibration's errors
#   int8      #35: bench/int8_encoders.py --t5 on the GPU: CLIP-L, CLIP-G and T5-XXL with INT8 weights vs FP32 (TF32 off);
#             then (T5_ENGINE=1, default) T5-XXL's INT8 ONNX exported and built for SM89: its size and INT8 tensors
#   side      int8 then refusal in the background, beside the stages after it (`launch side fourbit`)
#   USERPATH="default clip lora" picks the work dirs of userpath and compare (all three by default)
#
#   bash bench/gpu_round12.sh launch [STAGES...]   detached (setsid); returns at once
#   bash bench/gpu_round12.sh wait SECONDS         until done or SECONDS; copies results to $OUT
set -uo pipefail
STAGE=${1:?stage}; shift
RUN=${RUN:-/tmp/round}; PY=${PY:-python3}
CLI="$PY -m sd35trt"
LORA=$PWD/.gpu/lora.safetensors:0.8
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
source bench/chain.sh

stage_userpath() {
  mk() {
    local name=$1; shift
    "$PY" bench/measure.py "$RUN/userpath-measure.jsonl" "make export MODEL=sd3.5-medium GPU=ada $*" -- \
      make export MODEL=sd3.5-medium GPU=ada SYSTEM_PYTHON=1 "$@" > "$RUN/make-$name.log" 2>&1
    echo "make $name: rc $?"
  }
  local want=" ${USERPATH:-default clip lora} "
  [[ $want == *" default "* ]] && mk default &
  [[ $want == *" clip "* ]] && mk clip T5=0 WORK=build/sd3.5-medium-clip NUM_PROMPTS=16 &
  [[ $want == *" lora "* ]] && mk lora "LORA=$LORA" WORK=build/sd3.5-medium-lora NUM_PROMPTS=16 &
  wait
  df -h . > "$RUN/disk.txt"; du -sh build/* >> "$RUN/disk.txt"
}

stage_compare() {
  cmp() {
    local name=$1 work=$2; shift 2
    timeout -s INT "${COMPARE_CAP:-420}" "$PY" bench/measure.py "$RUN/compare-measure.jsonl" "compare $name" -- $CLI compare --model sd3.5-medium \
      --onnx "$work" --height 1024 --width 1024 --steps 8 --prompts 2 --out "$RUN/compare-$name" "$@" \
      > "$RUN/compare-$name.txt" 2> "$RUN/compare-$name.log"
    echo "compare $name: rc $?"
  }
  local want=" ${USERPATH:-default clip lora} "
  [[ $want == *" default "* ]] && cmp default build/sd3.5-medium
  [[ $want == *" clip "* ]] && cmp clip build/sd3.5-medium-clip --no-t5
  [[ $want == *" lora "* ]] && cmp lora build/sd3.5-medium-lora --lora "$LORA"
  return 0
}

stage_fourbit() {  # FOURBIT groups separated by "|" run side by side (each group's items one after another)
  local group pids=()
  IFS='|' read -ra groups <<< "${FOURBIT:-sd3.5-large:int4:clip:fit:int8 | sd3.5-medium:int4:clip:fit:int8 sd3.5-medium:nvfp4:clip}"
  for group in "${groups[@]}"; do fourbit_items $group & pids+=($!); done
  wait "${pids[@]}"
  return 0
}

fourbit_items() {
  local item model quant clip fit t5 suffix work bundle
  for item in "$@"; do
    IFS=: read -r model quant clip fit int8 <<< "$item"
    t5=1; suffix=""; [[ $clip == clip ]] && { t5=0; suffix=-clip; }
    local gpu=ada ranges=(); [[ $quant == nvfp4 ]] && gpu=blackwell
    [[ $fit == fit ]] && ranges=(BATCH=1:1:1 HEIGHT=512:1024:1024 WIDTH=512:1024:1024)  # doctor's 8 GB ranges
    [[ $int8 == int8 ]] && ranges+=(INT8=clip_l,clip_g$([[ $t5 == 1 ]] && echo ,t5))  # the text encoders' weights in INT8
    work=build/$model-$quant$suffix; bundle=engines/$model/$gpu-tensorrt-rtx-$quant${int8:+-int8}$suffix
    "$PY" bench/measure.py "$RUN/fourbit-measure.jsonl" "make engines MODEL=$model GPU=$gpu QUANT=$quant T5=$t5 ${ranges[*]}" -- \
      make engines MODEL="$model" GPU="$gpu" QUANT="$quant" T5="$t5" WORK="$work" SYSTEM_PYTHON=1 "${ranges[@]}" \
      > "$RUN/make-$model-$quant$suffix${fit:+-fit}${int8:+-int8}.log" 2>&1
    echo "make $model $quant T5=$t5 ${ranges[*]}: rc $?"
    local keep=$RUN/fourbit-$model-$quant$suffix${fit:+-fit}${int8:+-int8}
    mkdir -p "$keep"
    cp "$work"/calibration/calibration.json "$bundle"/layers/transformer*.txt "$keep/" 2>/dev/null
    cp "$work"/onnx-"$quant"/transformer/manifest.json "$keep/onnx-transformer.json" 2>/dev/null
    cp "$bundle/manifest.json" "$keep/bundle.json" 2>/dev/null
    for f in "$work"/onnx-int8/*/manifest.json; do [[ -f $f ]] && cp "$f" "$keep/onnx-int8-$(basename "$(dirname "$f")").json"; done
    $CLI doctor "$bundle" --vram 8 --no-t5 > "$keep/doctor-8gb-clip.json" 2> "$keep/doctor.log"
    du -sb "$bundle"/*.plan > "$keep/plans.txt" 2>/dev/null
    rm -rf "$work"/onnx-fp16 "$work"/onnx-int8 "$work"/onnx-"$quant" "$bundle"/*.plan  # the 64 GB disk: one model's at a time
  done
}

stage_int8() {  # #35: the text encoders' INT8 error vs FP32 at SD3.5 size, T5-XXL included (19 GB FP32: not on the CPU box)
  "$PY" bench/int8_encoders.py --model sd3.5-medium --prompts 16 --t5 --device cuda --out "$RUN/int8_encoders.json" \
    > "$RUN/int8_encoders.log" 2>&1
  echo "int8_encoders: rc $?"
  [[ ${T5_ENGINE:-1} == 1 ]] || return 0
  local work=/tmp/t5-int8  # T5-XXL's INT8 engine (wo included) for SM89: its size and INT8 tensor count
  "$PY" bench/measure.py "$RUN/int8-measure.jsonl" "export t5 --int8 t5 --gpu ada" -- $CLI export --model sd3.5-medium \
    --out $work --components t5 --int8 t5 --gpu ada > "$RUN/t5-int8-export.log" 2>&1
  "$PY" bench/measure.py "$RUN/int8-measure.jsonl" "build t5 --int8 t5 --gpu ada" -- $CLI build --gpu ada --onnx $work \
    --out $work/engines --components t5 --int8 t5 > "$RUN/t5-int8-build.log" 2>&1
  cp $work/onnx-int8/t5/manifest.json "$RUN/t5-int8-onnx.json" 2>/dev/null
  cp $work/onnx-int8/t5/int8_weights.json "$RUN/t5-int8-weights.json" 2>/dev/null
  find $work/engines -name manifest.json -exec cp {} "$RUN/t5-int8-bundle.json" \; 2>/dev/null
  find $work/engines -name '*.plan' -exec du -sb {} + > "$RUN/t5-int8-plans.txt" 2>/dev/null
  rm -rf $work
  return 0
}

stage_side() {  # int8 then refusal beside the next stages (a few GB of GPU memory; the chain does not wait for them)
  (stage_int8; stage_refusal; touch "$RUN/side-done") > "$RUN/side.log" 2>&1 &
  return 0
}

stage_refusal() {  # #31/#34: every engine command still reaches TensorRT-RTX's own refusal after the runner refactor
  bash bench/reach_refusal.sh "$RUN/refusal" > "$RUN/refusal.log" 2>&1
  cp "$RUN/refusal/refusal.jsonl" "$RUN/refusal.jsonl" 2>/dev/null
  return 0
}

stage_batch() {
  head -16 calibration/prompts.txt > "$RUN/p16.txt"
  local common=(--prompts "$RUN/p16.txt" --images-per-prompt 4 --torch --model sd3.5-medium --height 1024 --width 1024
                --steps 28 --json)
  local out=$RUN/batch/auto
  $CLI generate "${common[@]}" --batch auto --out "$out" > "$RUN/batch-auto-1.json" 2> "$RUN/batch-auto-1.log" &
  local pid=$!
  while kill -0 $pid 2>/dev/null; do
    n=$(grep -c '"file"' "$out/index.jsonl" 2>/dev/null); n=${n:-0}
    if [ "$n" -ge 32 ]; then kill -9 $pid; echo "killed the auto run at $n images"; break; fi
    sleep 1
  done
  wait $pid
  $CLI generate "${common[@]}" --batch auto --out "$out" > "$RUN/batch-auto-2.json" 2> "$RUN/batch-auto-2.log"
  cp "$out/index.jsonl" "$RUN/batch-auto-index.jsonl"
  nvidia-smi --query-gpu=timestamp,power.draw,temperature.gpu,utilization.gpu --format=csv,noheader,nounits \
    -lms 200 > "$RUN/batch-gov-smi.csv" &
  local smi=$!
  $CLI generate "${common[@]}" --batch auto --max-power 400 --out "$RUN/batch/gov" > "$RUN/batch-gov.json" \
    2> "$RUN/batch-gov.log"
  kill $smi
  cp "$RUN/batch/gov/index.jsonl" "$RUN/batch-gov-index.jsonl"
  same_image  # now, and again after --batch 1: the machine may be taken back before that run ends
  $CLI generate "${common[@]}" --batch 1 --out "$RUN/batch/b1" > "$RUN/batch-b1.json" 2> "$RUN/batch-b1.log"
  cp "$RUN/batch/b1/index.jsonl" "$RUN/batch-b1-index.jsonl"
  same_image
}

stage_sizes() {
  head -16 calibration/prompts.txt > "$RUN/p16.txt"
  local b
  for b in ${SIZES:-1 2 4 auto}; do
    "$PY" bench/measure.py "$RUN/sizes-measure.jsonl" "generate --batch $b" -- $CLI generate --prompts "$RUN/p16.txt" \
      --images-per-prompt 4 --torch --model "${SIZES_MODEL:-sd3.5-medium}" --height "${SIZES_PX:-1024}" \
      --width "${SIZES_PX:-1024}" --steps "${SIZES_STEPS:-28}" --json --batch $b --out "$RUN/batch/s$b" \
      > "$RUN/sizes-b$b.json" 2> "$RUN/sizes-b$b.log"
    echo "batch $b: rc $?"
    cp "$RUN/batch/s$b/index.jsonl" "$RUN/sizes-b$b-index.jsonl"
  done
  SAME_BASE=sauto SAME_OTHERS="s1 s2 s4" same_image
}

same_image() {
  "$PY" - "$RUN" "${SAME_BASE:-auto}" ${SAME_OTHERS:-gov b1} <<'PYEOF'
import json, sys, numpy as np
from pathlib import Path
from PIL import Image
run = Path(sys.argv[1]); base = run / "batch" / sys.argv[2]; others = sys.argv[3:]
lines = [json.loads(l) for l in (base / "index.jsonl").read_text().splitlines() if l.strip()]
files = [l["file"] for l in lines if "file" in l]
report = {"auto_index_images": len(files), "auto_index_unique": len(set(files)),
          "auto_pngs": len(list(base.glob("*.png"))), "auto_tmp_left": len(list(base.glob("*.tmp*")))}
for other in others:
    errs = []
    for png in sorted(base.glob("*.png")):
        twin = run / "batch" / other / png.name
        if twin.exists():
            a, b = (np.asarray(Image.open(p), dtype=np.float64) for p in (png, twin))
            errs.append(float(np.linalg.norm(a - b) / np.linalg.norm(a)))
    report[f"{other}_vs_auto_worst_rel_l2"] = max(errs) if errs else None
    report[f"{other}_vs_auto_images"] = len(errs)
json.dump(report, open(run / f"batch-same-image-{sys.argv[2]}.json", "w"))
print(report)
PYEOF
}

case "$STAGE" in
launch)
  chain_launch "$@"
  nproc >> "$RUN/env.txt"; free -g >> "$RUN/env.txt" ;;
chain) chain_run "$@" ;;
wait)
  chain_wait "${1:?seconds}"
  cat "$RUN"/*-measure.jsonl 2>/dev/null
  (cd "$RUN" && tar czf "$OUT/round.tgz" --exclude='batch' --exclude='refusal/work*' --exclude='refusal/engines*' --exclude='*.plan' --exclude='*.onnx' --exclude='*.data' --exclude='*.png' --exclude='*.pt' . )
  cp "$RUN"/compare-default/*.png "$OUT/" 2>/dev/null; ls -la "$OUT" ;;
*) echo "unknown stage $STAGE" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# This round's measurements on the GPU machine (H200), as stages of under 10 minutes each, run from the repo root:
#   bash bench/gpu_round.sh STAGE        results under $OUT (or /tmp/round), one file per stage
# Stages: env | bench_medium | bench_large | plans | rtx. Every model has RANDOM weights (presets); say so.
# Wheels (diffusers, torchao, TensorRT-RTX) are staged with ../shared/tools/device-wheels into /tmp/site.
set -uo pipefail
STAGE=${1:?stage}
OUT=${OUT:-/tmp/round}; mkdir -p "$OUT"
export PYTHONPATH=$PWD:/tmp/site:${PYTHONPATH:-} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
CLI="python3 -m sd35trt"
M="python3 bench/measure.py $OUT/measure.jsonl"

case "$STAGE" in
env)
  { nvidia-smi; python3 -c "import torch, diffusers; print(torch.__version__, diffusers.__version__, torch.cuda.get_device_name(0))";
    python3 -c "import torchao; print('torchao', torchao.__version__)"; } > "$OUT/env.txt" 2>&1 ;;
bench_medium)  # #24 and #21: the peers at 1024^2, 28 steps, CFG 4.5, batch 1 and 4, in one process
  timeout 570 $CLI bench --model sd3.5-medium --torch --against compile,torchao-fp8 --batch 1,4 --steps 20 --images 1 \
    --save "$OUT/bench-medium.json" --csv "$OUT/bench.csv" > "$OUT/bench-medium.txt" 2> "$OUT/bench-medium.err"
  echo "rc $?" >> "$OUT/bench-medium.txt" ;;
bench_large)  # SD3.5-Large eager and compile; SD3.5-Large-Turbo at its 4 steps without guidance
  timeout 330 $CLI bench --model sd3.5-large --torch --against compile --batch 1,4 --steps 20 --images 1 \
    --save "$OUT/bench-large.json" --csv "$OUT/bench.csv" > "$OUT/bench-large.txt" 2> "$OUT/bench-large.err"
  echo "rc $?" >> "$OUT/bench-large.txt"
  timeout 200 $CLI bench --model sd3.5-large-turbo --torch --batch 1,4 --steps 20 --images 2 \
    --save "$OUT/bench-turbo.json" --csv "$OUT/bench.csv" > "$OUT/bench-turbo.txt" 2> "$OUT/bench-turbo.err"
  echo "rc $?" >> "$OUT/bench-turbo.txt" ;;
plans)  # #23: Medium CLIP-only under an 8 GiB cap (sequential plan), and doctor's plans for the real-size bundles
  for plan in sequential auto; do
    timeout 240 python3 bench/vram_cap.py --cap 8 --model sd3.5-medium --no-t5 --plan $plan > "$OUT/vram-cap-8-$plan.json" \
      2> "$OUT/vram-cap-8-$plan.err"
    echo "rc $?" >> "$OUT/vram-cap-8-$plan.err"
  done
  python3 bench/vram_plans.py "$OUT" > "$OUT/doctor-plans.txt" 2>&1 ;;
again)  # the auto plan under the cap once more, and the FP16 components' refittable / stripped builds
  timeout 200 python3 bench/vram_cap.py --cap 8 --model sd3.5-medium --no-t5 --plan auto > "$OUT/vram-cap-8-auto.json" \
    2> "$OUT/vram-cap-8-auto.err"; echo "rc $?" >> "$OUT/vram-cap-8-auto.err"
  for mode in "" --refittable --strip-weights; do
    python3 -m sd35trt build --gpu ada --onnx build/tiny --out "/tmp/fp16eng$mode" --components clip_l,vae_decoder $mode --json \
      > "$OUT/build16${mode:-_full}.json" 2> "$OUT/build16${mode:-_full}.err"; echo "rc $?" >> "$OUT/build16${mode:-_full}.err"
  done ;;
rtx)  # #21: an RTX bundle on this GPU (CC 9.0): TensorRT-RTX's own refusal; #26: refittable / stripped builds
  $CLI generate --bundle build/engines-rtx/tiny/ada-tensorrt-rtx --prompt "a koi pond" --out "$OUT/x.png" > "$OUT/rtx-generate.txt" 2>&1
  echo "rc $?" >> "$OUT/rtx-generate.txt"
  for mode in "" --refittable --strip-weights; do
    $CLI build --gpu ada --onnx build/tiny --out "/tmp/eng$mode" --components transformer,clip_l,vae_decoder $mode --json \
      > "$OUT/build${mode:-_full}.json" 2> "$OUT/build${mode:-_full}.err"
    echo "rc $?" >> "$OUT/build${mode:-_full}.err"
  done ;;
*) echo "unknown stage $STAGE" >&2; exit 2 ;;
esac

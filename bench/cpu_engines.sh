#!/usr/bin/env bash
# CPU build box benchmark: wall time and peak RSS of each stage of `make engines GPU=ada` on the tiny preset,
# then of a no-change re-run. Writes JSON lines to bench/results/cpu-engines-<date>.jsonl.
#   usage: bash bench/cpu_engines.sh            (uses .venv, created by `make install`)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
WORK=$(mktemp -d)
RESULTS=${RESULTS:-bench/results/cpu-engines-$(date +%Y-%m-%d).jsonl}
M="$PY bench/measure.py $RESULTS"
CLI="$PY -m sd35trt"
# The same three commands as `make engines GPU=ada` (Makefile: calibrate, export --gpu ada, build).
run_all() {
  $M "tiny calibrate ($1)" -- $CLI calibrate --model tiny --out "$WORK/build" --num-prompts 8 --steps 4 --height 512 --width 512
  $M "tiny export --gpu ada ($1)" -- $CLI export --model tiny --out "$WORK/build" --gpu ada
  $M "tiny build ada ($1)" -- $CLI build --gpu ada --onnx "$WORK/build" --out "$WORK/engines"
}
run_all "fresh" > /dev/null
run_all "no change" > /dev/null
rm -rf "$WORK"
tail -6 "$RESULTS"

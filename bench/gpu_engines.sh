#!/usr/bin/env bash
# `make engines GPU=ada` at real size on the GPU machine (#25), as a user runs it: bench/real_size.sh make_engines per
# model (each make step under bench/measure.py: wall time, peak RSS of the whole process tree; the disk used after it).
#
#   bash bench/gpu_engines.sh launch MODEL [MODEL ...]   start the chain in its own process session (setsid), so it
#                                                        outlives the 10-minute command limit; returns at once
#   bash bench/gpu_engines.sh wait SECONDS               wait until the chain ends or SECONDS pass, then copy what
#                                                        it has so far to $OUT (results.jsonl, chain.log, facts.tgz)
#
# Models run one after another; a model's work dir and bundle are deleted once its facts are kept (the machine has
# 64 GB of disk). Every model has RANDOM weights (no download is possible); say so in every table.
# SYSTEM_PYTHON=1: the machine's own torch/CUDA stack plus the staged wheels (onnxruntime-gpu among them).
# Wheels (../shared/tools/device-wheels' default set + onnxruntime-gpu==1.31.1) went over as one tar split into 58 MB
# parts (`tar cf - *.whl | split -b 58000000`): the tool's 60 MiB parts plus this 6.5 MB repo pass the 64 MiB limit.
# On the machine: cat the parts | tar xf -, pip install --no-deps --target /tmp/site, PYTHONPATH=/tmp/site:$PWD.
set -uo pipefail
STAGE=${1:?stage}; shift
RUN=${RUN:-/tmp/gpu-engines}; PY=${PY:-python3}
mkdir -p "$RUN/facts"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

chain() {  # bench/real_size.sh make_engines: the three make steps, each measured, with the disk used after it
  for model in "$@"; do
    local work=$RUN/work/$model
    WORK=$work RESULTS=$RUN/results.jsonl PY=$PY bash bench/real_size.sh make_engines "$model" \
      || echo "$model: make engines failed" >> "$RUN/chain.log"
    # the facts: every manifest and report (JSON), the engines' layer summaries; never weights or plans
    (cd "$RUN" && find "work/$model" \( -name '*.json' -o -name '*.txt' \) -size -4M 2>/dev/null \
      | grep -v '/assets/' | tar czf "facts/$model.tgz" -T -)
    du -sb "$work"/* "$work"/engines/*/* >> "$RUN/facts/$model-sizes.txt" 2>/dev/null
    rm -rf "$work"
  done
  touch "$RUN/done"
}

case "$STAGE" in
launch)
  rm -rf "$RUN"; mkdir -p "$RUN/facts"
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc; free -g | head -2; df -h /tmp | tail -1
    "$PY" -c "import torch, onnxruntime as o; print(torch.__version__, o.__version__, o.get_available_providers())"; } \
    > "$RUN/facts/env.txt" 2>&1
  setsid nohup bash "$0" chain "$@" > "$RUN/chain.log" 2>&1 < /dev/null &
  echo "launched: $*" ;;
chain) chain "$@" ;;
wait)
  limit=${1:?seconds}; start=$SECONDS
  while [ ! -e "$RUN/done" ] && [ $((SECONDS - start)) -lt "$limit" ]; do sleep 5; done
  [ -e "$RUN/done" ] && echo "chain done" || echo "chain still running after ${limit}s"
  grep -h '\[measure\]\|failed\|Error\|error:' "$RUN/chain.log" | tail -20
  cp "$RUN/results.jsonl" "$OUT/" 2>/dev/null; tail -c 4000000 "$RUN/chain.log" > "$OUT/chain.log"
  (cd "$RUN" && tar czf "$OUT/facts.tgz" facts) ;;
*) echo "unknown stage $STAGE" >&2; exit 2 ;;
esac

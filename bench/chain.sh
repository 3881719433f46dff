# Sourced by the GPU-round scripts (bench/gpu_batch_4bit.sh, bench/gpu_round12.sh): their stages run as one chain in
# its own process session (setsid), so the chain outlives the device call that started it, and a later call waits for
# it. The sourcing script sets RUN (the round's folder) and defines a function stage_<name> per stage.

chain_launch() {  # STAGES...: start `bash $0 chain STAGES...` detached; returns at once
  mkdir -p "$RUN"; rm -f "$RUN/done"
  nvidia-smi --query-gpu=name,memory.total,driver_version,power.limit --format=csv,noheader > "$RUN/env.txt" 2>&1
  setsid nohup bash "$0" chain "$@" > "$RUN/chain.log" 2>&1 < /dev/null &
  echo "launched: $*"
}

chain_run() {  # STAGES...: stage_<name> for each, in order, then RUN/done
  local s
  for s in "$@"; do
    echo "== $s $(date +%T)"
    "stage_$s"
    echo "== $s done $(date +%T)"
  done
  touch "$RUN/done"
}

chain_wait() {  # SECONDS: until the chain is done or SECONDS have passed; then its log
  local limit=${1:?seconds} start=$SECONDS
  while [ ! -e "$RUN/done" ] && [ $((SECONDS - start)) -lt "$limit" ]; do sleep 5; done
  [ -e "$RUN/done" ] && echo "chain done" || echo "chain still running after ${limit}s"
  cat "$RUN/chain.log"
}

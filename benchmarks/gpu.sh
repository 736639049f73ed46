#!/usr/bin/env bash
# SD-1.5-size UNet on one GPU, in one call of under 8 minutes: train-step images/s, MFU and XLA memory over batch
# sizes, and DDIM-50 CFG-7.5 sampling images/s of ldm_jax against diffusers (PyTorch) on the same GPU. Each stage of
# benchmarks/gpu_bench.py runs as its own process under its own time limit; results go to $WORK/results.jsonl, and
# the last stage prints a markdown table and writes gpu_results.json / gpu_results.md (to $OUT too when set).
#   bash benchmarks/gpu.sh [--tiny]        (env: PY, PEER_PY: the Pythons with JAX and with PyTorch + diffusers,
#                                           both python3 by default; BUDGET_S: whole-script seconds, default 465;
#                                           STAGES: which of "configs peer sample train" to run, default all;
#                                           PEER_S, SAMPLE_S, TRAIN_S: each stage's limit, default 100, 150, 400)
# Run from a tree where `configs` and `ldm_jax` import (PYTHONPATH=.): on the lent GPU, a `git archive` snapshot.
# Seen on the H200: one SD-1.5 train-step compile takes about 2 minutes (121 s at batch 16), the sampling programs
# 15-40 s, so in the default budget the train stage gets through one or two (attention, batch) configurations.
set -uo pipefail
cd "$(dirname "$0")/.."
TINY="${1:-}"
PY="${PY:-python3}"
PEER_PY="${PEER_PY:-$PY}"
BUDGET_S="${BUDGET_S:-465}"
WORK="${WORK:-$(mktemp -d /tmp/gpu_bench.XXXXXX)}"
CACHE="${CACHE:-$WORK/jax_cache}"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
# JAX's pool: most of the card (the default is 75%); PyTorch runs in its own process after JAX's have exited.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.94}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-1}"
START=$(date +%s)
mkdir -p "$WORK"
rm -f "$WORK/results.jsonl"

left() { echo $((BUDGET_S - ($(date +%s) - START))); }
# stage NAME LIMIT_S PYTHON [ARGS...]: runs one stage with a hard limit of min(LIMIT_S, time left - 15 s); the
# stage itself skips optional measurements 10 s before that.
stage() {
  local name=$1 limit=$2 py=$3
  shift 3
  local avail=$(($(left) - 15))
  ((limit > avail)) && limit=$avail
  if ((limit < 20)); then
    echo "{\"stage\": \"$name\", \"measurement\": \"$name\", \"skipped\": \"budget: ${limit} s left\"}" >>"$WORK/results.jsonl"
    return
  fi
  echo "=== $name (limit ${limit} s, $(($(date +%s) - START)) s elapsed)"
  timeout -k 10 "$limit" "$py" benchmarks/gpu_bench.py "$name" --work="$WORK" --cache="$CACHE" \
    --deadline=$(($(date +%s) + limit - 10)) $TINY "$@"
  local rc=$?
  if ((rc != 0)); then
    echo "{\"stage\": \"$name\", \"measurement\": \"$name\", \"error\": \"exit status $rc (124: time limit)\"}" >>"$WORK/results.jsonl"
  fi
}

nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,clocks.max.sm,power.draw,power.limit \
  --format=csv 2>/dev/null || echo "(no nvidia-smi)"
STAGES="${STAGES:-configs peer sample train}"
for name in $STAGES; do
  case $name in
    configs) stage configs 60 "$PY" ;;
    peer) stage peer "${PEER_S:-100}" "$PEER_PY" ;;
    sample) stage sample "${SAMPLE_S:-150}" "$PY" ;;
    train) stage train "${TRAIN_S:-400}" "$PY" ;;
    *) echo "unknown stage $name" >&2 ;;
  esac
done
"$PY" benchmarks/gpu_bench.py report --work="$WORK"
echo "total $(($(date +%s) - START)) s; work folder $WORK"

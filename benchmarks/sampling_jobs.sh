#!/usr/bin/env bash
# Sampling-job throughput (1 vs 8 fake CPU devices, kill -9 + resume), metric wall time on 1,000 images and the
# PyTorch peers of the metric networks, in one run: benchmarks/sampling_jobs.py (its docstring says what is measured).
#   bash benchmarks/sampling_jobs.sh [more sampling_jobs.py flags]
#   (WORKDIR=runs/demo/txt2img, OUT=/tmp/ldm_jax_sampling_jobs_bench; needs .venv and .venv-ref, i.e.
#   `bash launch/local.sh test` once)
# Without a trained demo model at $WORKDIR, trains the demo's two stages first (about 12 min on 2 cores, as
# `bash launch/local.sh demo` does, without its sampling and evaluation).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
WORKDIR="${WORKDIR:-runs/demo/txt2img}"
OUT="${OUT:-/tmp/ldm_jax_sampling_jobs_bench}"
mkdir -p "$OUT"
if [ ! -f "$WORKDIR/config.json" ]; then
  RUNS="$(dirname "$WORKDIR")"
  echo "no trained model in $WORKDIR: training the demo into $RUNS (log $OUT/demo_train.log)"
  t0=$(date +%s)
  "$PY" -m ldm_jax.train --config=configs/autoencoder_kl.py:demo --workdir="$RUNS/autoencoder_kl" >"$OUT/demo_train.log" 2>&1
  "$PY" -m ldm_jax.train --config=configs/txt2img.py:demo --workdir="$WORKDIR" \
    --config.first_stage.workdir="$RUNS/autoencoder_kl" >>"$OUT/demo_train.log" 2>&1
  echo "demo trained in $(($(date +%s) - t0)) s"
fi
"$PY" benchmarks/sampling_jobs.py --workdir="$WORKDIR" --out="$OUT" "$@" 2>&1 | tee "$OUT/benchmark.log"

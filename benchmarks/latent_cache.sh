#!/usr/bin/env bash
# Steps/s of the txt2img demo trained from pixels (the frozen first stage encodes every batch) and from a latent
# cache (data.source=latents:DIR, no autoencoder in the step), measured one after the other in the same run.
#   bash benchmarks/latent_cache.sh            # STEPS=300 AE_STEPS=300 OUT=/tmp/ldm_jax_latent_cache_bench
# The first stage is a short demo autoencoder run (its quality does not change the step time). Prints the cache's
# wall time and the steady-state steps/s of each run (the mean of train/steps_per_sec over the log lines after the
# first), and their ratio.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
OUT="${OUT:-/tmp/ldm_jax_latent_cache_bench}"
STEPS="${STEPS:-300}"
AE_STEPS="${AE_STEPS:-300}"
mkdir -p "$OUT"
if [ ! -f "$OUT/ae/config.json" ]; then
  "$PY" -m ldm_jax.train --config=configs/autoencoder_kl.py:demo --workdir="$OUT/ae" \
    --config.train.num_steps="$AE_STEPS" --config.train.preview_every=0 >"$OUT/ae.log" 2>&1
fi
rm -rf "$OUT/cache" "$OUT/pixels" "$OUT/latents"
t0=$(date +%s.%N)
"$PY" -m ldm_jax.cache_latents --first_stage="$OUT/ae" --dataset=shapes_captions --dataset_config=32px \
  --image_size=32 --out="$OUT/cache" >"$OUT/cache.log" 2>&1
t1=$(date +%s.%N)
common=(--config=configs/txt2img.py:demo --config.first_stage.workdir="$OUT/ae" --config.train.num_steps="$STEPS"
  --config.train.log_every=50 --config.train.preview_every=0 --config.train.checkpoint_every="$STEPS")
"$PY" -m ldm_jax.train "${common[@]}" --workdir="$OUT/pixels" >"$OUT/pixels.log" 2>&1
"$PY" -m ldm_jax.train "${common[@]}" --workdir="$OUT/latents" --config.data.source="latents:$OUT/cache" \
  >"$OUT/latents.log" 2>&1
"$PY" - "$OUT" "$t0" "$t1" <<'EOF'
import json, sys

out, t0, t1 = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])


def rate(run):
    rows = [json.loads(line) for line in open(f"{out}/{run}/metrics.jsonl")]
    rates = [r["train/steps_per_sec"] for r in rows if "train/steps_per_sec" in r][1:]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    return sum(rates) / len(rates), losses[-1]


info = json.load(open(f"{out}/cache/dataset_info.json"))
(pix, loss_p), (lat, loss_l) = rate("pixels"), rate("latents")
print(f"cache: {info['records']} records of {info['latent_shape']} in {t1 - t0:.1f} s (incl. start-up)")
print(f"from pixels: {pix:.2f} steps/s (last loss {loss_p:.4f}); from the cache: {lat:.2f} steps/s "
      f"(last loss {loss_l:.4f}); speed-up {lat / pix:.2f}x")
EOF

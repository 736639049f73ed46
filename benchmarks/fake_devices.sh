#!/usr/bin/env bash
# Training throughput of the txt2img demo model on 1 vs 8 fake CPU devices (XLA's host-platform device count): a
# sanity ratio for the data-parallel step (same global batch, same machine, same run of this script), not a speed
# claim: fake devices share the same cores.
#   bash benchmarks/fake_devices.sh [FIRST_STAGE_WORKDIR] [STEPS]
#   (defaults runs/demo/autoencoder_kl, from `bash launch/local.sh demo`, and 60 steps; needs .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
FIRST_STAGE="${1:-runs/demo/autoencoder_kl}"
STEPS="${2:-60}"
WORK="${WORK:-runs/fake_devices}"
PY=.venv/bin/python
mkdir -p "$WORK"
for n in 1 8; do
  rm -rf "$WORK/devices_$n"
  XLA_FLAGS="--xla_force_host_platform_device_count=$n" "$PY" -m ldm_jax.train \
    --config=configs/txt2img.py:demo --workdir="$WORK/devices_$n" --config.first_stage.workdir="$FIRST_STAGE" \
    --config.train.num_steps="$STEPS" --config.train.log_every=$((STEPS / 3)) \
    --config.train.checkpoint_every="$STEPS" --config.train.preview_every=0 >"$WORK/devices_$n.log" 2>&1
done
"$PY" - "$WORK" <<'PYEOF'
import json, os, sys

work = sys.argv[1]
rates = {}
for n in (1, 8):
    with open(os.path.join(work, f"devices_{n}", "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    # The first window includes the first step's dispatch; report the later windows' mean.
    later = [r["train/steps_per_sec"] for r in rows[1:]] or [rows[-1]["train/steps_per_sec"]]
    rates[n] = sum(later) / len(later)
    print(f"{n} device(s): {rates[n]:.2f} steps/s (batch 64)")
print(f"8 devices / 1 device: {rates[8] / rates[1]:.2f}x")
PYEOF

#!/usr/bin/env bash
# First stages at a fixed CPU budget: KL-f4, KL-f8 and VQ-f4 (configs/autoencoder_*.py photos_* presets: 32px
# crops of real photos, 1500 steps of batch 16), each trained with the patch GAN (from step 750, the presets'
# setting) and without it (the peer, same run otherwise), then scored on 512 held-out photo crops (crops of photos
# no training crop comes from) by `ldm_jax.evaluate`: PSNR, SSIM, L1, codebook usage. Prints one table.
#   bash benchmarks/first_stage_budget.sh [STEPS]     (default 1500; needs .venv from `bash launch/local.sh test`)
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS="${1:-1500}"
WORK="${WORK:-runs/first_stage_budget}"
PY=.venv/bin/python
mkdir -p "$WORK"
for run in kl:photos_f4 kl:photos_f8 vq:photos_f4; do
  kind="${run%%:*}"
  preset="${run##*:}"
  for gan in True False; do
    dir="$WORK/${kind}_${preset}_gan${gan}"
    rm -rf "$dir"
    t0=$(date +%s)
    "$PY" -m ldm_jax.train --config="configs/autoencoder_${kind}.py:${preset}" --workdir="$dir" \
      --config.disc.enabled="$gan" --config.train.num_steps="$STEPS" >"$dir.log" 2>&1
    t1=$(date +%s)
    "$PY" -m ldm_jax.evaluate --workdir="$dir" --split=validation --num_examples=512 >>"$dir.log" 2>&1
    echo "$((t1 - t0))" >"$dir/train_seconds"
  done
done
"$PY" - "$WORK" <<'PYEOF'
import json, os, sys

work = sys.argv[1]
print("| model | GAN | train wall (s) | PSNR (dB) | SSIM | L1 | codebook used |")
print("|---|---|---|---|---|---|---|")
for kind, preset in (("kl", "photos_f4"), ("kl", "photos_f8"), ("vq", "photos_f4")):
    rows = {}
    for gan in ("True", "False"):
        d = os.path.join(work, f"{kind}_{preset}_gan{gan}")
        with open(os.path.join(d, "eval_validation.json")) as f:
            r = json.load(f)["autoencoder"]
        with open(os.path.join(d, "train_seconds")) as f:
            secs = int(f.read())
        rows[gan] = r
        used = f"{r['codebook_used_fraction']:.3f}" if "codebook_used_fraction" in r else "-"
        print(f"| {kind}-{preset} | {gan} | {secs} | {r['psnr']:.2f} | {r['ssim']:.4f} | {r['l1']:.4f} | {used} |")
    delta = rows["True"]["psnr"] - rows["False"]["psnr"]
    print(f"| {kind}-{preset} | GAN - no GAN | | {delta:+.2f} | {rows['True']['ssim'] - rows['False']['ssim']:+.4f} | | |")
PYEOF

#!/usr/bin/env bash
# Full-size SD-1.5-architecture interop on this machine: convert time and peak memory, and DDIM sampling time of
# ldm_jax against diffusers (PyTorch CPU, the peer) on the same random-weight pipeline, same size and steps.
#   bash benchmarks/sd15_interop.sh [SIZE] [STEPS]      (defaults 256 and 10; needs .venv and .venv-ref from
#                                                         `bash launch/local.sh test`, about 13 GB of disk in $WORK)
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE="${1:-256}"
STEPS="${2:-10}"
WORK="${WORK:-/tmp/ldm_jax_sd15_bench}"
PY=.venv/bin/python
REF=.venv-ref/bin/python
mkdir -p "$WORK"
"$PY" -c "from ldm_jax.data.tokenizer import CLIPTokenizer; CLIPTokenizer(77, 'eot').save_hf_files('$WORK/tokenizer')"
[ -f "$WORK/pipeline/model_index.json" ] || "$REF" benchmarks/sd15_reference.py make "$WORK/pipeline" "$WORK/tokenizer"
rm -rf "$WORK/converted"
/usr/bin/time -f "convert: wall %e s, peak RSS %M KiB" "$PY" -m ldm_jax.convert --src="$WORK/pipeline" --out="$WORK/converted"
"$REF" benchmarks/sd15_reference.py sample "$WORK/pipeline" "$SIZE" "$STEPS"
"$PY" - "$WORK/converted" "$SIZE" "$STEPS" <<'PYEOF'
import json, sys, time
from ldm_jax.tasks import load_for_sampling

workdir, size, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
task, params, frozen, mesh, _ = load_for_sampling(workdir, image_size=size)
times = []
for _ in range(2):
    t0 = time.perf_counter()
    options = task.sampler_options(name="ddim", num_steps=steps)
    task.generate_images(params, frozen, mesh, ["a photo of a cat"], [0], options, 7.5, batch_size=1)
    times.append(time.perf_counter() - t0)
print(json.dumps({"ldm_jax": "jax CPU", "size": size, "steps": steps, "first_call_s": round(times[0], 2),
                  "second_call_s": round(times[1], 2), "compile_s_approx": round(times[0] - times[1], 2)}))
PYEOF

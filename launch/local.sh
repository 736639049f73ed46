#!/usr/bin/env bash
# Set-up plus one job on this machine, CPU or single GPU host.
#   bash launch/local.sh demo   # install, train the KL autoencoder (f=2), cache its latents, then txt2img, sample
#                               # prompts, evaluate (runs/demo)
#   bash launch/local.sh demo_f4   # the same with the f=4 presets (*:demo_f4, runs/demo_f4; about half the time):
#                               # the first stage and latent cache of the unconditional and super-resolution
#                               # demos (the class-conditional and inpainting demos train on runs/demo's)
#   bash launch/local.sh test   # install with test extras (+ the PyTorch reference env .venv-ref), check
#                               # formatting, run the test suite
#   bash launch/local.sh train --config=configs/txt2img.py:demo --workdir=runs/x [more ldm_jax.train flags]
#                               # install, then one training run with the remaining arguments
#   bash launch/local.sh sample --workdir=runs/demo/txt2img --prompts_file=prompts.tsv --outdir=runs/s
#   bash launch/local.sh evaluate --samples=runs/s --reference=... --metrics=fid,kid,clip_score ...
#                               # install, then a sampling or evaluation job (the same command resumes a sampling job)
# The virtual environment lives in .venv (override with VENV=...). Python 3.12 is preferred (faster jax on CPU);
# 3.11 works.
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-demo}"
VENV="${VENV:-.venv}"

# find_python CHECK CANDIDATES...: the first candidate interpreter for which the Python expression CHECK is true.
find_python() {
  local check="$1" c
  shift
  for c in "$@"; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c "import sys; sys.exit(not ($check))" 2>/dev/null; then
      echo "$c"
      return
    fi
  done
  echo "no Python with $check found among: $*" >&2
  exit 1
}
PYENV_ROOT_DIR="$(pyenv root 2>/dev/null || echo /nonexistent)"

if [ ! -x "$VENV/bin/python" ]; then
  "$(find_python 'sys.version_info >= (3, 11)' python3.12 "$PYENV_ROOT_DIR"/versions/3.12*/bin/python3.12 python3.11 python3)" \
    -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
PY="$VENV/bin/python"

case "$mode" in
  demo | demo_f4)
    "$PY" -m pip install -q -e .
    RUNS="${RUNS:-runs/$mode}"
    t0=$(date +%s)
    "$PY" -m ldm_jax.train --config="configs/autoencoder_kl.py:$mode" --workdir="$RUNS/autoencoder_kl"
    t1=$(date +%s)
    # The training images encoded once by the frozen first stage (a rerun keeps complete shards): no encoder in
    # the txt2img step. Previews and evaluation read the embedded dataset the cache was made from.
    "$PY" -m ldm_jax.cache_latents --first_stage="$RUNS/autoencoder_kl" --dataset=shapes_captions \
      --dataset_config=32px --image_size=32 --out="$RUNS/latents"
    tc=$(date +%s)
    "$PY" -m ldm_jax.train --config="configs/txt2img.py:$mode" --workdir="$RUNS/txt2img" \
      --config.first_stage.workdir="$RUNS/autoencoder_kl" --config.data.source="latents:$RUNS/latents"
    t2=$(date +%s)
    # A rerun after the model or the sampling settings changed (a pull, an allowed resume) keeps the earlier
    # samples as $RUNS/samples.before-<k> and draws the grid anew; the same settings again make nothing.
    "$PY" -m ldm_jax.sample --workdir="$RUNS/txt2img" --prompts_file=configs/demo_prompts.txt --num_per_prompt=4 \
      --outdir="$RUNS/samples" --on_other_job=move_aside
    t3=$(date +%s)
    "$PY" -m ldm_jax.evaluate --workdir="$RUNS/txt2img" --split=heldout --num_examples=256 >/dev/null
    t4=$(date +%s)
    echo "stage wall times (s): autoencoder $((t1 - t0)), latent cache $((tc - t1)), txt2img $((t2 - tc))," \
      "sample $((t3 - t2)), evaluate $((t4 - t3))"
    echo "samples: $RUNS/samples/grid.png (manifest.jsonl beside it); evaluation: $RUNS/txt2img/eval_heldout.json"
    echo "held-out prompt following (attributes read back from the pixels):"
    cat "$RUNS/txt2img/eval_heldout.md"
    ;;
  train | sample | evaluate)
    shift
    "$PY" -m pip install -q -e .
    exec "$PY" -m "ldm_jax.$mode" "$@"
    ;;
  test)
    "$PY" -m pip install -q -e '.[test]'
    REF_VENV="${REF_VENV:-.venv-ref}"
    if [ ! -x "$REF_VENV/bin/python" ]; then
      # The parity tests' PyTorch reference (torch, diffusers, transformers) lives in its own Python 3.11
      # environment: torch 2.13.0 is a local CPU wheel for 3.11, and the package itself never imports torch.
      "$(find_python 'sys.version_info[:2] == (3, 11)' python3.11 "$PYENV_ROOT_DIR"/versions/3.11*/bin/python3.11 python3)" \
        -m venv "$REF_VENV"
    fi
    "$REF_VENV/bin/python" -m pip install -q -r tests/reference/requirements.txt
    "$REF_VENV/bin/python" -m pip install -q --no-deps -r tests/reference/requirements-nodeps.txt
    export LDM_JAX_REFERENCE_PYTHON="$PWD/$REF_VENV/bin/python"
    "$PY" -m ruff format --check ldm_jax configs tests benchmarks
    "$PY" -m ruff check ldm_jax configs tests benchmarks  # the rules of pyproject.toml
    # pytest exits 5 when it collects no test; that fails this script like any other non-zero code.
    # Two worker processes (PYTEST_WORKERS), each file on one worker so module fixtures are built once: XLA:CPU
    # compiles on one thread, so two workers use a 2-core CI machine about twice as well as one.
    # Tests marked slow are left out (README, Tests: `-m slow` runs them); PYTEST_MARKS overrides the selection.
    # --no-loadscope-reorder: files go out in collection order, longest first (tests/conftest.py), instead of by
    # test count, which sent the multi-host matrix (few tests, the longest file) out last, to run alone at the end.
    "$PY" -m pytest -q --durations=10 -n "${PYTEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder \
      -m "${PYTEST_MARKS:-not slow}" tests
    ;;
  *)
    echo "usage: $0 demo|demo_f4|test|train|sample|evaluate [flags of ldm_jax.train|sample|evaluate]" >&2
    exit 2
    ;;
esac

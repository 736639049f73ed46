#!/usr/bin/env bash
# ldm_jax against diffusers-Flax 0.39 and diffusers-PyTorch on the same models and weights, in one run
# (benchmarks/peers.py: UNet forward, AdamW train step, DDIM-50 loop, VAE decode, compile times).
#   bash benchmarks/peers.sh [small|sd15] [extra peers.py flags, e.g. --ours_attention=auto,jax]
# Needs .venv and .venv-ref (`bash launch/local.sh test`); makes .venv-flaxpeer (Python 3.12, our jax/flax pins,
# diffusers 0.39.0, the last release with Flax) on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE="${1:-small}"
shift || true
PEER=.venv-flaxpeer
if [ ! -x "$PEER/bin/python" ]; then
  # The first Python 3.12 that runs (a pyenv shim is on PATH even where its version is not selected).
  PY312=""
  for c in python3.12 "$(pyenv root 2>/dev/null || echo /nonexistent)"/versions/3.12*/bin/python3.12; do
    if "$c" -c "import sys; assert sys.version_info[:2] == (3, 12)" 2>/dev/null; then PY312="$c"; break; fi
  done
  [ -n "$PY312" ] || { echo "benchmarks/peers.sh: no Python 3.12 found (diffusers-Flax runs with our jax)" >&2; exit 1; }
  "$PY312" -m venv "$PEER"
  JAX_PIN="$(.venv/bin/python -c 'import jax, jaxlib, flax; print(f"jax=={jax.__version__} jaxlib=={jaxlib.__version__} flax=={flax.__version__}")')"
  # shellcheck disable=SC2086
  "$PEER/bin/python" -m pip install -q $JAX_PIN diffusers==0.39.0 safetensors huggingface_hub optax
fi
PYTHONPATH=. FLAX_PEER_PYTHON="$PEER/bin/python" LDM_JAX_REFERENCE_PYTHON=.venv-ref/bin/python \
  .venv/bin/python benchmarks/peers.py --size="$SIZE" "$@"

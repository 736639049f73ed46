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
  "$(command -v python3.12 || echo "$(pyenv root)/versions/3.12.1/bin/python3.12")" -m venv "$PEER"
  JAX_PIN="$(.venv/bin/python -c 'import jax, jaxlib, flax; print(f"jax=={jax.__version__} jaxlib=={jaxlib.__version__} flax=={flax.__version__}")')"
  # shellcheck disable=SC2086
  "$PEER/bin/python" -m pip install -q $JAX_PIN diffusers==0.39.0 safetensors huggingface_hub optax
fi
PYTHONPATH=. FLAX_PEER_PYTHON="$PEER/bin/python" LDM_JAX_REFERENCE_PYTHON=.venv-ref/bin/python \
  .venv/bin/python benchmarks/peers.py --size="$SIZE" "$@"

"""Unconditional latent diffusion: the class-conditional setup (configs/class_cond.py) without a condition, so
without guidance.

  python -m ldm_jax.train --config=configs/unconditional.py:demo --workdir=runs/demo/unconditional
  python -m ldm_jax.sample --workdir=runs/demo/unconditional --num_images=16
Presets: ldm (default, pod scale), demo (CPU minutes), tiny (tests); see configs/class_cond.py.
"""

from configs.class_cond import PRESETS, base_config
from ldm_jax import config_lib


def get_config(arg=None):
    c = base_config("unconditional", config_lib.parse_preset(arg, PRESETS))
    c.diffusion.cond_drop_prob = 0.0  # nothing to drop
    c.sample.guidance_scale = 1.0  # unused: unconditional sampling has no guidance
    c.sample.num_preview = 8
    return c

"""KL-regularised autoencoder (LDM first stage) on the embedded captioned-shapes images.

Run:
  python -m ldm_jax.train --config=configs/autoencoder_kl.py:demo --workdir=runs/demo/autoencoder_kl
Presets:
  kl_f8 (default)  the paper's KL-f8 (4 latent channels) at 256x256, global batch 256 (pod scale)
  kl_f4            the paper's KL-f4 (3 latent channels) at 256x256
  demo             a small f=4 model at 32x32 that trains in a few CPU minutes
  tiny             16x16, for tests
"""

import ml_collections

from ldm_jax import config_lib
from ldm_jax.models.autoencoder import AUTOENCODER_VARIANTS

PRESETS = ("kl_f8", "kl_f4", "demo", "tiny")


def get_config(arg=None):
    preset = config_lib.parse_preset(arg, PRESETS)
    c = config_lib.run_header("autoencoder", preset)
    variant = {"kl_f8": "kl_f8", "kl_f4": "kl_f4", "demo": "tiny_f4", "tiny": "tiny_f4"}[preset]
    c.model = ml_collections.ConfigDict(dict(AUTOENCODER_VARIANTS[variant]))
    # L1 + KL as in the paper's first stage; the LPIPS and adversarial terms are not part of this trainer yet.
    c.loss = ml_collections.ConfigDict(dict(l1_weight=1.0, l2_weight=0.0, kl_weight=1e-6))
    if preset in ("kl_f8", "kl_f4"):
        c.data = config_lib.data_section("256px", 256, 256)
        c.optim = config_lib.optim_section(lr=4.5e-6 * 256, warmup_steps=1000, ema_decay=0.9999)
        c.train = config_lib.train_section(num_steps=200_000, log_every=100, checkpoint_every=5000, preview_every=5000)
    elif preset == "demo":
        # Full-resolution convolutions dominate CPU time, hence the narrow first level.
        c.model.block_out_channels = (16, 32, 64)
        c.data = config_lib.data_section("32px", 32, 16)
        c.optim = config_lib.optim_section(lr=2e-3, warmup_steps=100, ema_decay=0.99, schedule="cosine")
        c.optim.final_lr_fraction = 0.05
        # An added L2 term brings small objects and their colours back about twice as fast as L1 alone here.
        c.loss.l2_weight = 1.0
        c.train = config_lib.train_section(num_steps=1500, log_every=100, checkpoint_every=500, preview_every=500)
    else:
        c.data = config_lib.data_section("tiny", 16, 8)
        c.model.block_out_channels = (8, 16, 16)
        c.model.norm_groups = 4
        c.optim = config_lib.optim_section(lr=1e-3, warmup_steps=2, ema_decay=0.9)
        c.train = config_lib.train_section(num_steps=8, log_every=2, checkpoint_every=4, preview_every=0)
    return c

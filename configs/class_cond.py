"""Class-conditional latent diffusion: a UNet with a class embedding (plus a null class for classifier-free
guidance), trained in a frozen KL autoencoder's latent space on the embedded shapes dataset's attribute classes.

Run (after training the first stage named by first_stage.workdir):
  python -m ldm_jax.train --config=configs/class_cond.py:demo --workdir=runs/demo/class_cond
  python -m ldm_jax.sample --workdir=runs/demo/class_cond --class_label=0 --class_label=7 --num_per_prompt=4
Presets:
  ldm (default)  pod scale: 256x256 images, KL-f8 latents (32x32x4), an LDM-cin-size UNet (about 400M), batch 1024
  demo           32x32 images, f=4 latents (8x8x4), a small UNet; CPU minutes
  tiny           16x16, for tests
Classes (``classes``): "shape_color" (18: colour x shape), "shape" (3) or "color" (6); class i of shape_color is
colour i // 3 (red, green, blue, yellow, purple, cyan) and shape i % 3 (circle, square, triangle).
"""

import ml_collections

from ldm_jax import config_lib

PRESETS = ("ldm", "demo", "tiny")


def base_config(task: str, preset: str) -> ml_collections.ConfigDict:
    """Everything but the conditioning, shared with configs/unconditional.py."""
    c = config_lib.latent_diffusion_base(task, preset)
    c.sample = config_lib.sample_section((), num_steps=50)
    if preset == "ldm":
        c.first_stage.workdir = "runs/ldm/autoencoder_kl"
        c.data = config_lib.data_section("256px", 256, 1024)
        c.unet.update(
            dict(
                block_out_channels=(256, 512, 768),
                layers_per_block=2,
                attention_levels=(False, True, True),
                num_heads=(8, 8, 8),
                head_dim=32,
                transformer_depth=1,
                norm_groups=32,
            )
        )
        c.optim = config_lib.optim_section(lr=1e-4, warmup_steps=5000, ema_decay=0.9999)
        c.train = config_lib.train_section(num_steps=400_000, log_every=100, checkpoint_every=5000, preview_every=5000)
    else:
        config_lib.small_diffusion_preset(c, preset, attention_levels=(False, True))
    return c


def get_config(arg=None):
    preset = config_lib.parse_preset(arg, PRESETS)
    c = base_config("class_cond", preset)
    c.classes = "shape_color"
    c.sample.class_labels = (0, 4, 8, 13)  # red circle, green square, blue triangle, purple square
    return c

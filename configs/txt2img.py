"""Text-to-image latent diffusion: a cross-attention UNet trained in a frozen KL autoencoder's latent space.

Run (after training the first stage named by first_stage.workdir):
  python -m ldm_jax.train --config=configs/txt2img.py:demo --workdir=runs/demo/txt2img
  python -m ldm_jax.sample --workdir=runs/demo/txt2img --prompt="a large red circle in the center on a black background"
Presets:
  sd (default)  pod scale: 256x256 images, KL-f8 latents (32x32x4), the SD-1.x UNet (860M) and CLIP ViT-L/14-size
                text encoder trained from scratch, global batch 2048
  demo          32x32 images, f=4 latents (8x8x4), a small UNet and text encoder; CPU minutes
  tiny          16x16, for tests
"""

import ml_collections

from ldm_jax import config_lib
from ldm_jax.models.text_encoders import TEXT_ENCODER_VARIANTS
from ldm_jax.models.unet import UNET_VARIANTS

PRESETS = ("sd", "demo", "tiny")


def get_config(arg=None):
    preset = config_lib.parse_preset(arg, PRESETS)
    c = config_lib.latent_diffusion_base("txt2img", preset)
    c.text_encoder = ml_collections.ConfigDict(
        dict(vocab_size=49408, activation="quick_gelu", output_layer=-1, pad_token="eot", trainable=True)
    )
    c.sample = config_lib.sample_section(
        (
            "a large red circle in the center on a black background",
            "a small blue square at the top left on a white background",
            "a large yellow triangle at the bottom right on a gray background",
            "a small green circle on the left on a black background",
        ),
        num_steps=50,
    )

    if preset == "sd":
        c.first_stage.workdir = "runs/sd/autoencoder_kl"
        c.data = config_lib.data_section("256px", 256, 2048)
        c.text_encoder.update(TEXT_ENCODER_VARIANTS["clip_vit_l14"])
        c.unet.update(UNET_VARIANTS["sd15"])
        c.optim = config_lib.optim_section(lr=1e-4, warmup_steps=10_000, ema_decay=0.9999)
        c.train = config_lib.train_section(num_steps=500_000, log_every=100, checkpoint_every=5000, preview_every=5000)
    else:
        config_lib.small_diffusion_preset(c, preset)
        if preset == "demo":
            c.text_encoder.update(TEXT_ENCODER_VARIANTS["tiny"])
        else:
            c.text_encoder.update(dict(width=32, layers=1, heads=2, max_length=16))
    return c

"""Super-resolution latent diffusion: the low-resolution image (data.image_size / superres.scale pixels a side)
concatenated to the latents, with noise augmentation of the low-resolution input (the level is a UNet class input),
as in LDM's SR models and Stable Diffusion's x4 upscaler. Low-resolution training inputs are made from each image by
antialiased downsampling.

Run (after training the first stage named by first_stage.workdir):
  python -m ldm_jax.train --config=configs/superres.py:demo --workdir=runs/demo/superres
  python -m ldm_jax.sample --workdir=runs/demo/superres --low_res_image=small.png --noise_level=20
  python -m ldm_jax.evaluate --workdir=runs/demo/superres --split=validation   (PSNR / SSIM vs bicubic upsampling)
Presets:
  ldm (default)  pod scale: 64 -> 256 px, KL-f4 latents (64x64x3) so the low-res image needs no resize, an
                 LDM-SR-size UNet without attention at the two finest levels
  demo           8 -> 32 px on the demo KL-f4 autoencoder (8x8 latents); CPU minutes
  tiny           4 -> 16 px, for tests
"""

from configs.class_cond import PRESETS, base_config
from ldm_jax import config_lib
from ldm_jax.tasks.concat_inputs import SuperResConfig

PRESETS = tuple(PRESETS)


def get_config(arg=None):
    preset = config_lib.parse_preset(arg, PRESETS)
    c = base_config("superres", preset)
    # Output side / low-resolution side 4, training inputs by antialiased bicubic downsampling; noise augmentation
    # with levels 0..350 of the SD x4 upscaler's DDPM schedule (max_noise_level=0 disables it: no level input).
    c.superres = SuperResConfig.defaults(
        scale=4,
        downsample="bicubic",
        max_noise_level=350,
        noise_schedule="scaled_linear",
        noise_timesteps=1000,
        noise_beta_start=0.0001,
        noise_beta_end=0.02,
    )
    c.diffusion.cond_drop_prob = 0.0  # nothing to drop: the low-resolution image always conditions
    c.sample.guidance_scale = 1.0  # unused: super-resolution is not guided
    c.sample.noise_level = 20  # default --noise_level at sampling
    c.sample.num_preview = 8
    if preset == "ldm":
        c.first_stage.workdir = "runs/ldm/autoencoder_kl_f4"
        c.unet.attention_levels = (False, False, True)
    return c

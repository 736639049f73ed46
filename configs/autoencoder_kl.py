"""KL-regularised autoencoder (LDM first stage): L1 + LPIPS + patch GAN with adaptive weight, KL, learned logvar.

Run:
  python -m ldm_jax.train --config=configs/autoencoder_kl.py:demo --workdir=runs/demo/autoencoder_kl
Presets:
  kl_f8 (default)   the paper's KL-f8 (4 latent channels), 256px crops of your images (data.source), batch 64
  kl_f4, kl_f16, kl_f32   the zoo's other KL models (3, 16, 64 latent channels)
  demo              a small f=2 model on 32px captioned shapes (16x16x4 latents, which keep the shapes): the txt2img,
                    class-conditional and inpainting demos' first stage (CPU minutes, no GAN)
  demo_f4           the same at f=4 (8x8x4 latents): the first stage of txt2img.py:demo_f4 and of the
                    unconditional and super-resolution demos
  photos_f4, photos_f8    small f=4 / f=8 models on 32px crops of real photos (CPU-budget comparisons)
  tiny              16px, for tests
The zoo presets train on your images (--config.data.source=folder:/data/images, webdataset:..., arrayrecord:...;
README, Train on your own data) and need VGG16 weights for LPIPS (--config.loss.lpips_vgg_weights=vgg16.safetensors)
or --config.loss.perceptual_weight=0. The small presets run without LPIPS (perceptual_weight=0, stated in the log).
"""

from configs import first_stage
from ldm_jax import config_lib
from ldm_jax.models.autoencoder import AUTOENCODER_VARIANTS

PRESETS = ("kl_f8", "kl_f4", "kl_f16", "kl_f32", "demo", "demo_f4", "photos_f4", "photos_f8", "tiny")
ZOO = ("kl_f8", "kl_f4", "kl_f16", "kl_f32")


def get_config(arg=None):
    preset = config_lib.parse_preset(arg, PRESETS)
    variant = preset if preset in ZOO else ("tiny_f8" if preset == "photos_f8" else "tiny_f4")
    # disc_start 50001 and disc_weight 0.5: the zoo's KL models (LPIPSWithDiscriminator settings).
    c = first_stage.base("kl", preset, AUTOENCODER_VARIANTS[variant], disc_start=50001, disc_weight=0.5)
    if preset in ZOO:
        first_stage.schedule(c, "zoo")
        return c
    demo = preset in ("demo", "demo_f4")
    first_stage.schedule(c, "tiny" if preset == "tiny" else "demo" if demo else "photos")
    if preset != "tiny":
        # Full-resolution convolutions dominate CPU time, hence the narrow first level. One level fewer is f=2.
        widths = {"photos_f8": (16, 32, 64, 64), "demo": (16, 32)}
        c.model.block_out_channels = widths.get(preset, (16, 32, 64))
        # An added L2 term brings small objects and their colours back about twice as fast as L1 alone here.
        c.loss.l2_weight = 1.0
    if demo:
        # The txt2img demo's first stage: at this budget the GAN costs 2.4-3.8 dB of held-out PSNR (measured on the
        # photos_* presets, benchmarks/first_stage_budget.sh); the reference, too, starts it only once the
        # autoencoder has converged (disc_start 50001 for its KL models). photos_* keep it, from step 750.
        c.disc.enabled = False
    return c

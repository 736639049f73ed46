"""Vector-quantised autoencoder (LDM / taming VQGAN first stage): L1 + LPIPS + patch GAN with adaptive weight,
codebook and commitment losses (or an EMA codebook), straight-through gradients.

Run:
  python -m ldm_jax.train --config=configs/autoencoder_vq.py:photos_f4 --workdir=runs/demo/autoencoder_vq
Presets:
  vq_f4 (default)   the paper's VQ-f4 (3 channels, 8192 codes), 256px crops of your images (data.source), global
                    batch 64 (pod scale)
  vq_f8, vq_f16     the zoo's VQ-f8 (4 channels) and VQ-f16 (8 channels), 16384 codes
  demo              a small f=4 model with 512 codes on 32px captioned shapes (a txt2img first stage; no GAN)
  photos_f4         the same on 32px crops of real photos (CPU-budget comparisons)
  tiny              16px, for tests
Options: --config.loss.codebook_update=ema (EMA codebook), --config.model.l2_codes=True (unit-normalised codes).
"""

from configs import first_stage
from ldm_jax import config_lib
from ldm_jax.models.autoencoder import AUTOENCODER_VARIANTS

PRESETS = ("vq_f4", "vq_f8", "vq_f16", "demo", "photos_f4", "tiny")
ZOO = ("vq_f4", "vq_f8", "vq_f16")


def get_config(arg=None):
    preset = config_lib.parse_preset(arg, PRESETS)
    model = dict(AUTOENCODER_VARIANTS[preset if preset in ZOO else "vq_f4"])
    # disc_start 0 and disc_weight 0.75: the zoo's vq-f4 (VQLPIPSWithDiscriminator settings).
    c = first_stage.base("vq", preset, model, disc_start=0, disc_weight=0.75)
    if preset in ZOO:
        first_stage.schedule(c, "zoo")
        return c
    first_stage.schedule(c, "tiny" if preset == "tiny" else "demo" if preset == "demo" else "photos")
    c.model.update(num_codes=512 if preset != "tiny" else 64)
    if preset != "tiny":
        c.model.block_out_channels = (16, 32, 64)
        c.model.norm_groups = 8
        c.loss.l2_weight = 1.0
    if preset == "demo":
        # The txt2img demo's first stage: at this budget the GAN costs 2.4-3.8 dB of held-out PSNR (measured on the
        # photos_* presets, benchmarks/first_stage_budget.sh); the reference, too, starts it only once the
        # autoencoder has converged (disc_start 50001 for its KL models). photos_* keep it, from step 750.
        c.disc.enabled = False
    return c

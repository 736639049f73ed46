"""Text-to-image latent diffusion: a cross-attention UNet trained in a frozen KL autoencoder's latent space.

Run (after training the first stage named by first_stage.workdir):
  python -m ldm_jax.train --config=configs/txt2img.py:demo --workdir=runs/demo/txt2img
  python -m ldm_jax.sample --workdir=runs/demo/txt2img --prompt="a large red circle in the center on a black background"
Presets:
  sd (default)  pod scale: 256x256 images of your data (--config.data.source=...), KL-f8 latents (32x32x4), the
                SD-1.x UNet (860M) and CLIP ViT-L/14-size text encoder trained from scratch, global batch 2048
  demo          32x32 images, f=2 latents (16x16x4; autoencoder_kl.py:demo), a small 3-level UNet and text
                encoder; CPU minutes (bash launch/local.sh demo)
  demo_f4       the same images on f=4 latents (8x8x4; autoencoder_kl.py:demo_f4), a 2-level UNet: the demo
                until 2026-12-06, about 0.55x its training time
  tiny          16x16, for tests
"""

from ldm_jax import config_lib
from ldm_jax.data.pipeline import SOURCE_REQUIRED, data_section
from ldm_jax.diffusion.objectives import diffusion_section
from ldm_jax.evaluation.in_training import EvalConfig
from ldm_jax.models.text_encoders import TEXT_ENCODER_VARIANTS
from ldm_jax.models.lora import lora_section
from ldm_jax.models.unet import UNET_VARIANTS, unet_section
from ldm_jax.tasks.conditioners import text_encoder_section
from ldm_jax.tasks.latent_diffusion import sample_section
from ldm_jax.tasks.latent_space import FirstStageConfig
from ldm_jax.training.optim import optim_section
from ldm_jax.training.sharding import MeshConfig
from ldm_jax.training.train_config import train_section

PRESETS = ("sd", "demo", "demo_f4", "tiny")
PROMPTS = (
    "a large red circle in the center on a black background",
    "a small blue square at the top left on a white background",
    "a large yellow triangle at the bottom right on a gray background",
    "a small green circle on the left on a black background",
)


def get_config(arg=None):
    preset = config_lib.parse_preset(arg, PRESETS)
    c = config_lib.run_header("txt2img", preset)
    c.mesh = MeshConfig.defaults()
    c.latent_scale = 0.0  # 0: 1/std of the first stage's latents on training images, fixed at the first step
    c.diffusion = diffusion_section()
    # Distribution metrics during training (off; e.g. --config.eval.every=5000 --config.eval.metrics=fid,clip_score
    # --config.eval.fid_weights=... --config.eval.clip_weights=...).
    c.eval = EvalConfig.defaults()
    c.sample = sample_section(PROMPTS, num_steps=50)
    # LoRA fine-tuning of init_from's weights (off: rank 0); e.g. --config.lora.rank=8, configs/dreambooth.py.
    c.lora = lora_section()
    if preset == "sd":
        c.first_stage = FirstStageConfig.defaults(workdir="runs/sd/autoencoder_kl")
        c.data = data_section("256px", 256, 2048)
        c.data.source = SOURCE_REQUIRED  # your images and captions: README, Train on your own data
        c.data.crop, c.data.random_flip = "random", True
        c.text_encoder = text_encoder_section(TEXT_ENCODER_VARIANTS["clip_vit_l14"])
        c.unet = unet_section(UNET_VARIANTS["sd15"])
        c.optim = optim_section(lr=1e-4, warmup_steps=10_000, ema_decay=0.9999)
        c.train = train_section(num_steps=500_000, log_every=100, checkpoint_every=5000, preview_every=5000)
        c.train.keep_every = 50_000  # a week-long run keeps a checkpoint every 50k steps besides the last 3
    elif preset in ("demo", "demo_f4"):
        c.first_stage = FirstStageConfig.defaults(workdir=f"runs/{preset}/autoencoder_kl")
        # Batch 32 x 4500 steps, not 64 x 1500: shape is learned late and answers to the number of updates (held-out
        # shape 0.23 -> 0.42 at guidance 3 on f=4 latents, every other attribute 1.000; docs/demo_fidelity.md).
        # launch/local.sh demo trains it from a latent cache of the demo first stage (python -m
        # ldm_jax.cache_latents), which runs no encoder in the step.
        c.data = data_section("32px", 32, 32)
        c.text_encoder = text_encoder_section(TEXT_ENCODER_VARIANTS["tiny"])
        c.optim = optim_section(lr=1e-3, warmup_steps=100, ema_decay=0.995, schedule="cosine")
        c.optim.final_lr_fraction = 0.1
        c.train = train_section(num_steps=4500, log_every=100, checkpoint_every=1500, preview_every=1500)
        c.sample.num_steps = 25
        c.unet = unet_section(
            block_out_channels=(32, 64),
            layers_per_block=1,
            attention_levels=(True, True),
            num_heads=(4, 4),
            head_dim=0,
            transformer_depth=1,
            norm_groups=8,
        )
        # Held-out shape of demo_f4's model at guidance 1.5 / 3 / 5 / 7.5 / 10 (the same samples' noise):
        # 0.383 / 0.418 / 0.441 / 0.453 / 0.473, colour 1.000 down to 0.988 at 10; every other attribute >= 0.996.
        c.sample.guidance_scale = 7.5
        if preset == "demo":
            f2_demo_recipe(c)
            # The circle / square word is still being learned at 4500 steps: resumed to 6000, held-out shape 0.824
            # -> 0.895, the first stage's own ceiling (0.891), every other attribute >= 0.992 (README, Two
            # commands). A constant learning rate does not depend on num_steps, so a run of the 4500-step preset
            # resumes to 6000.
            c.train.num_steps = 6000
    else:  # tiny
        c.first_stage = FirstStageConfig.defaults(workdir="")  # tests fill this in
        c.data = data_section("tiny", 16, 8)
        c.text_encoder = text_encoder_section(dict(width=32, layers=1, heads=2, max_length=16))
        c.unet = unet_section(UNET_VARIANTS["tiny"], block_out_channels=(16, 32), num_heads=(2, 2), norm_groups=8)
        c.optim = optim_section(lr=1e-3, warmup_steps=2, ema_decay=0.9)
        c.train = train_section(num_steps=8, log_every=2, checkpoint_every=4, preview_every=0)
        c.sample.num_steps = 4
    return c


def f2_demo_recipe(c) -> None:
    """The UNet, diffusion and sampling settings of the demos on 16x16x4 latents (autoencoder_kl.py:demo's f=2 first
    stage): this file's demo and configs/class_cond.py:demo. Applied to the 2-level f=4 demo UNet."""
    # A third level, so that attention runs at 8x8 and 4x4; a sine-cosine position code, since the convolutions'
    # padding no longer tells the middle where it is; zero terminal SNR with v-prediction and trailing steps, since
    # 16x16x4 latents leak the layout through the schedule's last 0.068 of signal (position 0.133 without it).
    # Held-out shape 0.551 and 0.637 in two runs under the cosine rate (demo_f4: 0.41-0.49), every other attribute
    # >= 0.988 (docs/demo_fidelity.md).
    c.unet.update(
        block_out_channels=(32, 64, 64),
        attention_levels=(False, True, True),
        num_heads=(4, 4, 4),
        position_embedding="sincos",
    )
    c.diffusion.update(rescale_betas_zero_snr=True, prediction_type="v_prediction")
    c.sample.update(spacing="trailing", guidance_scale=3.0)
    # A constant learning rate after warm-up, not cosine down to 0.1x: the circle / square distinction (a few corner
    # pixels) is the last thing this UNet learns, and under the cosine the rate had fallen to a third by the time it
    # starts. txt2img, same first stage and cache, 4500 steps, held-out 256: shape 0.570 -> 0.824 (circle->square
    # loss increase at t=500 0.027 -> 0.147), every other attribute >= 0.984.
    c.optim.schedule = "constant"

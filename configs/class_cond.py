"""Class-conditional latent diffusion: a UNet with a class embedding (plus a null class for classifier-free
guidance), trained in a frozen KL autoencoder's latent space on the embedded shapes dataset's attribute classes.

Run (after training the first stage named by first_stage.workdir):
  python -m ldm_jax.train --config=configs/class_cond.py:demo --workdir=runs/demo/class_cond
  python -m ldm_jax.sample --workdir=runs/demo/class_cond --class_label=0 --class_label=7 --num_per_prompt=4
Presets:
  ldm (default)  pod scale: 256x256 images, KL-f8 latents (32x32x4), an LDM-cin-size UNet (about 400M), batch 1024
  demo           32x32 images, f=2 latents (16x16x4; the txt2img demo's first stage in runs/demo), its small 3-level
                 UNet; about an hour on a 2-core CPU
  tiny           16x16, for tests
Classes (``classes``): "shape_color" (18: colour x shape), "shape" (3) or "color" (6); class i of shape_color is
colour i // 3 (red, green, blue, yellow, purple, cyan) and shape i % 3 (circle, square, triangle).
"""

import ml_collections

from configs import txt2img
from ldm_jax import config_lib
from ldm_jax.data.pipeline import data_section
from ldm_jax.diffusion.objectives import diffusion_section
from ldm_jax.evaluation.in_training import EvalConfig
from ldm_jax.models.lora import lora_section
from ldm_jax.models.unet import UNET_VARIANTS, unet_section
from ldm_jax.tasks.latent_diffusion import sample_section
from ldm_jax.tasks.latent_space import FirstStageConfig
from ldm_jax.training.optim import optim_section
from ldm_jax.training.sharding import MeshConfig
from ldm_jax.training.train_config import train_section

PRESETS = ("ldm", "demo", "tiny")


def base_config(task: str, preset: str) -> ml_collections.ConfigDict:
    """Everything but the conditioning, shared with configs/unconditional.py and configs/superres.py."""
    c = config_lib.run_header(task, preset)
    c.mesh = MeshConfig.defaults()
    c.latent_scale = 0.0  # 0: 1/std of the first stage's latents on training images, fixed at the first step
    c.diffusion = diffusion_section()
    # Distribution metrics during training (off; e.g. --config.eval.every=5000 --config.eval.metrics=fid,clip_score
    # --config.eval.fid_weights=... --config.eval.clip_weights=...).
    c.eval = EvalConfig.defaults()
    c.sample = sample_section((), num_steps=50)
    # LoRA fine-tuning of init_from's weights (off: rank 0); e.g. --config.lora.rank=8, configs/dreambooth.py.
    c.lora = lora_section()
    if preset == "ldm":
        c.first_stage = FirstStageConfig.defaults(workdir="runs/ldm/autoencoder_kl")
        c.data = data_section("256px", 256, 1024)
        c.unet = unet_section(
            block_out_channels=(256, 512, 768),
            layers_per_block=2,
            attention_levels=(False, True, True),
            num_heads=(8, 8, 8),
            head_dim=32,
            transformer_depth=1,
            norm_groups=32,
        )
        c.optim = optim_section(lr=1e-4, warmup_steps=5000, ema_decay=0.9999)
        c.train = train_section(num_steps=400_000, log_every=100, checkpoint_every=5000, preview_every=5000)
        c.train.keep_every = 50_000  # a week-long run keeps a checkpoint every 50k steps besides the last 3
    elif preset == "demo":
        # The f=4 first stage (the txt2img demo moved to f=2); superres.py:demo needs f=4: 8 px inputs beside 8x8
        # latents.
        c.first_stage = FirstStageConfig.defaults(workdir="runs/demo_f4/autoencoder_kl")
        c.data = data_section("32px", 32, 64)
        c.unet = unet_section(
            block_out_channels=(32, 64),
            layers_per_block=1,
            attention_levels=(False, True),
            num_heads=(4, 4),
            head_dim=0,
            transformer_depth=1,
            norm_groups=8,
        )
        c.optim = optim_section(lr=1e-3, warmup_steps=100, ema_decay=0.995, schedule="cosine")
        c.optim.final_lr_fraction = 0.1
        c.train = train_section(num_steps=1500, log_every=100, checkpoint_every=500, preview_every=500)
        c.sample.num_steps = 25
    else:  # tiny
        c.first_stage = FirstStageConfig.defaults(workdir="")  # tests fill this in
        c.data = data_section("tiny", 16, 8)
        c.unet = unet_section(UNET_VARIANTS["tiny"], block_out_channels=(16, 32), num_heads=(2, 2), norm_groups=8)
        c.optim = optim_section(lr=1e-3, warmup_steps=2, ema_decay=0.9)
        c.train = train_section(num_steps=8, log_every=2, checkpoint_every=4, preview_every=0)
        c.sample.num_steps = 4
    return c


def get_config(arg=None):
    preset = config_lib.parse_preset(arg, PRESETS)
    c = base_config("class_cond", preset)
    c.classes = "shape_color"
    c.sample.class_labels = (0, 4, 8, 13)  # red circle, green square, blue triangle, purple square
    # How the label enters the UNet: "timestep" (a learned embedding added to the timestep embedding, as ADM and
    # diffusers' num_class_embeds) or "cross_attention" (a learned class_context_dim-wide embedding as a one-token
    # context of every cross-attention, as LDM's class-conditional ImageNet models, whose width the ldm preset takes).
    # The demo's, at 4500 steps on one f=4 first stage (validation 256): colour 0.984, shape 0.359 against 0.977,
    # 0.316 through the timestep embedding; on f=2 latents 0.996 / 0.371 against 0.809 / 0.316 (README). tiny keeps
    # "timestep", so that the tests train both.
    c.class_conditioning = "timestep" if preset == "tiny" else "cross_attention"
    c.class_context_dim = {"ldm": 512, "demo": 64, "tiny": 32}[preset]
    if preset == "demo":
        # The txt2img demo's f=2 first stage (runs/demo, from bash launch/local.sh demo) and its UNet, diffusion and
        # constant rate, batch 32. The label's shape is learned late, later than the caption's: validation 256,
        # shape 0.414 / 0.707 / 0.812 / 0.902 at 4500 / 7500 / 9000 / 12000 steps (first-stage reconstructions
        # 0.867), colour >= 0.988 (README, Class-conditional demo). Faster from the demo's latent cache
        # (--config.data.source=latents:runs/demo/latents).
        c.first_stage.workdir = "runs/demo/autoencoder_kl"
        txt2img.f2_demo_recipe(c)
        c.data.global_batch_size = 32
        c.train.update(num_steps=12000, checkpoint_every=1500, preview_every=1500)
    return c

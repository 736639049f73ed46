"""What the first-stage configs (autoencoder_kl.py, autoencoder_vq.py) share: the run's sections, and the
data, optimizer and training length of the sizes their presets come in."""

import ml_collections

from ldm_jax import config_lib
from ldm_jax.data.pipeline import SOURCE_REQUIRED, data_section
from ldm_jax.tasks.autoencoder import disc_section, loss_section
from ldm_jax.training.optim import optim_section
from ldm_jax.training.sharding import MeshConfig
from ldm_jax.training.train_config import train_section


def base(kind: str, preset: str, model: dict, disc_start: int, disc_weight: float):
    """The header, model, loss and discriminator sections of a ``kind`` ("kl" / "vq") first stage."""
    c = config_lib.run_header("autoencoder", preset)
    c.mesh = MeshConfig.defaults()
    c.model = ml_collections.ConfigDict(dict(model))
    c.loss = loss_section(kind)
    c.disc = disc_section(disc_start, disc_weight)
    return c


def schedule(c, size: str) -> None:
    """Data, optimizer and training length of a first-stage run at one of the sizes its presets share:

    "zoo"     the paper's recipe at 256px (Adam 0.5/0.9, lr 4.5e-6 x batch, no clipping or decay), on your images
              (data.source)
    "demo"    32px captioned shapes, the txt2img demo's first stage (CPU minutes)
    "photos"  32px real-photo crops for CPU-budget comparisons (held-out photos for evaluation)
    "tiny"    16px shapes, for tests
    """
    if size == "zoo":
        c.data = data_section("256px", 256, 64)
        c.data.name = "photo_crops"  # the embedded photos stand in only for tests of the schedule
        c.data.source = SOURCE_REQUIRED  # your images: README, Train on your own data
        c.data.crop, c.data.random_flip = "random", True
        c.optim = optim_section(lr=4.5e-6, warmup_steps=0, ema_decay=0.9999)
        # The reference's rule: base_lr x (batch per GPU x GPUs): 4.5e-6 x 64 = 2.88e-4 at this batch.
        c.optim.update(lr_scaling="linear", base_batch_size=1)
        c.train = train_section(num_steps=200_000, log_every=100, checkpoint_every=5000, preview_every=5000)
        c.train.keep_every = 50_000  # a week-long run keeps a checkpoint every 50k steps besides the last 3
    elif size in ("demo", "photos"):
        c.data = data_section("32px", 32, 16)
        if size == "photos":
            c.data.name = "photo_crops"
        c.optim = optim_section(lr=1e-3, warmup_steps=100, ema_decay=0.99, schedule="cosine")
        c.optim.final_lr_fraction = 0.05
        c.train = train_section(num_steps=1500, log_every=100, checkpoint_every=500, preview_every=500)
        # 32px images: two stride-2 layers give a 6x6 map of 34-pixel patches; the GAN joins halfway.
        c.disc.update(n_layers=2, base_channels=32, start=750)
        # No LPIPS offline (no VGG16 ImageNet weights ship here): the term is off, by this explicit 0.
        c.loss.perceptual_weight = 0.0
    elif size == "tiny":
        c.data = data_section("tiny", 16, 8)
        c.model.block_out_channels = (8, 16, 16)
        c.model.norm_groups = 4
        c.optim = optim_section(lr=1e-3, warmup_steps=2, ema_decay=0.9)
        c.train = train_section(num_steps=8, log_every=2, checkpoint_every=4, preview_every=0)
        c.disc.update(n_layers=2, base_channels=8, start=4)
        c.loss.perceptual_weight = 0.0
    else:
        raise ValueError(f"size={size!r}: first-stage sizes are 'zoo', 'demo', 'photos', 'tiny'")
    # Adam with the reference's betas, no weight decay (it would shrink an EMA codebook) and no clipping: the
    # summed reconstruction term makes gradient norms scale with the image size.
    c.optim.update(b1=0.5, b2=0.9, weight_decay=0.0, grad_clip=0.0)

"""Super-resolution by concat conditioning (LDM's SR models, Stable Diffusion's x4 upscaler).

The low-resolution image (``data.image_size / superres.scale`` pixels a side, made from each training image by
antialiased ``superres.downsample`` resizing) is concatenated to the noisy latents; where its side differs from the
latent grid's it is resized to it first. Noise augmentation (``superres.max_noise_level`` > 0): in training the
low-resolution image is noised to a random level of its own DDPM schedule and the level is given to the UNet as a
class label; at sampling the user picks the level (``--noise_level``; higher levels let the model invent more detail
and hide artefacts of the input). The model has no other condition and is not guided.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax import rng_streams
from ldm_jax.data import pipeline
from ldm_jax.diffusion import objectives
from ldm_jax.diffusion.schedules import make_schedule
from ldm_jax.imaging import make_grid, to_uint8
from ldm_jax.tasks.latent_diffusion import LatentDiffusionTask

DOWNSAMPLE_METHODS = ("bicubic", "linear", "lanczos3")


class SuperResTask(LatentDiffusionTask):
    guided = False

    def __init__(self, config):
        sr = config.superres
        self.scale = int(sr.scale)
        self.noise_levels = sr.max_noise_level + 1 if sr.max_noise_level > 0 else 0
        super().__init__(config, context_dim=0, num_classes=self.noise_levels)
        self.low_res_schedule = make_schedule(
            sr.noise_schedule, sr.noise_timesteps, sr.noise_beta_start, sr.noise_beta_end
        )

    def concat_channels_for(self, latent_channels: int) -> int:
        return 3  # the low-resolution RGB image

    @property
    def low_res_size(self) -> int:
        return self.config.data.image_size // self.scale

    def init_params(self, rng: jax.Array):
        h, w, c = self.unet_input_shape
        levels = jnp.zeros((1,), jnp.int32) if self.noise_levels else None
        x, t = jnp.zeros((1, h, w, c)), jnp.zeros((1,), jnp.int32)
        return {"unet": self.unet.init({"params": rng}, x, t, None, class_labels=levels)["params"]}

    # ---- the low-resolution input ------------------------------------------------------------------------
    def degrade(self, images: jax.Array) -> jax.Array:
        """Training images [B, H, W, 3] -> their low-resolution versions [B, H/scale, W/scale, 3]."""
        b, h, w, c = images.shape
        shape = (b, h // self.scale, w // self.scale, c)
        return jax.image.resize(images, shape, self.config.superres.downsample, antialias=True)

    def concat_input(self, low_res: jax.Array, levels: jax.Array | None, noise: jax.Array) -> jax.Array:
        """Noise-augmented low-resolution images at the latent resolution (the 3 concat channels)."""
        x = low_res.astype(jnp.float32)
        if self.noise_levels:
            x = objectives.add_noise(self.low_res_schedule, x, noise, levels)
        h, w, _ = self.latent_shape
        if x.shape[1:3] != (h, w):
            x = jax.image.resize(x, (x.shape[0], h, w, x.shape[3]), "bicubic")
        return x

    def training_inputs(self, params, frozen, batch, drop, rng):
        k_level, k_noise = jax.random.split(rng)
        low_res = self.degrade(batch["image"])
        b = low_res.shape[0]
        levels = jax.random.randint(k_level, (b,), 0, self.noise_levels) if self.noise_levels else None
        noise = jax.random.normal(k_noise, low_res.shape, jnp.float32)
        return levels, self.concat_input(low_res, levels, noise)

    def sampling_concat(self, frozen, images, keys, levels):
        low_res = images["low_res"]
        noise = jax.vmap(
            lambda k: jax.random.normal(
                jax.random.fold_in(k, rng_streams.LOW_RES_NOISE), low_res.shape[1:], jnp.float32
            )
        )(keys)
        return self.concat_input(low_res, levels, noise)

    # ---- conditioning: the noise level ---------------------------------------------------------------------
    def encode_condition(self, params, frozen, levels):
        return levels

    def apply_unet(self, params, x, t, levels, train=False, rngs=None):
        return self.unet.apply({"params": params["unet"]}, x, t, None, train=train, rngs=rngs, class_labels=levels)

    def training_condition(self, params, frozen, batch, drop):
        raise NotImplementedError("superres draws its noise level with the concat input (training_inputs)")

    def check_conditions(self, levels) -> None:
        top = self.config.superres.max_noise_level
        bad = [x for x in levels if not (isinstance(x, (int, np.integer)) and 0 <= x <= top)]
        if bad:
            raise ValueError(f"noise levels {bad}: must be integers in [0, superres.max_noise_level={top}]")

    def check_images(self, init_image, mask, low_res) -> None:
        if init_image is not None or mask is not None:
            raise ValueError("superres models take low_res images, not init_image / mask")
        if low_res is None:
            raise ValueError("superres models need low_res images to upscale")
        want = (self.low_res_size, self.low_res_size, 3)
        if low_res.ndim not in (3, 4) or low_res.shape[-3:] != want:
            raise ValueError(
                f"low_res shape {low_res.shape}: must be {want} or [N, {want[0]}, {want[1]}, 3] (output "
                f"{self.config.data.image_size} px / superres.scale={self.scale})"
            )

    def condition_inputs(self, levels):
        return np.asarray(levels, np.int32) if self.noise_levels else None

    def null_inputs(self, n, negative=None):
        if negative not in (None, ""):
            raise ValueError(f"negative={negative!r}: super-resolution models have no negative prompt")
        return None

    def upscale(self, params, frozen, mesh, low_res, seeds, options, noise_level: int, batch_size: int = 0):
        """uint8 [N, H, W, 3] upscaled from ``low_res`` [N, h, w, 3] in [-1, 1], image i with ``seeds[i]``."""
        levels = [int(noise_level)] * len(low_res)
        return self.generate_images(
            params, frozen, mesh, levels, seeds, options, batch_size=batch_size, low_res=np.asarray(low_res)
        )

    def bicubic(self, low_res: np.ndarray) -> np.ndarray:
        """The baseline: plain bicubic upsampling of ``low_res`` to the output size, uint8."""
        n, h, w, c = low_res.shape
        size = self.config.data.image_size
        return to_uint8(jax.image.resize(jnp.asarray(low_res), (n, size, size, c), "bicubic"))

    def preview(self, params, frozen, mesh) -> tuple[dict, dict]:
        """Rows: bicubic upsampling, the model's output, the original, for ``sample.num_preview`` validation images."""
        s = self.config.sample
        originals = pipeline.first_images(self.config.data, "validation", s.num_preview)
        low_res = np.asarray(self.degrade(jnp.asarray(originals)))
        seeds = [self.config.seed + i for i in range(len(low_res))]
        images = self.upscale(params, frozen, mesh, low_res, seeds, self.sampler_options(), s.noise_level, len(low_res))
        grid = np.concatenate([self.bicubic(low_res), images, to_uint8(originals)])
        return {"samples": make_grid(grid, ncol=len(low_res))}, {}

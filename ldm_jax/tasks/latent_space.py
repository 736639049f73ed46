"""The latent space of a frozen first stage: the autoencoder named by ``first_stage.workdir``, its latent grid at
the run's image size, encoding (a posterior sample, or a VQ model's pre-quantisation latents), masks on the latent
grid, and the latent scale (1 / std of training latents, as LDM's ``scale_by_std``)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from ldm_jax import config_lib, rng_streams, storage
from ldm_jax.data import latent_cache, pipeline
from ldm_jax.models.first_stage import build_autoencoder, latent_channels
from ldm_jax.training import checkpoint

WEIGHTS = ("ema", "params")
# Training images used to estimate the latent scale.
SCALE_EXAMPLES = 256


@dataclasses.dataclass(frozen=True, kw_only=True)
class FirstStageConfig(config_lib.Section):
    """``config.first_stage``: the trained autoencoder whose latent space the diffusion model works in."""

    workdir: str
    weights: str = "ema"

    def validate(self, prefix: str) -> None:
        self.check(bool(self.workdir), prefix, "workdir", "must name a trained autoencoder workdir")
        self.check(self.weights in WEIGHTS, prefix, "weights", "must be 'ema' or 'params'")


class LatentSpace:
    def __init__(self, config):
        self.config = config
        workdir = config.first_stage.workdir
        fs_config = config_lib.load_run_config(workdir, "first_stage.workdir")
        if fs_config.task != "autoencoder":
            raise ValueError(f"first_stage.workdir={workdir!r}: holds a {fs_config.task!r} run, not an autoencoder")
        # A first stage not trained yet (or whose checkpoints moved) is named by its field when the task is built,
        # before train writes to its workdir and before sample or evaluate do any work.
        checkpoint.latest_finished_step(workdir, "first_stage.workdir")
        # Frozen, the first stage is never differentiated: remat would only recompute.
        self.module = build_autoencoder(fs_config.model, config.dtype, remat_policy="none")
        self.is_vq = fs_config.model.kind == "vq"
        self.factor = f = self.module.downsampling_factor
        size = config.data.image_size
        if size % f:
            raise ValueError(f"data.image_size={size}: must be divisible by the first stage's f={f}")
        self.shape = (size // f, size // f, latent_channels(fs_config.model))
        self.fingerprint = None  # (fingerprint, step) of the loaded weights (``check_cache``, ``identity``)

    def setup(self, meta: dict) -> tuple[dict, float]:
        """(the first stage's weights, the latent scale): the checkpoint's scale (``meta``), else (``latent_scale``
        0) that of the ``init_from`` run, else the config's, else estimated on training images."""
        fs = self.config.first_stage
        params, _, step = checkpoint.load_trained_params(fs.workdir, fs.weights)
        logging.info("first stage: %s at step %d", fs.workdir, step)
        self.fingerprint = (latent_cache.fingerprint(params), step)
        source_meta = {}
        if not meta and self.config.init_from:
            # A fine-tuned model keeps the scale its weights were trained at (the start's, not re-estimated).
            source_meta, _ = checkpoint.load_trained_meta(self.config.init_from)
        if "latent_scale" in meta:
            scale = float(meta["latent_scale"])
        elif "latent_scale" in source_meta and self.config.latent_scale == 0:
            scale = float(source_meta["latent_scale"])
        elif self.config.latent_scale > 0:
            scale = float(self.config.latent_scale)
        else:
            scale = self._estimate_scale(params)
        logging.info("latent scale: %.5f", scale)
        return params, scale

    def identity(self) -> dict:
        """What the loaded first stage is, for the checkpoints' metadata: a resume whose ``first_stage.workdir``
        now holds other weights (trained on since, or replaced) would train in another latent space."""
        return dict(
            field="first_stage.workdir",
            path=storage.absolute(self.config.first_stage.workdir),
            step=self.fingerprint[1],
            fingerprint=self.fingerprint[0],
        )

    def check_cache(self, info: dict) -> None:
        """Raises ValueError unless the latent cache ``info`` describes was made by this first stage, at this size
        (training only: a trained run samples without its cache)."""
        fs, spec = self.config.first_stage, self.config.data.source
        if tuple(info["latent_shape"]) != self.shape:
            raise ValueError(
                f"data.source={spec!r}: cached latents are {tuple(info['latent_shape'])}, but "
                f"first_stage.workdir={fs.workdir!r} at data.image_size={self.config.data.image_size} gives {self.shape}"
            )
        made_by = info["first_stage"]
        if self.fingerprint is None or self.fingerprint[0] != made_by["fingerprint"]:
            step = self.fingerprint[1] if self.fingerprint else "?"
            raise ValueError(
                f"data.source={spec!r}: its latents come from the first stage {made_by['workdir']!r} (step "
                f"{made_by['step']}, weights {made_by['weights']}), but first_stage.workdir={fs.workdir!r} (step "
                f"{step}, weights {fs.weights}) holds other weights; train with the first stage that made the cache, "
                "or cache again"
            )

    def _estimate_scale(self, params) -> float:
        if pipeline.is_latent_cache(self.config.data.source):
            # The cached posteriors of the same first images, drawn with the same key as from pixels.
            source = pipeline.data_source(self.config.data, "train")
            batch = [source[i] for i in range(min(SCALE_EXAMPLES, len(source)))]
            batch = {k: np.stack([e[k] for e in batch]) for k in ("latent_mean", "latent_std") if k in batch[0]}
            z = jax.jit(self.latents_from_cache)(batch, jax.random.key(0))
        else:
            images = pipeline.first_images(self.config.data, "train", SCALE_EXAMPLES)
            z = jax.jit(self.encode)(params, images, jax.random.key(0))
        # Each process encodes on its own first device; every process must train with the same constant (and save
        # the same checkpoint metadata), so process 0's value is taken even if another device rounds differently.
        return float(multihost_utils.broadcast_one_to_all(np.float32(1.0 / jnp.std(z))))

    def encode(self, params, images, rng):
        """Unscaled latents for training: a posterior sample (KL) or the continuous pre-quantisation latents (VQ)."""
        out = self.module.apply({"params": params}, images, method="encode")
        return out if self.is_vq else out.sample(rng)

    @staticmethod
    def latents_from_cache(batch: dict, rng):
        """A posterior sample from cached statistics: ``mean + std * eps`` with the draw ``encode`` makes from
        pixels (``DiagonalGaussian.sample``), or the cached VQ latents themselves."""
        mean = batch["latent_mean"]
        if "latent_std" not in batch:
            return mean
        return mean + batch["latent_std"] * jax.random.normal(rng, mean.shape, mean.dtype)

    def training_latents(self, params, batch: dict, rng):
        """Unscaled training latents of a batch: from its cached posterior (a latent-cache run) or by encoding its
        images."""
        if "latent_mean" in batch:
            return self.latents_from_cache(batch, rng)
        return self.encode(params, batch["image"], rng)

    def encode_images(self, params, images, keys, stream: int = rng_streams.INIT_IMAGE_POSTERIOR):
        """Unscaled latents of ``images`` at sampling: a posterior sample per image drawn from its own key (as
        diffusers' pipelines do; ``stream`` separates the draws for different images of one sample), or the
        pre-quantisation latents of a VQ first stage."""
        out = self.module.apply({"params": params}, images, method="encode")
        if self.is_vq:
            return out
        eps = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, stream), out.mean.shape[1:]))(keys)
        return out.mean + jnp.exp(0.5 * out.logvar) * eps

    def decode(self, params, z):
        return self.module.apply({"params": params}, z, method="decode")

    def reconstruct(self, params, images):
        """The first stage's own reconstruction (posterior mean, or VQ latents): what a latent model can reach."""
        z = self.module.apply({"params": params}, images, method="encode")
        return self.decode(params, z if self.is_vq else z.mean)

    def latent_mask(self, masks):
        """Pixel masks [B, H, W, 1] -> the latent grid by nearest neighbour (the top-left pixel of each cell, as
        torch's ``interpolate(mode="nearest")`` in diffusers' inpainting pipelines)."""
        return masks[:, :: self.factor, :: self.factor, :]

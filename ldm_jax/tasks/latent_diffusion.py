"""What every latent diffusion task shares: the frozen first stage, the latent scale, the diffusion loss on its
latents, and guided generation (text-to-image, image-to-image, latent inpainting) with any sampler.

A subclass says what conditions the UNet (``encode_condition``, ``apply_unet``), how a batch's condition is dropped
for classifier-free guidance (``training_condition``), and how host-side conditions become arrays
(``condition_inputs``, ``null_inputs``). The first stage (a trained autoencoder named by ``first_stage.workdir``) is
frozen and passed to the step as ``frozen``.

Concat conditioning (inpainting and super-resolution models): a subclass whose ``concat_channels_for`` is > 0 returns,
from
``training_inputs`` and ``sampling_concat``, a tensor at the latent resolution that is concatenated to the noisy
latents on the channel axis at every UNet call (the UNet's input has latent + ``concat_channels`` channels). Under
guidance both sides see the same concat tensor; only the condition differs.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from ldm_jax import config_lib, rng_streams
from ldm_jax.data import pipeline
from ldm_jax.diffusion import objectives, samplers
from ldm_jax.diffusion.guidance import classifier_free_guidance
from ldm_jax.diffusion.schedules import schedule_from_config
from ldm_jax.imaging import to_uint8
from ldm_jax.models.unet import UNet
from ldm_jax.tasks.autoencoder import build_autoencoder, latent_channels
from ldm_jax.training import checkpoint, transfer
from ldm_jax.training.sharding import batch_sharding, replicated
from ldm_jax.training.steps import LossFn

GENERATION_MODES = ("txt2img", "img2img", "inpaint")
# Training images used to estimate the latent scale (1 / std of latents), as LDM's scale_by_std does.
SCALE_EXAMPLES = 256


def unet_from_config(
    u, *, in_channels: int, out_channels: int, context_dim: int, num_classes: int = 0, dtype=jnp.float32
):
    """The UNet a ``config.unet`` section describes; the widths of its input, output, context and class embedding
    come from the rest of the task (first stage, concat conditioning, text encoder, labels)."""
    return UNet(
        in_channels=in_channels,
        out_channels=out_channels,
        block_out_channels=tuple(u.block_out_channels),
        layers_per_block=u.layers_per_block,
        attention_levels=tuple(u.attention_levels),
        num_heads=tuple(u.num_heads),
        head_dim=u.head_dim,
        transformer_depth=u.transformer_depth,
        context_dim=context_dim,
        norm_groups=u.norm_groups,
        use_linear_projection=u.use_linear_projection,
        dropout=u.dropout,
        num_classes=num_classes,
        remat_policy=u.remat_policy,
        dtype=dtype,
    )


def load_first_stage(config):
    """(autoencoder module, its config) of the run named by ``config.first_stage.workdir``."""
    workdir = config.first_stage.workdir
    fs_config = config_lib.load_config(os.path.join(workdir, "config.json"))
    if fs_config.task != "autoencoder":
        raise ValueError(f"first_stage.workdir={workdir!r}: holds a {fs_config.task!r} run, not an autoencoder")
    # Frozen, the first stage is never differentiated: remat would only recompute. (Older workdirs lack the field.)
    return build_autoencoder(dict(fs_config.model, remat_policy="none"), config.dtype), fs_config


class LatentDiffusionTask:
    uses_tokens = False
    mask_conditioned = False  # inpainting models take the mask as input: no latent blending at sampling
    label_field: str | None = None  # the dataset attribute batches carry as "label"
    guided = True  # classifier-free guidance at sampling (unconditional models have nothing to guide with)

    def __init__(self, config, context_dim: int, num_classes: int = 0):
        self.config = config
        self.dtype = jnp.dtype(config.dtype)
        self.first_stage, fs_config = load_first_stage(config)
        f = self.first_stage.downsampling_factor
        if config.data.image_size % f:
            raise ValueError(f"data.image_size={config.data.image_size}: must be divisible by the first stage's f={f}")
        self.first_stage_is_vq = fs_config.model.get("kind", "kl") == "vq"
        z = latent_channels(fs_config.model)
        # Channels concatenated to the noisy latents at the UNet input (0 without concat conditioning).
        self.concat_channels = self.concat_channels_for(z)
        self.latent_shape = (config.data.image_size // f, config.data.image_size // f, z)
        levels = len(config.unet.block_out_channels)
        if self.latent_shape[0] % 2 ** (levels - 1):
            raise ValueError(
                f"unet.block_out_channels={tuple(config.unet.block_out_channels)}: {levels} levels need latents divisible "
                f"by {2 ** (levels - 1)}, got {self.latent_shape[0]}x{self.latent_shape[1]}"
            )
        self.unet = unet_from_config(
            config.unet,
            in_channels=self.latent_shape[-1] + self.concat_channels,
            out_channels=self.latent_shape[-1],
            context_dim=context_dim,
            num_classes=num_classes,
            dtype=self.dtype,
        )
        self.schedule = schedule_from_config(config.diffusion)
        self._generate_cache = {}

    # ---- conditioning: subclasses ------------------------------------------------------------------------
    def encode_condition(self, params, frozen, inputs) -> Any:
        """Arrays from ``condition_inputs`` -> what ``apply_unet`` takes (e.g. token ids -> text embeddings)."""
        raise NotImplementedError

    def apply_unet(self, params, x, t, cond, train: bool = False, rngs=None) -> jax.Array:
        raise NotImplementedError

    def training_condition(self, params, frozen, batch, drop: jax.Array) -> Any:
        """The batch's condition with examples where ``drop`` [B] is True replaced by the null condition."""
        raise NotImplementedError

    def condition_inputs(self, conditions: list) -> Any:
        """Host-side conditions (prompts, class ids) -> arrays with a leading batch axis (None if unconditional)."""
        raise NotImplementedError

    def concat_channels_for(self, latent_channels: int) -> int:
        """Width of the concat-conditioning input for a first stage with ``latent_channels`` (0: none)."""
        return 0

    def training_inputs(self, params, frozen, batch, drop: jax.Array, rng: jax.Array) -> tuple[Any, Any]:
        """(condition, concat tensor [B, h, w, concat_channels] or None) of a training batch; ``drop`` as above."""
        return self.training_condition(params, frozen, batch, drop), None

    def sampling_concat(self, frozen, images: dict, keys: jax.Array, cond: Any) -> jax.Array | None:
        """The concat tensor at sampling, from the per-image arrays ``images`` (see ``generate_fn``), image i's
        randomness from ``keys[i]``; ``cond`` is the encoded condition. None for models without concat input."""
        return None

    @property
    def unet_input_shape(self) -> tuple[int, int, int]:
        h, w, c = self.latent_shape
        return h, w, c + self.concat_channels

    def latent_mask(self, masks: jax.Array) -> jax.Array:
        """Pixel masks [B, H, W, 1] -> the latent grid by nearest neighbour (the top-left pixel of each cell, as
        torch's ``interpolate(mode="nearest")`` in diffusers' inpainting pipelines)."""
        f = self.first_stage.downsampling_factor
        return masks[:, ::f, ::f, :]

    def check_conditions(self, conditions: list) -> None:
        """Raises ValueError naming conditions the model cannot take (before any device work)."""

    def null_inputs(self, n: int, negative: Any = None) -> Any:
        """The unconditional side of guidance for ``n`` images (``negative``: a negative prompt, where supported)."""
        raise NotImplementedError

    # ---- parameters ----------------------------------------------------------------------------------------
    def setup(self, meta: dict) -> tuple[dict, dict]:
        """Loads the frozen first stage and fixes the latent scale; returns (frozen, meta)."""
        fs_params, _, fs_step = checkpoint.load_trained_params(
            self.config.first_stage.workdir, self.config.first_stage.weights
        )
        logging.info("first stage: %s at step %d", self.config.first_stage.workdir, fs_step)
        frozen = {"first_stage": fs_params}
        self.setup_frozen_condition(frozen)
        if "latent_scale" in meta:
            scale = float(meta["latent_scale"])
        elif self.config.latent_scale > 0:
            scale = float(self.config.latent_scale)
        else:
            scale = self._estimate_latent_scale(fs_params)
        logging.info("latent scale: %.5f", scale)
        frozen["latent_scale"] = jnp.asarray(scale, jnp.float32)
        return frozen, {"latent_scale": scale}

    def setup_frozen_condition(self, frozen: dict) -> None:
        """Adds frozen conditioning weights (a frozen text encoder) to ``frozen``."""

    def _estimate_latent_scale(self, fs_params) -> float:
        images = pipeline.first_images(self.config.data, "train", SCALE_EXAMPLES)
        z = jax.jit(self._encode)(fs_params, images, jax.random.key(0))
        # Each process encodes on its own first device; every process must train with the same constant (and save
        # the same checkpoint metadata), so process 0's value is taken even if another device rounds differently.
        return float(multihost_utils.broadcast_one_to_all(np.float32(1.0 / jnp.std(z))))

    def _encode(self, fs_params, images, rng):
        """Unscaled first-stage latents: a posterior sample (KL) or the continuous pre-quantisation latents (VQ)."""
        out = self.first_stage.apply({"params": fs_params}, images, method="encode")
        return out if self.first_stage_is_vq else out.sample(rng)

    def encode_images(self, fs_params, images, keys, stream: int = rng_streams.INIT_IMAGE_POSTERIOR):
        """Unscaled latents of ``images`` for image-to-image: a posterior sample per image drawn from its own key
        (as diffusers' pipelines do; ``stream`` separates the draws for different images of one sample), or the
        pre-quantisation latents of a VQ first stage."""
        out = self.first_stage.apply({"params": fs_params}, images, method="encode")
        if self.first_stage_is_vq:
            return out
        eps = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, stream), out.mean.shape[1:]))(keys)
        return out.mean + jnp.exp(0.5 * out.logvar) * eps

    # ---- training ------------------------------------------------------------------------------------------
    @property
    def loss_fn(self) -> LossFn:
        cfg = self.config.diffusion
        schedule = self.schedule

        def loss_fn(params, frozen, batch, rng):
            k_post, k_t, k_noise, k_drop, k_dropout = jax.random.split(rng, 5)
            images = batch["image"]
            b = images.shape[0]
            z0 = jax.lax.stop_gradient(self._encode(frozen["first_stage"], images, k_post) * frozen["latent_scale"])
            # Condition dropout: the null condition stands in for "no condition" (classifier-free guidance).
            drop = jax.random.bernoulli(k_drop, cfg.cond_drop_prob, (b,))
            # A key of its own (not a sixth split) keeps the other streams, and so older runs, unchanged.
            concat_rng = jax.random.fold_in(rng, rng_streams.TRAINING_CONCAT_INPUTS)
            cond, concat = self.training_inputs(params, frozen, batch, drop, concat_rng)
            t = jax.random.randint(k_t, (b,), 0, schedule.num_train_timesteps)
            noise = objectives.sample_noise(k_noise, z0.shape, cfg.offset_noise, z0.dtype)
            x_t = objectives.add_noise(schedule, z0, noise, t)
            out = self.apply_unet(params, with_concat(x_t, concat), t, cond, train=True, rngs={"dropout": k_dropout})
            target = objectives.training_target(cfg.prediction_type, schedule, z0, noise, t)
            weights = objectives.loss_weights(cfg.loss_weighting, cfg.prediction_type, schedule, t, cfg.min_snr_gamma)
            loss = objectives.diffusion_loss(out, target, weights)
            return loss, {"cond_dropped": jnp.mean(drop.astype(jnp.float32))}

        return loss_fn

    # ---- generation ----------------------------------------------------------------------------------------
    def sampler_options(self, **overrides) -> samplers.SamplerOptions:
        """The run's ``config.sample`` sampler settings, with ``overrides`` (e.g. from sampling flags)."""
        return samplers.SamplerOptions.for_run(self.config, **overrides)

    @staticmethod
    def first_step(options: samplers.SamplerOptions, strength: float) -> int:
        """diffusers' image-to-image rule: run the last ``int(num_steps * strength)`` steps of the schedule."""
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength={strength}: must be in (0, 1]")
        run = min(int(options.num_steps * strength), options.num_steps)
        if run < 1:
            raise ValueError(
                f"strength={strength}: with num_steps={options.num_steps} no step would run; "
                f"need strength >= {1 / options.num_steps:.3g}"
            )
        return options.num_steps - run

    def model_fn(self, params, cond, uncond, concat, guidance_scale, guidance_rescale=0.0) -> samplers.ModelFn:
        """The sampler's ``fn(x, t)``: the UNet on [x, concat] under ``cond``, guided against ``uncond`` (the same
        concat on both sides) when the task is guided."""

        def apply(x, t, cond_and_concat):
            c, cc = cond_and_concat
            return self.apply_unet(params, with_concat(x, cc), t, c)

        if not self.guided:
            return lambda x, t: apply(x, t, (cond, concat))
        return classifier_free_guidance(apply, (cond, concat), (uncond, concat), guidance_scale, guidance_rescale)

    def generate_fn(self, options: samplers.SamplerOptions, mode: str = "txt2img", first_step: int = 0):
        """Pure ``fn(params, frozen, cond_inputs, null_inputs, seeds [B] uint32, guidance_scale, guidance_rescale,
        images) -> images [B, H, W, 3] in [-1, 1]``.

        ``images`` holds per-image arrays (leading axis B): "init" [B, H, W, 3] in [-1, 1] and "mask" [B, H, W, 1]
        (1 = repaint) for image-to-image and inpainting, "low_res" for super-resolution; {} otherwise.
        ``mode``: "txt2img" (from noise); "img2img" (the encoded init images noised to step ``first_step``'s level,
        then the remaining steps); "inpaint": a model that takes the mask as input (``mask_conditioned``) gets it
        by concatenation; any other model has the kept region (mask 0) replaced after every step by the init latents
        noised to the next step's level. Both start from pure noise when ``first_step`` = 0.

        Image i's starting noise, posterior samples and (stochastic samplers) per-step noise come from
        ``jax.random.key(seeds[i])`` alone, so an image depends only on its own seed and inputs, not on the batch it
        was generated in. Seeds enter rather than keys because plain integers can be placed on a mesh that spans
        processes. Conditions, seeds, images and guidance are traced arguments: changing them never recompiles.
        """
        if mode not in GENERATION_MODES:
            raise ValueError(f"mode={mode!r}: must be one of {GENERATION_MODES}")
        first_stage = self.first_stage
        sampler = samplers.make_sampler(
            options, self.schedule, first_step, beta_schedule=self.config.diffusion.beta_schedule
        )
        latent_shape, encode, guided = self.latent_shape, self.encode_images, self.guided
        blend = mode == "inpaint" and not self.mask_conditioned
        # Start from the init latents noised to the first step's level: image-to-image at any strength (at 1 too, as
        # diffusers), inpainting below strength 1.
        from_image = mode == "img2img" or first_step > 0

        def generate(params, frozen, cond_in, null_in, seeds, guidance_scale, guidance_rescale, images):
            keys = jax.vmap(jax.random.key)(seeds)
            cond = self.encode_condition(params, frozen, cond_in)
            concat = self.sampling_concat(frozen, images, keys, cond)
            uncond = self.encode_condition(params, frozen, null_in) if guided else None
            model_fn = self.model_fn(params, cond, uncond, concat, guidance_scale, guidance_rescale)
            x_T = jax.vmap(
                lambda k: jax.random.normal(jax.random.fold_in(k, rng_streams.START_NOISE), latent_shape, jnp.float32)
            )(keys)
            step_keys = jax.vmap(lambda k: jax.random.fold_in(k, rng_streams.SAMPLER_STEP_NOISE))(keys)
            kw = dict(rng=step_keys if sampler.stochastic else None)
            if from_image or blend:
                z_init = encode(frozen["first_stage"], images["init"], keys) * frozen["latent_scale"]
                if from_image:
                    kw["x0"] = z_init
                if blend:
                    m = self.latent_mask(images["mask"])
                    kw["blend"] = lambda x, i: m * x + (1.0 - m) * sampler.noised(z_init, x_T, i + 1)
            z0 = samplers.sample(sampler, model_fn, x_T, **kw)
            images = first_stage.apply({"params": frozen["first_stage"]}, z0 / frozen["latent_scale"], method="decode")
            return jnp.clip(images, -1.0, 1.0)

        return generate

    def compiled_generate(self, mesh, options: samplers.SamplerOptions, mode: str = "txt2img", first_step: int = 0):
        """``generate_fn`` jitted over ``mesh`` (batch split over every device); one program per sampler setting.
        Its inputs must already be on ``mesh`` (``transfer.to_mesh``; ``generate_images`` does this) and keep their
        shardings: per-image inputs split over the batch axes, weights as they are (replicated, or FSDP-sharded
        like the training state's EMA weights during previews)."""
        key = (id(mesh), options, mode, first_step)
        if key not in self._generate_cache:
            self._generate_cache[key] = jax.jit(
                self.generate_fn(options, mode, first_step), out_shardings=batch_sharding(mesh)
            )
        return self._generate_cache[key]

    def check_images(self, init_image, mask, low_res) -> None:
        """Raises ValueError naming an input image this task cannot take (before any device work). Each is one
        image shared by every output ([H, W, C]) or one per output ([N, H, W, C]), or None."""
        if mask is not None and init_image is None:
            raise ValueError("mask given without init_image: inpainting needs the image whose region to keep")
        size = self.config.data.image_size
        if init_image is not None and (init_image.ndim not in (3, 4) or init_image.shape[-3:] != (size, size, 3)):
            raise ValueError(f"init_image shape {init_image.shape}: must be {(size, size, 3)} (or [N, ...] of them)")
        if mask is not None:
            if mask.ndim not in (3, 4) or mask.shape[-3:] != (size, size, 1):
                raise ValueError(f"mask shape {mask.shape}: must be {(size, size, 1)} (the image's pixels)")
            cells = np.asarray(self.latent_mask(np.asarray(mask).reshape((-1, size, size, 1))))
            if not cells.reshape(cells.shape[0], -1).any(axis=1).all():
                raise ValueError(
                    f"mask: no latent cell is repainted at {self.latent_shape[0]}x{self.latent_shape[1]} "
                    f"(cells take the top-left pixel of each {self.first_stage.downsampling_factor}-pixel block)"
                )
        if self.mask_conditioned and mask is None:
            raise ValueError(f"{self.config.task} models need init_image and mask (the image and the region to paint)")
        if low_res is not None:
            raise ValueError(f"low_res images given, but a {self.config.task} model does not take them")

    def generate_images(
        self,
        params,
        frozen,
        mesh,
        conditions: list,
        seeds: list[int],
        options: samplers.SamplerOptions,
        guidance_scale: float = 1.0,
        guidance_rescale: float = 0.0,
        negative: Any = None,
        batch_size: int = 0,
        init_image: np.ndarray | None = None,
        mask: np.ndarray | None = None,
        strength: float = 1.0,
        low_res: np.ndarray | None = None,
    ) -> np.ndarray:
        """uint8 images [N, H, W, 3] for ``conditions[i]`` (a prompt, a class id, a noise level, None) with
        ``seeds[i]``, in batches spread over every device.

        ``negative`` replaces the null condition on the unconditional side of guidance (a negative prompt). With
        ``init_image`` (in [-1, 1]) this is image-to-image at ``strength``; with ``mask`` too (1 = repaint) it is
        inpainting. ``low_res`` (in [-1, 1]): the images a super-resolution model upscales. Each is one image for all
        outputs ([H, W, C]) or one per output ([N, H, W, C]). ``batch_size`` (0 = one per device) is rounded up to a
        multiple of the device count; the last batch is padded with repeats whose outputs are dropped, so every call
        compiles one program.
        """
        if len(conditions) != len(seeds):
            raise ValueError(f"{len(conditions)} conditions but {len(seeds)} seeds: need one seed per image")
        self.check_conditions(conditions)
        self.check_images(init_image, mask, low_res)
        given = {"init": init_image, "mask": mask, "low_res": low_res}
        per_image = {}
        for name, x in given.items():
            if x is None:
                continue
            x = np.asarray(x, np.float32)
            if x.ndim == 3:
                x = np.broadcast_to(x, (len(conditions), *x.shape))
            if len(x) != len(conditions):
                raise ValueError(f"{len(x)} {name} images for {len(conditions)} conditions: need one per image")
            per_image[name] = x
        mode = "txt2img" if init_image is None else ("img2img" if mask is None else "inpaint")
        first_step = 0 if mode == "txt2img" else self.first_step(options, strength)
        per_call = max(batch_size, 1)
        per_call = -(-per_call // mesh.size) * mesh.size
        fn = self.compiled_generate(mesh, options, mode, first_step)
        # Every process holds every input (the same conditions, seeds and images): each places its own shards of
        # them, and every process gets every image back, so this works on a mesh over several processes.
        repl, rows = replicated(mesh), batch_sharding(mesh)
        null = transfer.to_mesh(self.null_inputs(per_call, negative), rows)
        scales = transfer.to_mesh((np.float32(guidance_scale), np.float32(guidance_rescale)), repl)
        out = []
        for start in range(0, len(conditions), per_call):
            n = min(per_call, len(conditions) - start)
            # The last chunk is padded by repeating its last entry.
            idx = [start + min(i, n - 1) for i in range(per_call)]
            cond, seed_rows, image_rows = transfer.to_mesh(
                (
                    self.condition_inputs([conditions[i] for i in idx]),
                    np.asarray([seeds[i] for i in idx], np.uint32),
                    {name: x[idx] for name, x in per_image.items()},
                ),
                rows,
            )
            images = fn(params, frozen, cond, null, seed_rows, *scales, image_rows)
            out.append(to_uint8(transfer.to_host(images))[:n])
        return np.concatenate(out, axis=0)


def with_concat(x: jax.Array, concat: jax.Array | None) -> jax.Array:
    """The UNet input: noisy latents, then the concat-conditioning channels (diffusers' order)."""
    return x if concat is None else jnp.concatenate([x, concat.astype(x.dtype)], axis=-1)

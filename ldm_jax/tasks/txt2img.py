"""Text-to-image latent diffusion task: loss on first-stage latents, and guided generation.

The first stage (a trained KL autoencoder, named by ``first_stage.workdir``) is frozen and passed to the step as
``frozen``; so is the text encoder unless ``text_encoder.trainable``.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from ldm_jax import config_lib
from ldm_jax.data import pipeline
from ldm_jax.data.tokenizer import CLIPTokenizer
from ldm_jax.diffusion import objectives, samplers
from ldm_jax.diffusion.guidance import classifier_free_guidance
from ldm_jax.diffusion.schedules import schedule_from_config
from ldm_jax.imaging import make_grid, to_uint8
from ldm_jax.models.text_encoders import CLIPTextTransformer
from ldm_jax.models.unet import UNet
from ldm_jax.tasks.autoencoder import build_autoencoder
from ldm_jax.training import checkpoint
from ldm_jax.training.sharding import batch_sharding, make_mesh, replicated
from ldm_jax.training.steps import LossFn

GENERATION_MODES = ("txt2img", "img2img", "inpaint")
# Training images used to estimate the latent scale (1 / std of latents), as LDM's scale_by_std does.
SCALE_EXAMPLES = 256


def load_first_stage(config):
    """(autoencoder module, its config) of the run named by ``config.first_stage.workdir``."""
    workdir = config.first_stage.workdir
    fs_config = config_lib.load_config(os.path.join(workdir, "config.json"))
    if fs_config.task != "autoencoder":
        raise ValueError(f"first_stage.workdir={workdir!r}: holds a {fs_config.task!r} run, not an autoencoder")
    return build_autoencoder(fs_config.model, config.dtype), fs_config


class Txt2ImgTask:
    uses_tokens = True

    def __init__(self, config):
        self.config = config
        dtype = jnp.dtype(config.dtype)
        self.first_stage, fs_config = load_first_stage(config)
        f = self.first_stage.downsampling_factor
        if config.data.image_size % f:
            raise ValueError(f"data.image_size={config.data.image_size}: must be divisible by the first stage's f={f}")
        self.first_stage_is_vq = fs_config.model.get("kind", "kl") == "vq"
        z = fs_config.model.embed_dim if self.first_stage_is_vq else fs_config.model.latent_channels
        self.latent_shape = (config.data.image_size // f, config.data.image_size // f, z)
        levels = len(config.unet.block_out_channels)
        if self.latent_shape[0] % 2 ** (levels - 1):
            raise ValueError(
                f"unet.block_out_channels={tuple(config.unet.block_out_channels)}: {levels} levels need latents divisible "
                f"by {2 ** (levels - 1)}, got {self.latent_shape[0]}x{self.latent_shape[1]}"
            )
        te = config.text_encoder
        self.tokenizer = CLIPTokenizer(te.max_length, te.pad_token)
        self.text_encoder = CLIPTextTransformer(
            vocab_size=te.vocab_size,
            max_length=te.max_length,
            width=te.width,
            layers=te.layers,
            heads=te.heads,
            activation=te.activation,
            output_layer=te.output_layer,
            dtype=dtype,
        )
        u = config.unet
        self.unet = UNet(
            in_channels=self.latent_shape[-1],
            out_channels=self.latent_shape[-1],
            block_out_channels=tuple(u.block_out_channels),
            layers_per_block=u.layers_per_block,
            attention_levels=tuple(u.attention_levels),
            num_heads=tuple(u.num_heads),
            head_dim=u.head_dim,
            transformer_depth=u.transformer_depth,
            context_dim=te.width,
            norm_groups=u.norm_groups,
            use_linear_projection=u.use_linear_projection,
            dropout=u.dropout,
            dtype=dtype,
        )
        self.schedule = schedule_from_config(config.diffusion)
        self.null_tokens = jnp.asarray(self.tokenizer([""])[0])
        self._generate_cache = {}

    # ---- parameters -------------------------------------------------------------------------------------
    def init_params(self, rng: jax.Array):
        k_unet, k_text = jax.random.split(rng)
        h, w, c = self.latent_shape
        tokens = jnp.zeros((1, self.config.text_encoder.max_length), jnp.int32)
        params = {}
        text_params = self.text_encoder.init({"params": k_text}, tokens)["params"]
        context = self.text_encoder.apply({"params": text_params}, tokens)
        params["unet"] = self.unet.init(
            {"params": k_unet}, jnp.zeros((1, h, w, c)), jnp.zeros((1,), jnp.int32), context
        )["params"]
        if self.config.text_encoder.trainable:
            params["text"] = text_params
        return params

    def setup(self, meta: dict) -> tuple[dict, dict]:
        """Loads the frozen first stage (and text encoder) and fixes the latent scale; returns (frozen, meta)."""
        fs_params, _, fs_step = checkpoint.load_trained_params(
            self.config.first_stage.workdir, self.config.first_stage.weights
        )
        logging.info("first stage: %s at step %d", self.config.first_stage.workdir, fs_step)
        frozen = {"first_stage": fs_params}
        if not self.config.text_encoder.trainable:
            if not self.config.init_from:
                raise ValueError(
                    "text_encoder.trainable=False: a frozen text encoder needs trained weights; set init_from to a "
                    "txt2img workdir whose text encoder to freeze"
                )
            src, _, _ = checkpoint.load_trained_params(self.config.init_from, "ema")
            frozen["text"] = src["text"]
        if "latent_scale" in meta:
            scale = float(meta["latent_scale"])
        elif self.config.latent_scale > 0:
            scale = float(self.config.latent_scale)
        else:
            scale = self._estimate_latent_scale(fs_params)
        logging.info("latent scale: %.5f", scale)
        frozen["latent_scale"] = jnp.asarray(scale, jnp.float32)
        return frozen, {"latent_scale": scale}

    def _estimate_latent_scale(self, fs_params) -> float:
        images = pipeline.first_images(self.config.data, "train", SCALE_EXAMPLES)
        z = jax.jit(self._encode)(fs_params, images, jax.random.key(0))
        return float(1.0 / jnp.std(z))

    def _encode(self, fs_params, images, rng):
        """Unscaled first-stage latents: a posterior sample (KL) or the continuous pre-quantisation latents (VQ)."""
        out = self.first_stage.apply({"params": fs_params}, images, method="encode")
        return out if self.first_stage_is_vq else out.sample(rng)

    def _text_params(self, params, frozen):
        return params["text"] if self.config.text_encoder.trainable else frozen["text"]

    # ---- training ------------------------------------------------------------------------------------------
    @property
    def loss_fn(self) -> LossFn:
        cfg = self.config.diffusion
        text_encoder, unet, schedule = self.text_encoder, self.unet, self.schedule
        null_tokens = self.null_tokens

        def loss_fn(params, frozen, batch, rng):
            k_post, k_t, k_noise, k_drop, k_dropout = jax.random.split(rng, 5)
            images, tokens = batch["image"], batch["tokens"]
            b = images.shape[0]
            z0 = jax.lax.stop_gradient(self._encode(frozen["first_stage"], images, k_post) * frozen["latent_scale"])
            # Condition dropout: the empty caption stands in for "no condition" (classifier-free guidance).
            drop = jax.random.bernoulli(k_drop, cfg.cond_drop_prob, (b,))
            tokens = jnp.where(drop[:, None], null_tokens[None, :], tokens)
            context = text_encoder.apply({"params": self._text_params(params, frozen)}, tokens)
            t = jax.random.randint(k_t, (b,), 0, schedule.num_train_timesteps)
            noise = objectives.sample_noise(k_noise, z0.shape, cfg.offset_noise, z0.dtype)
            x_t = objectives.add_noise(schedule, z0, noise, t)
            out = unet.apply({"params": params["unet"]}, x_t, t, context, train=True, rngs={"dropout": k_dropout})
            target = objectives.training_target(cfg.prediction_type, schedule, z0, noise, t)
            weights = objectives.loss_weights(cfg.loss_weighting, cfg.prediction_type, schedule, t, cfg.min_snr_gamma)
            loss = objectives.diffusion_loss(out, target, weights)
            return loss, {"cond_dropped": jnp.mean(drop.astype(jnp.float32))}

        return loss_fn

    # ---- generation ----------------------------------------------------------------------------------------
    def sampler_options(self, **overrides) -> samplers.SamplerOptions:
        """The run's ``config.sample`` sampler settings, with ``overrides`` (e.g. from sampling flags)."""
        opts = samplers.SamplerOptions.from_config(self.config.sample, self.config.diffusion.prediction_type)
        opts = opts.replace(**overrides)
        opts.validate(self.schedule.num_train_timesteps, "sample")
        return opts

    def encode_images(self, fs_params, images, keys):
        """Unscaled latents of ``images`` for image-to-image: a posterior sample per image drawn from its own key
        (as diffusers' pipelines do), or the pre-quantisation latents of a VQ first stage."""
        out = self.first_stage.apply({"params": fs_params}, images, method="encode")
        if self.first_stage_is_vq:
            return out
        eps = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 2), out.mean.shape[1:]))(keys)
        return out.mean + jnp.exp(0.5 * out.logvar) * eps

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

    def generate_fn(self, options: samplers.SamplerOptions, mode: str = "txt2img", first_step: int = 0):
        """Pure ``fn(params, frozen, tokens [B, T], negative_tokens [B, T], keys [B], guidance_scale, guidance_rescale,
        init_images [B, H, W, 3] | None, masks [B, h, w, 1] | None) -> images [B, H, W, 3] in [-1, 1]``.

        ``mode``: "txt2img" (from noise); "img2img" (the encoded ``init_images`` noised to step ``first_step``'s level,
        then the remaining steps); "inpaint" (any model: after every step the kept region, ``masks`` = 0, is replaced
        by the init latents noised to the next step's level; from pure noise when ``first_step`` = 0).

        Image i's starting noise, posterior sample and (stochastic samplers) per-step noise come from ``keys[i]``
        alone, so an image depends only on its own key and inputs, not on the batch it was generated in. Prompts,
        seeds, images and guidance are traced arguments: changing them never recompiles.
        """
        if mode not in GENERATION_MODES:
            raise ValueError(f"mode={mode!r}: must be one of {GENERATION_MODES}")
        first_stage, text_encoder, unet = self.first_stage, self.text_encoder, self.unet
        sampler = samplers.make_sampler(
            options, self.schedule, first_step, beta_schedule=self.config.diffusion.beta_schedule
        )
        latent_shape, encode = self.latent_shape, self.encode_images

        def generate(params, frozen, tokens, negative_tokens, keys, guidance_scale, guidance_rescale, init, masks):
            text_params = self._text_params(params, frozen)
            cond = text_encoder.apply({"params": text_params}, tokens)
            uncond = text_encoder.apply({"params": text_params}, negative_tokens)
            apply = lambda x, t, ctx: unet.apply({"params": params["unet"]}, x, t, ctx)  # noqa: E731
            model_fn = classifier_free_guidance(apply, cond, uncond, guidance_scale, guidance_rescale)
            x_T = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), latent_shape, jnp.float32))(keys)
            step_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
            kw = dict(rng=step_keys if sampler.stochastic else None)
            if mode != "txt2img":
                z_init = encode(frozen["first_stage"], init, keys) * frozen["latent_scale"]
                if mode == "img2img" or first_step > 0:
                    kw["x0"] = z_init
                if mode == "inpaint":
                    kw["blend"] = lambda x, i: masks * x + (1.0 - masks) * sampler.noised(z_init, x_T, i + 1)
            z0 = samplers.sample(sampler, model_fn, x_T, **kw)
            images = first_stage.apply({"params": frozen["first_stage"]}, z0 / frozen["latent_scale"], method="decode")
            return jnp.clip(images, -1.0, 1.0)

        return generate

    def compiled_generate(self, mesh, options: samplers.SamplerOptions, mode: str = "txt2img", first_step: int = 0):
        """``generate_fn`` jitted over ``mesh`` (batch split over every device); one program per sampler setting."""
        key = (id(mesh), options, mode, first_step)
        if key not in self._generate_cache:
            repl, batch = replicated(mesh), batch_sharding(mesh)
            self._generate_cache[key] = jax.jit(
                self.generate_fn(options, mode, first_step),
                in_shardings=(repl, repl, batch, batch, batch, repl, repl, batch, batch),
                out_shardings=batch,
            )
        return self._generate_cache[key]

    def generate_images(
        self,
        params,
        frozen,
        mesh,
        prompts: list[str],
        seeds: list[int],
        options: samplers.SamplerOptions,
        guidance_scale: float,
        guidance_rescale: float = 0.0,
        negative_prompt: str = "",
        batch_size: int = 0,
        init_image: np.ndarray | None = None,
        mask: np.ndarray | None = None,
        strength: float = 1.0,
    ) -> np.ndarray:
        """uint8 images [N, H, W, 3] for ``prompts[i]`` with ``seeds[i]``, in batches spread over every device.

        ``negative_prompt`` replaces the empty prompt on the unconditional side of guidance. With ``init_image``
        ([H, W, 3] in [-1, 1]) this is image-to-image at ``strength``; with ``mask`` too ([h, w, 1] at the latent
        resolution, 1 = repaint) it is inpainting. ``batch_size`` (0 = one per device) is rounded up to a multiple
        of the device count; the last batch is padded with repeats whose outputs are dropped, so every call
        compiles one program.
        """
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds: need one seed per prompt")
        mode = "txt2img" if init_image is None else ("img2img" if mask is None else "inpaint")
        if mask is not None and init_image is None:
            raise ValueError("mask given without init_image: inpainting needs the image whose region to keep")
        size = self.config.data.image_size
        if init_image is not None and init_image.shape != (size, size, 3):
            raise ValueError(f"init_image shape {init_image.shape}: must be {(size, size, 3)}")
        if mask is not None and mask.shape != self.latent_shape[:2] + (1,):
            raise ValueError(f"mask shape {mask.shape}: must be {self.latent_shape[:2] + (1,)} (latent resolution)")
        first_step = 0 if mode == "txt2img" else self.first_step(options, strength)
        per_call = max(batch_size, 1)
        per_call = -(-per_call // mesh.size) * mesh.size
        fn = self.compiled_generate(mesh, options, mode, first_step)
        negative = self.tokenizer([negative_prompt] * per_call)
        init = None if init_image is None else jnp.broadcast_to(jnp.asarray(init_image), (per_call, *init_image.shape))
        masks = None if mask is None else jnp.broadcast_to(jnp.asarray(mask), (per_call, *mask.shape))
        out = []
        for start in range(0, len(prompts), per_call):
            chunk_p = list(prompts[start : start + per_call])
            chunk_s = list(seeds[start : start + per_call])
            n = len(chunk_p)
            chunk_p += [chunk_p[-1]] * (per_call - n)
            chunk_s += [chunk_s[-1]] * (per_call - n)
            keys = jax.vmap(jax.random.key)(jnp.asarray(chunk_s, jnp.uint32))
            images = fn(
                params,
                frozen,
                self.tokenizer(chunk_p),
                negative,
                keys,
                jnp.float32(guidance_scale),
                jnp.float32(guidance_rescale),
                init,
                masks,
            )
            out.append(to_uint8(jax.device_get(images))[:n])
        return np.concatenate(out, axis=0)

    def preview(self, params, frozen, mesh) -> tuple[dict, dict]:
        """A grid of samples for ``sample.prompts`` with fixed seeds."""
        s = self.config.sample
        prompts = list(s.prompts)
        seeds = [self.config.seed + i for i in range(len(prompts))]
        images = self.generate_images(
            params,
            frozen,
            mesh,
            prompts,
            seeds,
            self.sampler_options(),
            s.guidance_scale,
            s.guidance_rescale,
            s.negative_prompt,
            len(prompts),
        )
        return {"samples": make_grid(images, ncol=len(prompts))}, {}


def load_for_sampling(workdir: str, weights: str = "ema", image_size: int = 0):
    """(task, params, frozen, mesh, step) of a txt2img workdir, ready for ``task.generate_images``.

    ``image_size`` > 0 samples at another resolution than the run's ``data.image_size`` (the UNet is convolutional).
    """
    config = config_lib.load_config(os.path.join(workdir, "config.json"))
    if image_size:
        config.data.image_size = int(image_size)
    if config.task != "txt2img":
        raise ValueError(f"workdir {workdir!r}: holds a {config.task!r} run; sampling needs a txt2img run")
    mesh = make_mesh(-1, 1)
    task = Txt2ImgTask(config)
    params, meta, step = checkpoint.load_trained_params(workdir, weights)
    frozen, _ = task.setup(meta)
    params, frozen = jax.device_put((params, frozen), replicated(mesh))
    logging.info("loaded %s weights of %s at step %d; %d devices", weights, workdir, step, mesh.size)
    return task, params, frozen, mesh, step

"""Latent diffusion tasks: a UNet trained on a frozen first stage's latents, composed of a conditioner and a concat
input (``ldm_jax.tasks.TASKS`` names the pair of each ``config.task``).

``LatentDiffusionTask`` is the one class of every latent diffusion task: the diffusion loss and training step, guided
generation (text-to-image, image-to-image, latent inpainting) with any sampler, previews, sampling requests and
evaluation. What differs between tasks is asked of its two parts (``tasks/conditioners.py``,
``tasks/concat_inputs.py``), never by name.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from ldm_jax import config_lib, rng_streams
from ldm_jax.data import pipeline
from ldm_jax.diffusion import objectives, samplers
from ldm_jax.diffusion.guidance import classifier_free_guidance, validate_guidance
from ldm_jax.diffusion.schedules import schedule_from_config
from ldm_jax.evaluation import sample_metrics
from ldm_jax.evaluation.in_training import EvalConfig, PeriodicEval
from ldm_jax.imaging import to_uint8
from ldm_jax.models import lora
from ldm_jax.models.unet import UNetConfig
from ldm_jax.tasks import adapters as adapters_lib
from ldm_jax.tasks import dreambooth
from ldm_jax.tasks.latent_space import FirstStageConfig, LatentSpace
from ldm_jax.tasks.protocol import EvalInputs, SampleInputs, SampleRequest, frozen_input_changes
from ldm_jax.training import checkpoint, transfer
from ldm_jax.training.optim import make_optimizer
from ldm_jax.training.sharding import batch_sharding, make_mesh, replicated
from ldm_jax.training.state import TrainState
from ldm_jax.training.steps import LossFn, train_step

GENERATION_MODES = ("txt2img", "img2img", "inpaint")
# The ldm_jax.evaluate options every latent diffusion task takes (its concat input may add more).
EVAL_OPTIONS = ("guidance_scale", "num_steps", "sampler")


def sample_section(prompts, **overrides):
    """``config.sample``: the sampler and every option of it (``samplers.SamplerOptions``), guidance, and what
    previews draw (``prompts`` here; the conditioner's other preview fields are added by the config)."""
    d = samplers.SamplerOptions().to_config()  # sampler, num_steps, spacing, steps_offset, eta, karras_sigmas, ...
    d.update(
        prompts=tuple(prompts),  # preview grids during training
        guidance_scale=3.0,
        guidance_rescale=0.0,  # 0.7 with zero-terminal-SNR models (Lin et al. 2024)
        negative_prompt="",  # the unconditional side of guidance; "" is the null condition used in training
    )
    d.update(overrides)
    return ml_collections.ConfigDict(d)


def with_concat(x: jax.Array, concat: jax.Array | None) -> jax.Array:
    """The UNet input: noisy latents, then the concat-conditioning channels (diffusers' order)."""
    return x if concat is None else jnp.concatenate([x, concat.astype(x.dtype)], axis=-1)


class LatentDiffusionTask:
    def __init__(self, config, conditioner_cls, concat_cls):
        self.config = config
        self.dtype = jnp.dtype(config.dtype)
        self.conditioner = conditioner_cls(config, self.dtype)
        self.latents = LatentSpace(config)
        self.concat = concat_cls(config, self.latents)
        self.first_stage = self.latents.module
        self.latent_shape = self.latents.shape
        self.concat_channels = self.concat.channels
        u = UNetConfig.from_config(config.unet, "unet.")
        levels = len(u.block_out_channels)
        if self.latent_shape[0] % 2 ** (levels - 1):
            raise ValueError(
                f"unet.block_out_channels={tuple(u.block_out_channels)}: {levels} levels need latents divisible "
                f"by {2 ** (levels - 1)}, got {self.latent_shape[0]}x{self.latent_shape[1]}"
            )
        self.unet = u.build(
            in_channels=self.latent_shape[-1] + self.concat_channels,
            out_channels=self.latent_shape[-1],
            context_dim=self.conditioner.context_dim,
            num_classes=self.conditioner.unet_classes,
            dtype=self.dtype,
        )
        self.schedule = schedule_from_config(config.diffusion)
        self.tokenizer = self.conditioner.tokenizer
        self.label_field = self.conditioner.label_field
        self.encode_images = self.latents.encode_images
        self.latent_mask = self.latents.latent_mask
        self._generate_cache = {}
        self._periodic = None
        lora_cfg = lora.from_run_config(config)
        # LoRA: the run trains adapters on init_from's frozen weights (tasks/adapters.py); None: the params.
        self.adapters = (
            adapters_lib.LoraAdapters(
                config,
                lora_cfg,
                jax.eval_shape(lambda r: self._model_params(r, with_frozen_text=True), jax.random.key(0)),
            )
            if lora_cfg.enabled
            else None
        )

    @classmethod
    def validate(cls, config, conditioner_cls, concat_cls) -> None:
        """The sections a latent diffusion run reads, and the rules between them."""
        FirstStageConfig.from_config(config.first_stage, "first_stage.")
        config_lib.check(config.latent_scale >= 0, "latent_scale", config.latent_scale,
                         "must be >= 0 (0 = 1/std of training latents)")  # fmt: skip
        unet = UNetConfig.from_config(config.unet, "unet.")
        if unet.addition_embed_type == "text":
            heads = unet.addition_embed_type_num_heads
            config_lib.check(conditioner_cls.NEEDS == "a text-conditioned run", "unet.addition_embed_type", "text",
                             f"pools the prompt's encoding; a {config.task} run has no prompt: use 'none'")  # fmt: skip
            width = config.text_encoder.width
            config_lib.check(width % heads == 0, "unet.addition_embed_type_num_heads", heads,
                             f"must divide the text encoder's width {width}")  # fmt: skip
        objectives.DiffusionConfig.from_config(config.diffusion, "diffusion.")
        samplers.SamplerOptions.for_run(config)
        validate_guidance(config.sample.guidance_scale, config.sample.guidance_rescale)
        conditioner_cls.validate(config)
        concat_cls.validate(config)
        adapters_lib.validate(config, text_conditioned=conditioner_cls.NEEDS == "a text-conditioned run")
        dreambooth.validate(config)
        ev = EvalConfig.from_config(config.eval, "eval.")
        config_lib.check(not ev.every or concat_cls.from_conditions_alone, "eval.every", ev.every,
                         f"distribution metrics during training need a txt2img, class_cond or unconditional run; "
                         f"a {config.task} run's images need inputs beyond the dataset conditions: set 0")  # fmt: skip
        if ev.every and conditioner_cls.NEEDS != "a text-conditioned run":  # found now, not at the first evaluation
            config_lib.check("clip_score" not in sample_metrics.parse_metrics(ev.metrics), "eval.metrics", ev.metrics,
                             f"clip_score scores images against their prompts; a {config.task} run has none: use "
                             "fid, kid or is")  # fmt: skip
            config_lib.check(not ev.prompts_file, "eval.prompts_file", ev.prompts_file,
                             f"a {config.task} run takes no prompts: set ''")  # fmt: skip

    # ---- parameters ----------------------------------------------------------------------------------------
    @property
    def unet_input_shape(self) -> tuple[int, int, int]:
        h, w, c = self.latent_shape
        return h, w, c + self.concat_channels

    def _model_params(self, rng: jax.Array, with_frozen_text: bool = False):
        """The model's parameters ({"unet", ...}): those the run trains, and with ``with_frozen_text`` a frozen text
        encoder's too (the tree LoRA adapters attach to)."""
        unet_rng, params, (context, labels) = self.conditioner.init(rng)
        h, w, c = self.unet_input_shape
        x, t = jnp.zeros((1, h, w, c)), jnp.zeros((1,), jnp.int32)
        unet = self.unet.init({"params": unet_rng}, x, t, context, class_labels=labels)["params"]
        text = getattr(self.conditioner, "text_encoder", None)
        if with_frozen_text and text is not None and "text" not in params:
            tokens = jnp.zeros((1, self.tokenizer.max_length), jnp.int32)
            params = dict(params, text=text.init({"params": jax.random.fold_in(rng, 1)}, tokens)["params"])
        return {"unet": unet, **params}

    def init_params(self, rng: jax.Array):
        """The trained parameters: the model's (without a frozen text encoder), or a LoRA run's adapters."""
        if self.adapters is not None:
            return self.adapters.init(rng)
        return self._model_params(rng)

    @property
    def trains_from_init(self) -> bool:
        """Whether ``init_from`` initialises the trained params (the loop loads them); a LoRA run's ``setup`` reads
        it as the frozen base instead."""
        return self.adapters is None

    def model_weights(self, params, frozen, scale=1.0):
        """(params, frozen) as the model's functions take them: a LoRA run's adapters merged into its base
        (traceable, ``scale`` too); any other run's as they are."""
        if self.adapters is None:
            return params, frozen
        return self.adapters.model(params, frozen, scale)

    def setup(self, meta: dict) -> tuple[dict, dict]:
        """The frozen first stage (and frozen conditioning weights) and the latent scale; returns (frozen, meta)."""
        fs_params, scale = self.latents.setup(meta)
        frozen = {"first_stage": fs_params}
        self.conditioner.setup_frozen(frozen)
        frozen["latent_scale"] = jnp.asarray(scale, jnp.float32)
        meta_out = {"latent_scale": scale, "frozen_inputs": {"first_stage": self.latents.identity()}}
        if self.adapters is not None:
            meta_out.update(self.adapters.setup(frozen, meta))
        return frozen, meta_out

    def adapt_init_params(self, params: dict) -> dict:
        return self.concat.adapt_init_params(params)

    def load_weights(self, workdir: str, weights: str = "ema", mesh=None):
        """(params, frozen, mesh, step) of a trained workdir, replicated on ``mesh`` (default: every device)."""
        mesh = make_mesh(-1, 1) if mesh is None else mesh
        params, meta, step = checkpoint.load_trained_params(workdir, weights)
        frozen, meta_now = self.setup(meta)
        for name in frozen_input_changes(meta, meta_now):  # allowed when sampling: e.g. a fine-tuned decoder
            logging.warning("%s: %s", workdir, name)
        params, frozen = self.model_weights(params, frozen)  # a LoRA run: its adapters merged into the base
        # Every process read the same weights: each places its own replicas (works when the mesh spans processes).
        params, frozen = transfer.to_mesh((params, frozen), replicated(mesh))
        logging.info("loaded %s weights of %s at step %d; %d devices", weights, workdir, step, mesh.size)
        return params, frozen, mesh, step

    @staticmethod
    def host_first_stage(frozen):
        """The first stage's weights in this process's memory (every process holds the whole tree)."""
        return transfer.to_host(frozen["first_stage"])

    # ---- the UNet under the task's conditioning --------------------------------------------------------------
    def apply_unet(self, params, x, t, cond, train: bool = False, rngs=None) -> jax.Array:
        context, labels = self.conditioner.unet_inputs(cond)
        return self.unet.apply({"params": params["unet"]}, x, t, context, train=train, rngs=rngs, class_labels=labels)

    def training_inputs(self, params, frozen, batch, drop: jax.Array, rng: jax.Array) -> tuple[Any, Any]:
        """(condition, concat tensor [B, h, w, concat_channels] or None) of a training batch; examples where
        ``drop`` [B] is True get the null condition."""
        cond = self.conditioner.training_condition(params, frozen, batch, drop)
        return self.concat.training_inputs(frozen, batch, cond, rng)

    # ---- training ------------------------------------------------------------------------------------------
    @property
    def loss_fn(self) -> LossFn:
        cfg = self.config.diffusion
        schedule = self.schedule
        db = dreambooth.from_run_config(self.config)

        def loss_fn(params, frozen, batch, rng):
            params, frozen = self.model_weights(params, frozen)  # LoRA: gradients reach the adapters through it
            if "prior_image" in batch:  # DreamBooth: instance rows, then class rows weighted by prior_loss_weight
                batch = dreambooth.joined_batch(batch, db.prior_loss_weight)
            k_post, k_t, k_noise, k_drop, k_dropout = jax.random.split(rng, 5)
            z0 = self.latents.training_latents(frozen["first_stage"], batch, k_post) * frozen["latent_scale"]
            b = z0.shape[0]
            z0 = jax.lax.stop_gradient(z0)
            # Condition dropout: the null condition stands in for "no condition" (classifier-free guidance).
            drop = jax.random.bernoulli(k_drop, cfg.cond_drop_prob, (b,))
            # A key of its own (not a sixth split) keeps the other streams unchanged by concat inputs.
            concat_rng = jax.random.fold_in(rng, rng_streams.TRAINING_CONCAT_INPUTS)
            cond, concat = self.training_inputs(params, frozen, batch, drop, concat_rng)
            t = jax.random.randint(k_t, (b,), 0, schedule.num_train_timesteps)
            noise = objectives.sample_noise(k_noise, z0.shape, cfg.offset_noise, z0.dtype)
            x_t = objectives.add_noise(schedule, z0, noise, t)
            out = self.apply_unet(params, with_concat(x_t, concat), t, cond, train=True, rngs={"dropout": k_dropout})
            target = objectives.training_target(cfg.prediction_type, schedule, z0, noise, t)
            weights = objectives.loss_weights(cfg.loss_weighting, cfg.prediction_type, schedule, t, cfg.min_snr_gamma)
            if "loss_weight" in batch:
                weights = batch["loss_weight"] if weights is None else weights * batch["loss_weight"]
            loss = objectives.diffusion_loss(out, target, weights)
            return loss, {"cond_dropped": jnp.mean(drop.astype(jnp.float32))}

        return loss_fn

    def make_step(self, num_steps: int):
        """(init_state, step): ``training.steps.train_step`` with this task's loss and the run's optimizer. A run on
        a latent cache is checked against the weights ``setup`` loaded first."""
        c = self.config
        info = pipeline.cache_info(c.data)
        if info is not None:
            self.latents.check_cache(info)
            if self.tokenizer is not None:  # text-conditioned: cached embeddings must be this run's encoder's
                self.conditioner.check_cache(info)
        tx, lr_schedule = make_optimizer(c.optim, num_steps, c.data.global_batch_size)
        step = functools.partial(
            train_step,
            loss_fn=self.loss_fn,
            tx=tx,
            lr_schedule=lr_schedule,
            ema_decay=c.optim.ema_decay,
            accum_steps=c.train.grad_accum_steps,
        )

        def init_state(rng, params=None):
            return TrainState.create(self.init_params(rng) if params is None else params, tx)

        return init_state, step

    def train_loader(self, start_step: int):
        """This process's share of every training batch from ``start_step`` on (``data.pipeline.make_loader``); a
        DreamBooth run first draws the class images it lacks, then reads (instance, class) pairs."""
        c = self.config
        db = dreambooth.from_run_config(c)
        source = None
        if db is not None:
            dreambooth.ensure_class_images(c, self.sampler_options(), self._base_model)
            source = dreambooth.DreamBoothExamples(c.data, db)
        return pipeline.make_loader(
            c.data, "train", c.data.global_batch_size, self.tokenizer, self.label_field, start_step=start_step,
            source=source,
        )  # fmt: skip

    def _base_model(self):
        """(task, params, frozen, mesh) of the ``init_from`` run as that run samples (its own config, this run's
        image size), on every device."""
        base_config = config_lib.load_config(os.path.join(self.config.init_from, "config.json"))
        base_config.data.image_size = self.config.data.image_size
        task = type(self)(base_config, type(self.conditioner), type(self.concat))
        params, frozen, mesh, _ = task.load_weights(self.config.init_from)
        return task, params, frozen, mesh

    # ---- previews ------------------------------------------------------------------------------------------
    def preview_images(self, params, frozen, mesh, **images):
        """Samples for the conditioner's preview conditions with the run's sampler and guidance and fixed seeds
        (``images``: init image and mask, for inpainting)."""
        s = self.config.sample
        conditions, negative = self.conditioner.preview_conditions()
        seeds = [self.config.seed + i for i in range(len(conditions))]
        return self.generate_images(
            params, frozen, mesh, conditions, seeds, self.sampler_options(), s.guidance_scale, s.guidance_rescale,
            negative, len(conditions), **images,
        )  # fmt: skip

    def preview(self, params, frozen, mesh) -> tuple[dict, dict]:
        params, frozen = self._merged_on_mesh(params, frozen)
        return self.concat.preview(self, params, frozen, mesh)

    def _merged_on_mesh(self, params, frozen):
        """``model_weights`` of arrays on the training mesh, as one jitted program (the weights stay on the mesh)."""
        if self.adapters is None:
            return params, frozen
        return jax.jit(self.model_weights)(params, frozen)

    @property
    def periodic(self) -> PeriodicEval:
        """The ``eval`` section at work, made when training first asks: sampling and evaluating a run never read
        the section (a run trained before it existed still samples)."""
        if self._periodic is None:
            self._periodic = PeriodicEval(self)
        return self._periodic

    @property
    def eval_every(self) -> int:
        return self.periodic.section.every

    def periodic_eval(self, params, frozen, mesh) -> dict[str, float]:
        params, frozen = self._merged_on_mesh(params, frozen)
        return self.periodic.evaluate(params, frozen, mesh)

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

        if not self.conditioner.guided:
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
        latents = self.latents
        sampler = samplers.make_sampler(
            options, self.schedule, first_step, beta_schedule=self.config.diffusion.beta_schedule
        )
        latent_shape, encode, guided = self.latent_shape, self.latents.encode_images, self.conditioner.guided
        blend = mode == "inpaint" and not self.concat.mask_conditioned
        # Start from the init latents noised to the first step's level: image-to-image at any strength (at 1 too, as
        # diffusers), inpainting below strength 1.
        from_image = mode == "img2img" or first_step > 0

        def generate(params, frozen, cond_in, null_in, seeds, guidance_scale, guidance_rescale, images):
            keys = jax.vmap(jax.random.key)(seeds)
            cond = self.conditioner.encode(params, frozen, cond_in)
            concat = self.concat.sampling_concat(frozen, images, keys, cond)
            uncond = self.conditioner.encode(params, frozen, null_in) if guided else None
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
                    m = self.latents.latent_mask(images["mask"])
                    kw["blend"] = lambda x, i: m * x + (1.0 - m) * sampler.noised(z_init, x_T, i + 1)
            z0 = samplers.sample(sampler, model_fn, x_T, **kw)
            images = latents.decode(frozen["first_stage"], z0 / frozen["latent_scale"])
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
            cells = np.asarray(self.latents.latent_mask(np.asarray(mask).reshape((-1, size, size, 1))))
            if not cells.reshape(cells.shape[0], -1).any(axis=1).all():
                raise ValueError(
                    f"mask: no latent cell is repainted at {self.latent_shape[0]}x{self.latent_shape[1]} "
                    f"(cells take the top-left pixel of each {self.latents.factor}-pixel block)"
                )
        self.concat.check_images(init_image, mask, low_res)

    def generate_images(self, params, frozen, mesh, conditions: list, seeds: list[int], *args, **kwargs) -> np.ndarray:
        """uint8 images [N, H, W, 3] for ``conditions[i]`` (a prompt, a class id, a noise level, None) with
        ``seeds[i]``, on every process; the arguments are ``generate_batches``'."""
        out = [
            to_uint8(transfer.to_host(images))[:n]
            for _, n, images in self.generate_batches(params, frozen, mesh, conditions, seeds, *args, **kwargs)
        ]
        return np.concatenate(out, axis=0)

    def generate_batches(
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
    ) -> Iterator[tuple[int, int, jax.Array]]:
        """Generates images for ``conditions[i]`` with ``seeds[i]`` in batches spread over every device of ``mesh``;
        yields ``(start, n, images)`` per batch: ``images`` a global float array [batch, H, W, 3] in [-1, 1], split
        over the devices by rows, whose first ``n`` rows are the images of ``conditions[start : start + n]``.

        ``negative`` replaces the null condition on the unconditional side of guidance (a negative prompt). With
        ``init_image`` (in [-1, 1]) this is image-to-image at ``strength``; with ``mask`` too (1 = repaint) it is
        inpainting. ``low_res`` (in [-1, 1]): the images a super-resolution model upscales. Each is one image for all
        outputs ([H, W, C]) or one per output ([N, H, W, C]). ``batch_size`` (0 = one per device) is rounded up to a
        multiple of the device count; the last batch is padded with repeats of its last entry, so every call
        compiles one program. Errors in the inputs (ValueError) are raised before any device work.

        Every process must call this with the same arguments (each places its own shards of them, so this works on
        a mesh over several processes); a caller reads its own rows from ``images.addressable_shards`` or all of
        them with ``transfer.to_host``.
        """
        if len(conditions) != len(seeds):
            raise ValueError(f"{len(conditions)} conditions but {len(seeds)} seeds: need one seed per image")
        self.conditioner.check(conditions)
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
        fn = self.compiled_generate(mesh, options, mode, first_step)
        per_call = transfer.rows_per_call(batch_size, mesh.size)
        repl, rows = replicated(mesh), batch_sharding(mesh)
        null_inputs = self.conditioner.null_inputs(per_call, negative)  # raises for a negative the task cannot take

        def batches():
            null = transfer.to_mesh(null_inputs, rows)
            scales = transfer.to_mesh((np.float32(guidance_scale), np.float32(guidance_rescale)), repl)
            for start, n, idx in transfer.padded_batches(len(conditions), per_call):
                cond, seed_rows, image_rows = transfer.to_mesh(
                    (
                        self.conditioner.condition_inputs([conditions[i] for i in idx]),
                        np.asarray([seeds[i] for i in idx], np.uint32),
                        {name: x[idx] for name, x in per_image.items()},
                    ),
                    rows,
                )
                yield start, n, fn(params, frozen, cond, null, seed_rows, *scales, image_rows)

        return batches()

    # ---- ldm_jax.sample and ldm_jax.evaluate -----------------------------------------------------------------
    @property
    def sample_flags(self) -> tuple[str, ...]:
        """The task-specific ``ldm_jax.sample`` flags this task reads."""
        return self.conditioner.FLAGS + self.concat.FLAGS

    def sample_request(self, inputs: SampleInputs) -> SampleRequest:
        """Checks and resolves the sampling inputs (ValueError naming the flag), before any weights load."""
        size = inputs.image_size or self.config.data.image_size
        if inputs.image_size:  # named now by its flag, not later as the run's data.image_size or unet fields
            f, down = self.latents.factor, 2 ** (len(self.config.unet.block_out_channels) - 1)
            lo = max(f * down, size - size % (f * down))
            if size % (f * down):
                raise ValueError(
                    f"--image_size={size}: must be a multiple of {f * down} (the first stage's f={f} x {down} for "
                    f"the UNet's downsamplings), e.g. {lo} or {lo + f * down}"
                )
        images, sources, strength, out_size = self.concat.sample_images(inputs, size)
        conditions, describe, negative, repeats = self.conditioner.sample_conditions(inputs, sources)
        describe = [dict(d, **self.concat.describe_source(inputs, i)) for i, d in enumerate(describe)]
        return SampleRequest(conditions, describe, repeats, negative, images, strength, out_size)

    @property
    def EVAL_OPTIONS(self) -> tuple[str, ...]:  # noqa: N802 (a constant of the task)
        return EVAL_OPTIONS + self.concat.EVAL_OPTIONS

    def evaluate_workdir(self, workdir: str, inputs: EvalInputs) -> tuple[dict, np.ndarray, str]:
        """Generation from the conditions of ``inputs.split``'s first examples, scored as the concat input says
        (attributes read back from the pixels, inpainting, or super-resolution against the originals)."""
        import time

        from ldm_jax.imaging import make_grid

        params, frozen, mesh, step = self.load_weights(workdir)
        source = pipeline.data_source(self.config.data, inputs.split)
        n = min(inputs.num_examples, len(source))
        if n < 1:
            raise ValueError(f"--num_examples={inputs.num_examples}: must be >= 1")
        examples = [source[i] for i in range(n)]
        options = self.sampler_options(num_steps=inputs.num_steps, name=inputs.sampler)
        seeds = [inputs.seed + i for i in range(n)]
        result = dict(split=inputs.split, checkpoint_step=step, sampler=options.name, num_steps=options.num_steps)
        t0 = time.perf_counter()
        scores, rows = self.concat.evaluate(self, params, frozen, mesh, examples, options, seeds, inputs)
        result.update(generation_seconds=time.perf_counter() - t0, **scores)
        k = min(8, n)
        grid = make_grid(np.concatenate([r[:k] for r in rows]), ncol=k)
        name = f"eval_{inputs.split}" + ("_inpaint" if inputs.inpaint else "")
        return result, grid, name + (f"_strength{inputs.strength:g}" if inputs.strength is not None else "")

"""What is concatenated to the noisy latents at the UNet input: nothing, an inpainting mask with the masked image's
latents, or a low-resolution image to upscale.

A concat input is a tensor at the latent resolution, joined to the noisy latents on the channel axis at every UNet
call (the UNet's input has latent + ``channels`` channels). Under guidance both sides see the same concat tensor;
only the condition differs. Each part owns its config section, how its tensor is made in training and at sampling,
the images it takes (``ldm_jax.sample`` flags in ``FLAGS``), its training previews and how a run is evaluated.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax import config_lib, rng_streams
from ldm_jax.data import masks as masks_lib
from ldm_jax.data import pipeline
from ldm_jax.diffusion import objectives
from ldm_jax.diffusion.schedules import SCHEDULES, make_schedule
from ldm_jax.evaluation import generation, image_metrics
from ldm_jax.imaging import load_image, load_mask, make_grid, to_uint8
from ldm_jax.tasks.protocol import EvalInputs, SampleInputs

DOWNSAMPLE_METHODS = ("bicubic", "linear", "lanczos3")


def _load_init_and_mask(inputs: SampleInputs, size: int) -> tuple[dict, float]:
    """The --init_image / --mask_image files at the output size, and the strength (default 0.8 for image-to-image,
    1.0 with a mask)."""
    if inputs.mask_image and not inputs.init_image:
        raise ValueError("--mask_image needs --init_image (the image whose unmasked region is kept)")
    if inputs.strength is not None and not inputs.init_image:
        raise ValueError("--strength applies only with --init_image")
    images = {}
    if inputs.init_image:
        images["init"] = load_image(inputs.init_image, size)
        if inputs.mask_image:
            images["mask"] = load_mask(inputs.mask_image, size)
    strength = inputs.strength if inputs.strength is not None else (1.0 if "mask" in images else 0.8)
    return images, strength


class NoConcat:
    """Models that take only the noisy latents. Any of them can do image-to-image (from an encoded init image)
    and inpainting by latent blending (the kept region replaced after every step)."""

    FLAGS = ("init_image", "mask_image", "strength")
    NEEDS = "a model that takes whole images (not superres: pass --low_res_image)"
    EVAL_OPTIONS = ("inpaint", "strength")
    channels = 0
    mask_conditioned = False
    needs_pixels = False  # training reads only the latents (a latent cache will do)
    # Images follow from the conditions alone, so evaluation during training can generate from dataset conditions.
    from_conditions_alone = True

    def __init__(self, config, latents):
        self.config = config

    @staticmethod
    def validate(config) -> None:
        pass

    def training_inputs(self, frozen, batch, cond, rng):
        return cond, None

    def sampling_concat(self, frozen, images, keys, cond):
        return None

    def check_images(self, init_image, mask, low_res) -> None:
        if low_res is not None:
            raise ValueError(f"low_res images given, but a {self.config.task} model does not take them")

    def adapt_init_params(self, params: dict) -> dict:
        return params

    def sample_images(self, inputs: SampleInputs, size: int) -> tuple[dict, int | None, float, int]:
        """(per-request images, number of sources they define or None, strength, output size or 0)."""
        images, strength = _load_init_and_mask(inputs, size)
        return images, None, strength, 0

    def describe_source(self, inputs: SampleInputs, i: int) -> dict:
        return {}

    def preview(self, task, params, frozen, mesh) -> tuple[dict, dict]:
        """A grid of samples for the conditioner's preview conditions with fixed seeds."""
        images = task.preview_images(params, frozen, mesh)
        return {"samples": make_grid(images, ncol=len(images))}, {}

    def evaluate(self, task, params, frozen, mesh, examples, options, seeds, inputs: EvalInputs):
        mode = "latent blending (txt2img model)" if inputs.inpaint else None
        return generation.score_attributes(task, params, frozen, mesh, examples, options, seeds, inputs, mode)


class MaskConcat:
    """Mask-conditioned inpainting (Stable Diffusion's 9-channel inpainting models): the UNet sees the noisy
    latents, the mask at the latent resolution and the latents of the masked image (the image with the region to
    repaint set to 0), in that order: 4 + 1 + 4 = 9 channels for a 4-channel first stage. Training masks are random
    boxes or the whole image (``config.inpainting``, ``ldm_jax.data.masks``)."""

    FLAGS = NoConcat.FLAGS
    NEEDS = NoConcat.NEEDS
    EVAL_OPTIONS = ()
    mask_conditioned = True
    needs_pixels = True
    from_conditions_alone = False  # the masked image is encoded every step

    def __init__(self, config, latents):
        self.config = config
        self.latents = latents
        self.latent_channels = latents.shape[-1]
        self.channels = 1 + self.latent_channels  # the mask, then the masked image's latents
        self.section = InpaintingConfig.from_config(config.inpainting, "inpainting.")

    @staticmethod
    def validate(config) -> None:
        InpaintingConfig.from_config(config.inpainting, "inpainting.")

    @staticmethod
    def masked_image(images, masks):
        """The image with the repaint region zeroed (diffusers: ``image * (mask < 0.5)``)."""
        return images * (masks < 0.5).astype(images.dtype)

    def concat_input(self, frozen, images, masks, keys):
        """[mask at latent resolution, scaled latents of the masked image]: the 1 + z concat channels."""
        masks = (masks >= 0.5).astype(jnp.float32)
        z = self.latents.encode_images(
            frozen["first_stage"], self.masked_image(images, masks), keys, rng_streams.MASKED_IMAGE_POSTERIOR
        )
        return jnp.concatenate([self.latents.latent_mask(masks), z * frozen["latent_scale"]], axis=-1)

    def training_inputs(self, frozen, batch, cond, rng):
        images = batch["image"]
        b, size = images.shape[0], images.shape[1]
        k_mask, k_post = jax.random.split(rng)
        p = self.section
        masks = masks_lib.random_box_masks(
            k_mask, b, size, p.max_boxes, p.min_box_fraction, p.max_box_fraction, p.full_mask_prob
        )
        concat = self.concat_input(frozen, images, masks, jax.random.split(k_post, b))
        return cond, jax.lax.stop_gradient(concat)

    def sampling_concat(self, frozen, images, keys, cond):
        return self.concat_input(frozen, images["init"], images["mask"], keys)

    def check_images(self, init_image, mask, low_res) -> None:
        if mask is None:
            raise ValueError(f"{self.config.task} models need init_image and mask (the image and the region to paint)")
        NoConcat.check_images(self, init_image, mask, low_res)

    def adapt_init_params(self, params: dict) -> dict:
        """Text-to-image weights (``init_from`` a txt2img run or import) start an inpainting model, as SD's inpainting
        models were made: the input convolution gains zero weights for the mask and masked-image channels, so the
        model starts out computing exactly what the text-to-image model did."""
        kernel = params.get("unet", {}).get("conv_in", {}).get("kernel")
        if kernel is None or kernel.shape[2] != self.latent_channels:
            return params  # already an inpainting model (or something the loop's shape check will name)
        pad = np.zeros(kernel.shape[:2] + (self.channels, kernel.shape[3]), kernel.dtype)
        conv_in = dict(params["unet"]["conv_in"], kernel=np.concatenate([np.asarray(kernel), pad], axis=2))
        return dict(params, unet=dict(params["unet"], conv_in=conv_in))

    def sample_images(self, inputs: SampleInputs, size: int):
        if not (inputs.init_image and inputs.mask_image):
            raise ValueError("this run is an inpainting model: pass --init_image and --mask_image (white = repaint)")
        images, strength = _load_init_and_mask(inputs, size)
        return images, None, strength, 0

    def describe_source(self, inputs: SampleInputs, i: int) -> dict:
        return {}

    def preview(self, task, params, frozen, mesh) -> tuple[dict, dict]:
        """Each preview condition painted into the centre of a validation image: [masked input, output] rows."""
        size = self.config.data.image_size
        init = pipeline.first_images(self.config.data, "validation", 1)[0]
        mask = np.asarray(masks_lib.box_mask(size, size // 4, size // 4, size // 2, size // 2))
        images = task.preview_images(params, frozen, mesh, init_image=init, mask=mask)
        masked = to_uint8(self.masked_image(init, mask))
        grid = np.concatenate([np.broadcast_to(masked, images.shape), images])
        return {"samples": make_grid(grid, ncol=len(images))}, {}

    def evaluate(self, task, params, frozen, mesh, examples, options, seeds, inputs: EvalInputs):
        mode = "mask-conditioned model"
        return generation.score_attributes(task, params, frozen, mesh, examples, options, seeds, inputs, mode)


@dataclasses.dataclass(frozen=True, kw_only=True)
class InpaintingConfig(config_lib.Section):
    """``config.inpainting``: the random training masks (``ldm_jax.data.masks.random_box_masks``)."""

    max_boxes: int = 3
    min_box_fraction: float = 0.1
    max_box_fraction: float = 0.6
    full_mask_prob: float = 0.25  # the whole image masked: the model also learns plain text-to-image

    def validate(self, prefix: str) -> None:
        self.check(self.max_boxes >= 1, prefix, "max_boxes", "must be >= 1")
        self.check(
            0.0 < self.min_box_fraction <= self.max_box_fraction <= 1.0,
            prefix,
            "min_box_fraction",
            "need 0 < min_box_fraction <= max_box_fraction <= 1",
            (self.min_box_fraction, self.max_box_fraction),
        )
        self.check(0.0 <= self.full_mask_prob <= 1.0, prefix, "full_mask_prob", "must be in [0, 1]")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SuperResConfig(config_lib.Section):
    """``config.superres``: the low-resolution input and its noise augmentation."""

    scale: int = 4  # output side / low-resolution side
    downsample: str = "bicubic"  # how training inputs are made: antialiased bicubic, linear or lanczos3
    # Noise augmentation: levels 0..max_noise_level of the DDPM schedule below (SD x4 upscaler's); 0 disables it
    # (no level input).
    max_noise_level: int = 350
    noise_schedule: str = "scaled_linear"
    noise_timesteps: int = 1000
    noise_beta_start: float = 0.0001
    noise_beta_end: float = 0.02

    def validate(self, prefix: str) -> None:
        self.check(self.scale >= 2, prefix, "scale", "must be >= 2 (output side / low-resolution side)")
        self.check(self.downsample in DOWNSAMPLE_METHODS, prefix, "downsample", f"must be one of {DOWNSAMPLE_METHODS}")
        self.check(self.noise_schedule in SCHEDULES, prefix, "noise_schedule", f"must be one of {SCHEDULES}")
        self.check(
            0 <= self.max_noise_level < self.noise_timesteps,
            prefix,
            "max_noise_level",
            f"must be in [0, {prefix}noise_timesteps={self.noise_timesteps})",
        )


class LowResConcat:
    """Super-resolution by concat conditioning (LDM's SR models, Stable Diffusion's x4 upscaler).

    The low-resolution image (``data.image_size / superres.scale`` pixels a side, made from each training image by
    antialiased ``superres.downsample`` resizing) is concatenated to the noisy latents; where its side differs from
    the latent grid's it is resized to it first. Noise augmentation (``superres.max_noise_level`` > 0): in training
    the low-resolution image is noised to a random level of its own DDPM schedule, and the level is the condition
    (``conditioners.NoiseLevelConditioner``); at sampling the user picks the level (higher levels let the model
    invent more detail and hide artefacts of the input)."""

    FLAGS = ("low_res_image",)
    NEEDS = "a superres run"
    EVAL_OPTIONS = ("noise_level",)
    channels = 3  # the low-resolution RGB image
    mask_conditioned = False
    needs_pixels = True  # the low-resolution input is made from the image every step
    from_conditions_alone = False

    def __init__(self, config, latents):
        self.config = config
        self.latent_shape = latents.shape
        sr = SuperResConfig.from_config(config.superres, "superres.")
        self.scale = sr.scale
        self.downsample = sr.downsample
        self.noise_levels = sr.max_noise_level + 1 if sr.max_noise_level > 0 else 0
        self.low_res_schedule = make_schedule(
            sr.noise_schedule, sr.noise_timesteps, sr.noise_beta_start, sr.noise_beta_end
        )

    @staticmethod
    def validate(config) -> None:
        sr = SuperResConfig.from_config(config.superres, "superres.")
        size = config.data.image_size
        config_lib.check(size % sr.scale == 0, "superres.scale", sr.scale, f"must divide data.image_size={size}")

    @property
    def low_res_size(self) -> int:
        return self.config.data.image_size // self.scale

    def degrade(self, images):
        """Training images [B, H, W, 3] -> their low-resolution versions [B, H/scale, W/scale, 3]."""
        b, h, w, c = images.shape
        shape = (b, h // self.scale, w // self.scale, c)
        return jax.image.resize(images, shape, self.downsample, antialias=True)

    def concat_input(self, low_res, levels, noise):
        """Noise-augmented low-resolution images at the latent resolution (the 3 concat channels)."""
        x = low_res.astype(jnp.float32)
        if self.noise_levels:
            x = objectives.add_noise(self.low_res_schedule, x, noise, levels)
        h, w, _ = self.latent_shape
        if x.shape[1:3] != (h, w):
            x = jax.image.resize(x, (x.shape[0], h, w, x.shape[3]), "bicubic")
        return x

    def training_inputs(self, frozen, batch, cond, rng):
        """The noise level is drawn here, with the noise it scales: it replaces the (absent) condition."""
        k_level, k_noise = jax.random.split(rng)
        low_res = self.degrade(batch["image"])
        b = low_res.shape[0]
        levels = jax.random.randint(k_level, (b,), 0, self.noise_levels) if self.noise_levels else None
        noise = jax.random.normal(k_noise, low_res.shape, jnp.float32)
        return levels, self.concat_input(low_res, levels, noise)

    def sampling_concat(self, frozen, images, keys, levels):
        low_res = images["low_res"]
        stream = rng_streams.LOW_RES_NOISE
        noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, stream), low_res.shape[1:], jnp.float32))(
            keys
        )
        return self.concat_input(low_res, levels, noise)

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

    def adapt_init_params(self, params: dict) -> dict:
        return params

    def sample_images(self, inputs: SampleInputs, size: int):
        """The --low_res_image files at their own size (square, all alike); the output is ``scale`` times larger."""
        if not inputs.low_res_images:
            raise ValueError("this run is a super-resolution model: pass --low_res_image (repeatable)")
        if inputs.init_image or inputs.mask_image:
            raise ValueError("--init_image / --mask_image do not apply to a superres run: pass --low_res_image")
        paths = inputs.low_res_images
        images = [load_image(p, 0, "--low_res_image") for p in paths]
        for p, im in zip(paths, images, strict=True):
            if im.shape[0] != im.shape[1] or im.shape != images[0].shape:
                raise ValueError(
                    f"--low_res_image={p!r}: {im.shape[1]}x{im.shape[0]} px; inputs must be square and all the size "
                    f"of the first ({images[0].shape[1]}x{images[0].shape[0]})"
                )
        out = images[0].shape[0] * self.scale
        if inputs.image_size and inputs.image_size != out:
            raise ValueError(
                f"--image_size={inputs.image_size}: a {images[0].shape[0]}px input upscales to {out}px "
                f"(superres.scale={self.scale}); leave --image_size at 0"
            )
        return {"low_res": np.stack(images)}, len(images), 1.0, out

    def describe_source(self, inputs: SampleInputs, i: int) -> dict:
        return dict(low_res_image=inputs.low_res_images[i])

    def bicubic(self, low_res: np.ndarray) -> np.ndarray:
        """The baseline: plain bicubic upsampling of ``low_res`` to the output size, uint8."""
        n, h, w, c = low_res.shape
        size = self.config.data.image_size
        return to_uint8(jax.image.resize(jnp.asarray(low_res), (n, size, size, c), "bicubic"))

    def preview(self, task, params, frozen, mesh) -> tuple[dict, dict]:
        """Rows: bicubic upsampling, the model's output, the original, for ``sample.num_preview`` validation images."""
        levels, _ = task.conditioner.preview_conditions()
        originals = pipeline.first_images(self.config.data, "validation", len(levels))
        low_res = np.asarray(self.degrade(jnp.asarray(originals)))
        seeds = [self.config.seed + i for i in range(len(low_res))]
        options = task.sampler_options()
        images = task.generate_images(params, frozen, mesh, levels, seeds, options, batch_size=len(low_res),
                                      low_res=low_res)  # fmt: skip
        grid = np.concatenate([self.bicubic(low_res), images, to_uint8(originals)])
        return {"samples": make_grid(grid, ncol=len(low_res))}, {}

    def evaluate(self, task, params, frozen, mesh, examples, options, seeds, inputs: EvalInputs):
        """PSNR and SSIM of the upscaled images against the originals, next to bicubic upsampling and the first
        stage's own reconstruction (the ceiling a latent model can reach)."""
        level = task.conditioner.level(inputs.noise_level)
        originals = np.stack([e["image"] for e in examples])
        low_res = np.asarray(self.degrade(pipeline.to_model_range(originals)))
        images = task.generate_images(
            params, frozen, mesh, [level] * len(examples), seeds, options, batch_size=inputs.batch_size, low_res=low_res
        )
        bicubic = self.bicubic(low_res)
        recon = to_uint8(task.latents.reconstruct(task.host_first_stage(frozen), pipeline.to_model_range(originals)))
        result = dict(noise_level=level, scale=self.scale)
        for name, imgs in (("superres", images), ("bicubic", bicubic), ("first_stage_reconstruction", recon)):
            result[name] = {
                "psnr": float(np.mean(image_metrics.psnr(imgs, originals))),
                "ssim": float(np.mean(image_metrics.ssim(imgs, originals))),
            }
        return result, [bicubic, images, originals]

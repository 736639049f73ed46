"""Text-to-image latent diffusion: a UNet cross-attending to a CLIP-style text encoder's output.

The text encoder trains with the UNet unless ``text_encoder.trainable`` is False, when it is frozen (from
``init_from``) and passed to the step in ``frozen`` with the first stage.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ldm_jax.data.tokenizer import CLIPTokenizer
from ldm_jax.imaging import make_grid
from ldm_jax.models.text_encoders import CLIPTextTransformer
from ldm_jax.tasks.latent_diffusion import LatentDiffusionTask
from ldm_jax.training import checkpoint


class Txt2ImgTask(LatentDiffusionTask):
    uses_tokens = True

    def __init__(self, config):
        te = config.text_encoder
        super().__init__(config, context_dim=te.width)
        self.tokenizer = CLIPTokenizer(te.max_length, te.pad_token)
        self.text_encoder = CLIPTextTransformer(
            vocab_size=te.vocab_size,
            max_length=te.max_length,
            width=te.width,
            layers=te.layers,
            heads=te.heads,
            activation=te.activation,
            output_layer=te.output_layer,
            dtype=self.dtype,
        )
        self.null_tokens = jnp.asarray(self.tokenizer([""])[0])

    # ---- parameters -------------------------------------------------------------------------------------
    def init_params(self, rng: jax.Array):
        k_unet, k_text = jax.random.split(rng)
        h, w, c = self.unet_input_shape
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

    def setup_frozen_condition(self, frozen: dict) -> None:
        if not self.config.text_encoder.trainable:
            if not self.config.init_from:
                raise ValueError(
                    "text_encoder.trainable=False: a frozen text encoder needs trained weights; set init_from to a "
                    "txt2img workdir whose text encoder to freeze"
                )
            src, _, _ = checkpoint.load_trained_params(self.config.init_from, "ema")
            frozen["text"] = src["text"]

    def _text_params(self, params, frozen):
        return params["text"] if self.config.text_encoder.trainable else frozen["text"]

    # ---- conditioning ------------------------------------------------------------------------------------
    def encode_condition(self, params, frozen, tokens):
        return self.text_encoder.apply({"params": self._text_params(params, frozen)}, tokens)

    def apply_unet(self, params, x, t, context, train=False, rngs=None):
        return self.unet.apply({"params": params["unet"]}, x, t, context, train=train, rngs=rngs)

    def training_condition(self, params, frozen, batch, drop):
        # The empty caption is the null condition.
        tokens = jnp.where(drop[:, None], self.null_tokens[None, :], batch["tokens"])
        return self.encode_condition(params, frozen, tokens)

    def condition_inputs(self, prompts):
        return self.tokenizer(list(prompts))

    def null_inputs(self, n, negative=None):
        """Token ids of the negative prompt (default: the empty prompt the model was trained to ignore)."""
        return self.tokenizer([negative or ""] * n)

    def preview_images(self, params, frozen, mesh, **images):
        """Samples for ``sample.prompts`` with the run's sampler and guidance and fixed seeds (``images``: init
        image and mask, for inpainting)."""
        s = self.config.sample
        prompts = list(s.prompts)
        seeds = [self.config.seed + i for i in range(len(prompts))]
        options = self.sampler_options()
        return self.generate_images(
            params, frozen, mesh, prompts, seeds, options, s.guidance_scale, s.guidance_rescale, s.negative_prompt,
            len(prompts), **images,
        )  # fmt: skip

    def preview(self, params, frozen, mesh) -> tuple[dict, dict]:
        """A grid of samples for ``sample.prompts`` with fixed seeds."""
        images = self.preview_images(params, frozen, mesh)
        return {"samples": make_grid(images, ncol=len(images))}, {}


def load_for_sampling(workdir: str, weights: str = "ema", image_size: int = 0):
    """(task, params, frozen, mesh, step) of a txt2img workdir (see ``ldm_jax.tasks.load_for_sampling``)."""
    from ldm_jax.tasks import load_for_sampling as load

    return load(workdir, weights, image_size, tasks=("txt2img",))

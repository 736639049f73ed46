"""Mask-conditioned text-to-image inpainting (Stable Diffusion's 9-channel inpainting models).

The UNet sees the noisy latents, the mask at the latent resolution and the latents of the masked image (the image
with the region to repaint set to 0), concatenated on the channel axis in that order: 4 + 1 + 4 = 9 channels for a
4-channel first stage. Training masks are random boxes or the whole image (``config.inpainting``,
``ldm_jax.data.masks``); classifier-free guidance drops the caption only, both sides see the same mask and image.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax import rng_streams
from ldm_jax.data import masks as masks_lib
from ldm_jax.data import pipeline
from ldm_jax.imaging import make_grid, to_uint8
from ldm_jax.tasks.txt2img import Txt2ImgTask


class InpaintingTask(Txt2ImgTask):
    mask_conditioned = True

    def concat_channels_for(self, latent_channels: int) -> int:
        return 1 + latent_channels  # the mask, then the masked image's latents

    def adapt_init_params(self, params: dict) -> dict:
        """Text-to-image weights (``init_from`` a txt2img run or import) start an inpainting model, as SD's inpainting
        models were made: the input convolution gains zero weights for the mask and masked-image channels, so the
        model starts out computing exactly what the text-to-image model did."""
        kernel = params.get("unet", {}).get("conv_in", {}).get("kernel")
        z = self.latent_shape[-1]
        if kernel is None or kernel.shape[2] != z:
            return params  # already an inpainting model (or something _match_init_params will name)
        pad = np.zeros(kernel.shape[:2] + (self.concat_channels, kernel.shape[3]), kernel.dtype)
        conv_in = dict(params["unet"]["conv_in"], kernel=np.concatenate([np.asarray(kernel), pad], axis=2))
        return dict(params, unet=dict(params["unet"], conv_in=conv_in))

    def masked_image(self, images: jax.Array, masks: jax.Array) -> jax.Array:
        """The image with the repaint region zeroed (diffusers: ``image * (mask < 0.5)``)."""
        return images * (masks < 0.5).astype(images.dtype)

    def concat_input(self, frozen, images, masks, keys) -> jax.Array:
        """[mask at latent resolution, scaled latents of the masked image]: the 1 + z concat channels."""
        masks = (masks >= 0.5).astype(jnp.float32)
        z = self.encode_images(
            frozen["first_stage"], self.masked_image(images, masks), keys, rng_streams.MASKED_IMAGE_POSTERIOR
        )
        return jnp.concatenate([self.latent_mask(masks), z * frozen["latent_scale"]], axis=-1)

    def training_inputs(self, params, frozen, batch, drop, rng):
        cond = self.training_condition(params, frozen, batch, drop)
        images = batch["image"]
        b, size = images.shape[0], images.shape[1]
        k_mask, k_post = jax.random.split(rng)
        p = self.config.inpainting
        masks = masks_lib.random_box_masks(
            k_mask, b, size, p.max_boxes, p.min_box_fraction, p.max_box_fraction, p.full_mask_prob
        )
        keys = jax.random.split(k_post, b)
        concat = self.concat_input(frozen, images, masks, keys)
        return cond, jax.lax.stop_gradient(concat)

    def sampling_concat(self, frozen, images, keys, cond):
        return self.concat_input(frozen, images["init"], images["mask"], keys)

    def preview(self, params, frozen, mesh) -> tuple[dict, dict]:
        """Each of ``sample.prompts`` painted into the centre of a validation image: [masked input, output] rows."""
        size = self.config.data.image_size
        init = pipeline.first_images(self.config.data, "validation", 1)[0]
        mask = np.asarray(masks_lib.box_mask(size, size // 4, size // 4, size // 2, size // 2))
        images = self.preview_images(params, frozen, mesh, init_image=init, mask=mask)
        masked = to_uint8(self.masked_image(init, mask))
        grid = np.concatenate([np.broadcast_to(masked, images.shape), images])
        return {"samples": make_grid(grid, ncol=len(images))}, {}

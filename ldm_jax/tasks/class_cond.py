"""Class-conditional and unconditional latent diffusion.

Class-conditional (``task="class_cond"``): a learned class embedding is added to the UNet's timestep embedding, with
an extra null class (id ``num_classes``) that replaces the label with probability ``diffusion.cond_drop_prob`` in
training and is the unconditional side of classifier-free guidance at sampling. Unconditional
(``task="unconditional"``): no condition, no guidance. Neither has a context sequence, so the UNet's transformer
blocks attend to the feature map in both attention layers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.data import shapes
from ldm_jax.imaging import make_grid
from ldm_jax.tasks.latent_diffusion import LatentDiffusionTask


class ClassCondTask(LatentDiffusionTask):
    def __init__(self, config):
        self.conditional = config.task == "class_cond"
        self.num_classes = shapes.num_classes(config.classes) if self.conditional else 0
        self.label_field = config.classes if self.conditional else None
        self.guided = self.conditional
        super().__init__(config, context_dim=0, num_classes=self.num_classes)

    def init_params(self, rng: jax.Array):
        h, w, c = self.unet_input_shape
        labels = jnp.zeros((1,), jnp.int32) if self.conditional else None
        x, t = jnp.zeros((1, h, w, c)), jnp.zeros((1,), jnp.int32)
        return {"unet": self.unet.init({"params": rng}, x, t, None, class_labels=labels)["params"]}

    # ---- conditioning ------------------------------------------------------------------------------------
    def encode_condition(self, params, frozen, labels):
        return labels

    def apply_unet(self, params, x, t, labels, train=False, rngs=None):
        return self.unet.apply({"params": params["unet"]}, x, t, None, train=train, rngs=rngs, class_labels=labels)

    def training_condition(self, params, frozen, batch, drop):
        if not self.conditional:
            return None
        return jnp.where(drop, self.num_classes, batch["label"]).astype(jnp.int32)

    def check_conditions(self, labels) -> None:
        if self.conditional:
            self.check_labels(labels)

    def check_labels(self, labels) -> None:
        bad = [x for x in labels if not (isinstance(x, (int, np.integer)) and 0 <= x < self.num_classes)]
        if bad:
            raise ValueError(
                f"class labels {bad}: must be integers in [0, {self.num_classes}) for classes={self.config.classes!r}"
            )

    def condition_inputs(self, labels):
        if not self.conditional:
            return None
        return np.asarray(labels, np.int32)

    def null_inputs(self, n, negative=None):
        if negative not in (None, ""):
            raise ValueError(f"negative={negative!r}: class-conditional models have no negative prompt")
        return np.full((n,), self.num_classes, np.int32) if self.conditional else None

    def class_name(self, label: int) -> str:
        return shapes.class_name(label, self.config.classes)

    # ---- previews ------------------------------------------------------------------------------------------
    def preview_conditions(self) -> list:
        s = self.config.sample
        return list(s.class_labels) if self.conditional else [None] * s.num_preview

    def preview(self, params, frozen, mesh) -> tuple[dict, dict]:
        """A grid of samples for ``sample.class_labels`` (unconditional: ``sample.num_preview`` samples)."""
        s = self.config.sample
        conditions = self.preview_conditions()
        seeds = [self.config.seed + i for i in range(len(conditions))]
        images = self.generate_images(
            params,
            frozen,
            mesh,
            conditions,
            seeds,
            self.sampler_options(),
            s.guidance_scale,
            s.guidance_rescale,
            batch_size=len(conditions),
        )
        return {"samples": make_grid(images, ncol=len(conditions))}, {}

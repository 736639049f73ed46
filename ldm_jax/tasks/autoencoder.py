"""First-stage task: train a KL autoencoder on images (L1/L2 reconstruction + KL)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.data import pipeline
from ldm_jax.imaging import make_grid, to_uint8
from ldm_jax.models.autoencoder import AutoencoderKL
from ldm_jax.models.vq import VQModel
from ldm_jax.training.steps import LossFn

PREVIEW_EXAMPLES = 16
EVAL_EXAMPLES = 256
EVAL_CHUNK = 32


def build_autoencoder(model_config, dtype: str = "float32"):
    """The first-stage module of a config's ``model`` section: ``AutoencoderKL`` or (``kind="vq"``) ``VQModel``."""
    m = dict(model_config)
    common = dict(
        block_out_channels=tuple(m["block_out_channels"]),
        layers_per_block=m["layers_per_block"],
        latent_channels=m["latent_channels"],
        norm_groups=m["norm_groups"],
        mid_attention=m.get("mid_attention", True),
        dtype=jnp.dtype(dtype),
    )
    kind = m.get("kind", "kl")
    if kind == "vq":
        return VQModel(embed_dim=m["embed_dim"], num_codes=m["num_codes"], **common)
    if kind != "kl":
        raise ValueError(f"model.kind={kind!r}: must be 'kl' or 'vq'")
    return AutoencoderKL(init_logvar=m.get("init_logvar", 0.0), **common)


def latent_channels(model_config) -> int:
    """Channels of the latents a first stage hands the diffusion model: the code width of a VQ model (its
    pre-quantisation latents), the posterior's channels of a KL one."""
    m = dict(model_config)
    return int(m["embed_dim"] if m.get("kind", "kl") == "vq" else m["latent_channels"])


def psnr(x: jax.Array, y: jax.Array) -> jax.Array:
    """Mean PSNR in dB of images in [-1, 1] (peak-to-peak range 2): [B, H, W, C] -> scalar."""
    mse = jnp.mean(jnp.square(jnp.clip(x, -1, 1) - jnp.clip(y, -1, 1)), axis=(1, 2, 3))
    return jnp.mean(10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-10)))


class AutoencoderTask:
    uses_tokens = False

    def __init__(self, config):
        self.config = config
        if config.model.get("kind", "kl") != "kl":
            # VQ models convert, sample and serve as a txt2img first stage; their trainer is not written yet.
            raise NotImplementedError(f"model.kind={config.model.kind!r}: only KL autoencoders can be trained so far")
        self.model = build_autoencoder(config.model, config.dtype)
        self._eval_images = None
        self._eval_fn = None

    def init_params(self, rng: jax.Array):
        s = self.config.data.image_size
        x = jnp.zeros((1, s, s, 3), jnp.float32)
        return self.model.init({"params": rng}, x, rng)["params"]

    def setup(self, meta: dict) -> tuple[dict, dict]:
        """Frozen inputs of the step (none for this task) and the metadata to checkpoint."""
        return {}, {}

    @property
    def loss_fn(self) -> LossFn:
        model, loss_cfg = self.model, self.config.loss

        def loss_fn(params, frozen, batch, rng):
            x = batch["image"]
            rec, posterior = model.apply({"params": params}, x, rng)
            l1 = jnp.mean(jnp.abs(x - rec))
            l2 = jnp.mean(jnp.square(x - rec))
            kl = jnp.mean(posterior.kl())
            loss = loss_cfg.l1_weight * l1 + loss_cfg.l2_weight * l2 + loss_cfg.kl_weight * kl
            return loss, {"l1": l1, "kl": kl, "psnr": psnr(rec, x)}

        return loss_fn

    def _reconstruct(self, params, images):
        if self._eval_fn is None:
            model = self.model
            self._eval_fn = jax.jit(
                lambda p, x: model.apply({"params": p}, x, jax.random.key(0), sample_posterior=False)[0]
            )
        return self._eval_fn(params, images)

    def preview(self, params, frozen, mesh) -> tuple[dict, dict]:
        """Reconstructions of fixed validation images (posterior mode) and their PSNR."""
        if self._eval_images is None:
            self._eval_images = pipeline.first_images(self.config.data, "validation", EVAL_EXAMPLES)
        x = jnp.asarray(self._eval_images)
        # Chunks keep evaluation memory bounded at pod-scale image sizes.
        rec = jnp.concatenate(
            [self._reconstruct(params, x[i : i + EVAL_CHUNK]) for i in range(0, x.shape[0], EVAL_CHUNK)]
        )
        metrics = {"eval/psnr": float(psnr(rec, x)), "eval/l1": float(jnp.mean(jnp.abs(rec - x)))}
        k = min(PREVIEW_EXAMPLES, x.shape[0])
        pairs = np.stack([to_uint8(x[:k]), to_uint8(rec[:k])], axis=1).reshape(2 * k, *x.shape[1:])
        return {"reconstructions": make_grid(pairs, ncol=8)}, metrics

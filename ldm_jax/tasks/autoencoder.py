"""First-stage task: a KL or VQ autoencoder trained to the LDM paper's recipe.

Reconstruction: per-pixel ``l1_weight * |x - x'| + l2_weight * (x - x')^2`` plus ``perceptual_weight`` x LPIPS
(VGG16 trunk from ``loss.lpips_vgg_weights``; 0 turns the term off, and a positive weight without weights is a
config error). KL models (``LPIPSWithDiscriminator``): nll = sum over pixels of rec / exp(logvar) + logvar, per
image, with a learned scalar log-variance, plus ``kl_weight`` x KL. VQ models (``VQLPIPSWithDiscriminator``):
nll = mean rec, plus ``codebook_weight`` x (codebook + ``commitment_beta`` x commitment), or an EMA codebook.
The patch discriminator and the adaptive weight are in ``ldm_jax.training.gan``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from ldm_jax.data import pipeline
from ldm_jax.evaluation import image_metrics
from ldm_jax.imaging import make_grid, to_uint8
from ldm_jax.models.autoencoder import AutoencoderKL
from ldm_jax.models.discriminator import NLayerDiscriminator
from ldm_jax.models.vq import VQModel
from ldm_jax.training import gan, transfer
from ldm_jax.training.optim import make_optimizer
from ldm_jax.training.sharding import batch_sharding, make_mesh

PREVIEW_EXAMPLES = 16
EVAL_EXAMPLES = 256
EVAL_CHUNK = 32
CODEBOOK_UPDATES = ("loss", "ema")
EMA_CODEBOOK_EPS = 1e-5


def build_autoencoder(model_config, dtype: str = "float32"):
    """The first-stage module of a config's ``model`` section: ``AutoencoderKL`` or (``kind="vq"``) ``VQModel``."""
    m = dict(model_config)
    common = dict(
        block_out_channels=tuple(m["block_out_channels"]),
        layers_per_block=m["layers_per_block"],
        latent_channels=m["latent_channels"],
        norm_groups=m["norm_groups"],
        mid_attention=m.get("mid_attention", True),
        remat_policy=m.get("remat_policy", "none"),  # converted models' fields lack it
        dtype=jnp.dtype(dtype),
    )
    kind = m.get("kind", "kl")
    if kind == "vq":
        return VQModel(embed_dim=m["embed_dim"], num_codes=m["num_codes"], l2_codes=m.get("l2_codes", False), **common)
    if kind != "kl":
        raise ValueError(f"model.kind={kind!r}: must be 'kl' or 'vq'")
    return AutoencoderKL(init_logvar=m.get("init_logvar", 0.0), **common)


def latent_channels(model_config) -> int:
    """Channels of the latents a first stage hands the diffusion model: the code width of a VQ model (its
    pre-quantisation latents), the posterior's channels of a KL one."""
    m = dict(model_config)
    return int(m["embed_dim"] if m.get("kind", "kl") == "vq" else m["latent_channels"])


def psnr(x: jax.Array, y: jax.Array) -> jax.Array:
    """Mean PSNR in dB of images in [-1, 1] (peak-to-peak range 2), in-graph for training metrics: [B, H, W, C] ->
    scalar. Reported evaluation numbers use ``evaluation.image_metrics`` on uint8 images."""
    mse = jnp.mean(jnp.square(jnp.clip(x, -1, 1) - jnp.clip(y, -1, 1)), axis=(1, 2, 3))
    return jnp.mean(10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-10)))


def decoder_last_layer(params):
    """The weight the adaptive GAN weight is measured at: the decoder's output convolution kernel."""
    return params["decoder"]["conv_out"]["kernel"]


def ema_codebook_update(params, stats: dict, aux: dict, decay: float):
    """Codes moved to the running mean of the latents assigned to them (van den Oord et al. 2017, appendix;
    Laplace-smoothed counts). Statistics start at count 1 and sum = the initial code, so an unused code stays
    where it is instead of collapsing to zero or blowing up."""
    num_codes = stats["cluster_size"].shape[0]
    z = aux["_z"].reshape(-1, aux["_z"].shape[-1])
    idx = aux["_indices"].reshape(-1)
    # segment_sum, not a one-hot matmul: [N, K] one-hots are gigabytes at pod batch sizes with 16k codes.
    counts = jax.ops.segment_sum(jnp.ones_like(idx, jnp.float32), idx, num_codes)
    sums = jax.ops.segment_sum(z, idx, num_codes)
    cluster = decay * stats["cluster_size"] + (1.0 - decay) * counts
    embed_sum = decay * stats["embed_sum"] + (1.0 - decay) * sums
    n = jnp.sum(cluster)
    smoothed = (cluster + EMA_CODEBOOK_EPS) / (n + num_codes * EMA_CODEBOOK_EPS) * n
    codes = (embed_sum / smoothed[:, None]).astype(params["quantize"]["embedding"].dtype)
    params = {**params, "quantize": {**params["quantize"], "embedding": codes}}
    return params, {"cluster_size": cluster, "embed_sum": embed_sum}


class AutoencoderTask:
    uses_tokens = False

    def __init__(self, config):
        self.config = config
        self.kind = config.model.kind
        self.model = build_autoencoder(config.model, config.dtype)
        d = config.disc
        self.disc = (
            NLayerDiscriminator(d.n_layers, d.base_channels, d.norm, dtype=jnp.dtype(config.dtype))
            if d.enabled
            else None
        )
        self._lpips = None
        self._eval_images = None
        self._eval_fns = {}  # mesh -> the jitted evaluation step on it

    # --- parameters and state -------------------------------------------------------------------------------
    def init_params(self, rng: jax.Array):
        s = self.config.data.image_size
        x = jnp.zeros((1, s, s, 3), jnp.float32)
        args = (x,) if self.kind == "vq" else (x, rng)
        return self.model.init({"params": rng}, *args)["params"]

    def init_state(self, rng: jax.Array, tx, disc_tx) -> gan.GANTrainState:
        ae_rng, disc_rng = jax.random.split(rng)
        params = self.init_params(ae_rng)
        s = self.config.data.image_size
        disc_params = (
            self.disc.init(disc_rng, jnp.zeros((1, s, s, 3), jnp.float32))["params"] if self.disc is not None else {}
        )
        loss_params = {"logvar": jnp.asarray(self.config.loss.logvar_init, jnp.float32)} if self.kind == "kl" else {}
        model_state = {}
        if self.kind == "vq" and self.config.loss.codebook_update == "ema":
            codes = params["quantize"]["embedding"].astype(jnp.float32)
            model_state = {"cluster_size": jnp.ones((codes.shape[0],), jnp.float32), "embed_sum": codes}
        return gan.GANTrainState.create_gan(params, loss_params, disc_params, model_state, tx, disc_tx)

    def make_step(self, lr_schedule_total_steps: int):
        """(init_state(rng), the step function to jit) for the training loop."""
        c = self.config
        tx, lr_schedule = make_optimizer(c.optim, lr_schedule_total_steps, c.data.global_batch_size)
        # The discriminator has its own optimizer (and moments) with the same settings, as in the reference.
        disc_tx, _ = make_optimizer(c.optim, lr_schedule_total_steps, c.data.global_batch_size)
        return functools.partial(self.init_state, tx=tx, disc_tx=disc_tx), self.gan_step(tx, disc_tx, lr_schedule)

    def gan_step(self, tx, disc_tx, lr_schedule):
        """``training.gan.gan_train_step`` bound to this task's losses, discriminator and the given optimizers."""
        c = self.config
        disc_apply = None
        if self.disc is not None:
            disc = self.disc
            disc_apply = lambda p, x: disc.apply({"params": p}, x)  # noqa: E731
        update = None
        if self.kind == "vq" and c.loss.codebook_update == "ema":
            update = functools.partial(ema_codebook_update, decay=c.loss.codebook_ema_decay)
        return functools.partial(
            gan.gan_train_step,
            rec_loss_fn=self.rec_loss_fn,
            last_layer=decoder_last_layer,
            disc_apply=disc_apply,
            disc_loss=gan.disc_loss_fn(c.disc.loss),
            disc_start=c.disc.start,
            disc_weight=c.disc.weight,
            disc_factor=c.disc.factor,
            update_model_state=update,
            tx=tx,
            disc_tx=disc_tx,
            lr_schedule=lr_schedule,
            ema_decay=c.optim.ema_decay,
        )

    def setup(self, meta: dict) -> tuple[dict, dict]:
        """Frozen inputs of the step (the LPIPS network when the perceptual term is on) and metadata to checkpoint."""
        frozen = {}
        if self.config.loss.perceptual_weight > 0:
            frozen["lpips"] = self.lpips_params()
        else:
            logging.warning(
                "loss.perceptual_weight=0: the LPIPS term is off (reconstruction is pixel loss only); set "
                "loss.lpips_vgg_weights to a VGG16 file and loss.perceptual_weight > 0 for the paper's recipe"
            )
        return frozen, {}

    def lpips_params(self):
        if self._lpips is None:
            from ldm_jax.interop.lpips_weights import load_lpips_params

            loss = self.config.loss
            try:
                self._lpips = load_lpips_params(loss.lpips_vgg_weights, loss.lpips_heads)
            except (OSError, ValueError) as e:
                raise ValueError(f"loss.lpips_vgg_weights={loss.lpips_vgg_weights!r}: {e}") from e
        return self._lpips

    # --- losses ---------------------------------------------------------------------------------------------
    def rec_loss_fn(self, params, loss_params, frozen, batch, rng):
        """(nll, regulariser, reconstructions, metrics) of a batch; see the module docstring for the terms."""
        c = self.config.loss
        x = batch["image"]
        if self.kind == "vq":
            rec, q = self.model.apply({"params": params}, x)
        else:
            rec, posterior = self.model.apply({"params": params}, x, rng)
        diff = x - rec
        pixel = c.l1_weight * jnp.abs(diff) + c.l2_weight * jnp.square(diff)  # [B, H, W, C]
        aux = {"l1": jnp.mean(jnp.abs(diff)), "psnr": psnr(rec, x)}
        if c.perceptual_weight > 0:
            from ldm_jax.models.lpips import lpips_distance

            p = lpips_distance(frozen["lpips"], x, rec)  # [B]
            pixel = pixel + c.perceptual_weight * p[:, None, None, None]
            aux["lpips"] = jnp.mean(p)
        if self.kind == "kl":
            logvar = loss_params["logvar"]
            if not c.learn_logvar:
                logvar = jax.lax.stop_gradient(logvar)
            # Summed over pixels, averaged over the batch, as the reference: the KL weight is relative to this sum.
            nll = jnp.sum(pixel / jnp.exp(logvar) + logvar) / x.shape[0]
            kl = jnp.mean(posterior.kl())
            aux.update(kl=kl, logvar=logvar)
            return nll, c.kl_weight * kl, rec, aux
        nll = jnp.mean(pixel)
        if c.codebook_update == "ema":
            # The codes move by EMA, not by gradient: only the commitment term trains the encoder.
            qloss = c.commitment_beta * q.commitment_loss
        else:
            qloss = q.codebook_loss + c.commitment_beta * q.commitment_loss
        aux.update(codebook_loss=q.codebook_loss, commitment=q.commitment_loss, perplexity=q.perplexity)
        aux.update(_z=q.z, _indices=q.indices)
        return nll, c.codebook_weight * qloss, rec, aux

    # --- evaluation -----------------------------------------------------------------------------------------
    def _eval_step(self, mesh):
        """Jitted ``(params, lpips params | None, images [B, H, W, 3]) -> (reconstructions, VQ code indices | None,
        LPIPS distances [B] | None)``: posterior-mode (KL) or quantised (VQ) reconstructions, rows split over
        ``mesh`` (the inputs are already placed there)."""
        if mesh not in self._eval_fns:
            model, vq = self.model, self.kind == "vq"

            def fn(p, lpips_params, x):
                if vq:
                    rec, q = model.apply({"params": p}, x)
                    idx = q.indices
                else:
                    rec, idx = model.apply({"params": p}, x, jax.random.key(0), sample_posterior=False)[0], None
                dist = None
                if lpips_params is not None:
                    from ldm_jax.models.lpips import lpips_distance

                    dist = lpips_distance(lpips_params, x, rec)
                return rec, idx, dist

            self._eval_fns[mesh] = jax.jit(fn, out_shardings=batch_sharding(mesh))
        return self._eval_fns[mesh]

    def evaluate(self, params, images: np.ndarray, frozen=None, mesh=None) -> tuple[np.ndarray, dict]:
        """uint8 reconstructions of float images [N, H, W, 3] in [-1, 1] and their metrics (PSNR, SSIM, L1, LPIPS
        when ``frozen`` holds its network, codebook usage for VQ).

        Chunks of the images are split over ``mesh`` (default: every device of this process) and gathered back, so
        this works when ``mesh`` spans processes; ``params`` (and ``frozen``) must live on ``mesh`` or be
        uncommitted (e.g. fresh from ``init_params``). Every process passes the same images and gets every
        reconstruction. Chunks bound memory at large image sizes; the last is padded with repeats, so one program
        serves every chunk."""
        mesh = make_mesh() if mesh is None else mesh
        step = self._eval_step(mesh)
        rows = batch_sharding(mesh)
        chunk = -(-EVAL_CHUNK // mesh.size) * mesh.size
        lpips_params = (frozen or {}).get("lpips")
        recs, codes, dists = [], [], []
        for i in range(0, images.shape[0], chunk):
            x = images[i : i + chunk]
            k = x.shape[0]
            x = np.concatenate([x, np.repeat(x[-1:], chunk - k, axis=0)])
            rec, idx, dist = transfer.to_host(step(params, lpips_params, transfer.to_mesh(x, rows)))
            recs.append(rec[:k])
            if idx is not None:
                codes.append(idx[:k].ravel())
            if dist is not None:
                dists.append(dist[:k])
        rec = np.concatenate(recs)
        rec_u8, orig_u8 = to_uint8(rec), to_uint8(images)
        metrics = {
            "psnr": float(np.mean(image_metrics.psnr(rec_u8, orig_u8))),
            "l1": float(np.mean(np.abs(np.clip(rec, -1, 1) - images))),
        }
        if min(images.shape[1:3]) >= 11:
            metrics["ssim"] = float(np.mean(image_metrics.ssim(rec_u8, orig_u8)))
        if dists:
            metrics["lpips"] = float(np.mean(np.concatenate(dists)))
        if codes:
            usage = np.bincount(np.concatenate(codes), minlength=self.config.model.num_codes) / sum(map(len, codes))
            nz = usage[usage > 0]
            metrics["codebook_used_fraction"] = float(np.mean(usage > 0))
            metrics["perplexity"] = float(np.exp(-np.sum(nz * np.log(nz))))
        return rec_u8, metrics

    def preview(self, params, frozen, mesh) -> tuple[dict, dict]:
        """Reconstructions of fixed validation images and their metrics (the EMA weights the loop passes)."""
        if self._eval_images is None:
            self._eval_images = pipeline.first_images(self.config.data, "validation", EVAL_EXAMPLES)
        x = self._eval_images
        rec, metrics = self.evaluate(params, x, frozen, mesh)
        k = min(PREVIEW_EXAMPLES, x.shape[0])
        pairs = np.stack([to_uint8(x[:k]), rec[:k]], axis=1).reshape(2 * k, *x.shape[1:])
        return {"reconstructions": make_grid(pairs, ncol=8)}, {f"eval/{k}": v for k, v in metrics.items()}

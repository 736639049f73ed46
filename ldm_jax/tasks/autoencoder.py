"""First-stage task: a KL or VQ autoencoder trained to the LDM paper's recipe.

Reconstruction: per-pixel ``l1_weight * |x - x'| + l2_weight * (x - x')^2`` plus ``perceptual_weight`` x LPIPS
(VGG16 trunk from ``loss.lpips_vgg_weights``; 0 turns the term off, and a positive weight without weights is a
config error). KL models (``LPIPSWithDiscriminator``): nll = sum over pixels of rec / exp(logvar) + logvar, per
image, with a learned scalar log-variance, plus ``kl_weight`` x KL. VQ models (``VQLPIPSWithDiscriminator``):
nll = mean rec, plus ``codebook_weight`` x (codebook + ``commitment_beta`` x commitment), or an EMA codebook.
The patch discriminator and the adaptive weight are in ``ldm_jax.training.gan``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from ldm_jax import config_lib
from ldm_jax.data import pipeline
from ldm_jax.evaluation import image_metrics
from ldm_jax.imaging import make_grid, to_uint8
from ldm_jax.models.discriminator import NORMS, NLayerDiscriminator, min_image_size
from ldm_jax.models.first_stage import build_autoencoder, model_config
from ldm_jax.tasks.protocol import EvalInputs, SampleInputs
from ldm_jax.training import checkpoint, gan, transfer
from ldm_jax.training.optim import make_optimizer
from ldm_jax.training.sharding import batch_sharding, make_mesh, replicated

PREVIEW_EXAMPLES = 16
EVAL_EXAMPLES = 256
EVAL_CHUNK = 32
CODEBOOK_UPDATES = ("loss", "ema")
EMA_CODEBOOK_EPS = 1e-5


@dataclasses.dataclass(frozen=True, kw_only=True)
class _LossCommon(config_lib.Section):
    l1_weight: float = 1.0  # per-pixel |x - x'|, the reference's pixel loss
    l2_weight: float = 0.0  # per-pixel (x - x')^2, not in the reference; brings flat colours back faster in short runs
    perceptual_weight: float = 1.0  # LPIPS; 0 turns the term off (explicitly: a positive weight needs weights below)
    lpips_vgg_weights: str = ""  # VGG16 trunk, torchvision layout (.safetensors / .npz, or .pth where torch exists)
    lpips_heads: str = ""  # LPIPS linear heads; "" = the published v0.1 heads shipped with ldm_jax

    def validate(self, prefix: str) -> None:
        for name in ("l1_weight", "l2_weight", "perceptual_weight"):
            self.check(getattr(self, name) >= 0, prefix, name, "must be >= 0")
        self.check(
            self.l1_weight + self.l2_weight + self.perceptual_weight > 0,
            prefix,
            "l1_weight",
            "l1_weight + l2_weight + perceptual_weight must be > 0",
        )
        if self.perceptual_weight > 0:
            self.check(
                bool(self.lpips_vgg_weights),
                prefix,
                "lpips_vgg_weights",
                f"{prefix}perceptual_weight={self.perceptual_weight} needs VGG16 weights (torchvision layout; "
                "convert vgg16-397923af.pth to .safetensors) or set loss.perceptual_weight=0 to train without the "
                "LPIPS term",
            )
            self.check(os.path.isfile(self.lpips_vgg_weights), prefix, "lpips_vgg_weights", "no such file")


@dataclasses.dataclass(frozen=True, kw_only=True)
class KLLossConfig(_LossCommon):
    """``config.loss`` of a KL first stage (LDM's LPIPSWithDiscriminator)."""

    kl_weight: float = 1e-6  # relative to the per-image sum of the reconstruction term, as in the reference
    logvar_init: float = 0.0
    learn_logvar: bool = True  # the reference declares it learned but leaves it out of its optimizer

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        self.check(self.kl_weight >= 0, prefix, "kl_weight", "must be >= 0")


@dataclasses.dataclass(frozen=True, kw_only=True)
class VQLossConfig(_LossCommon):
    """``config.loss`` of a VQ first stage (LDM's VQLPIPSWithDiscriminator)."""

    codebook_weight: float = 1.0
    commitment_beta: float = 0.25  # beta * ||z - sg(e)||^2 pulls the encoder to its codes
    codebook_update: str = "loss"  # "loss": codes move by the codebook loss; "ema": running means of assignments
    codebook_ema_decay: float = 0.99

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        self.check(self.codebook_weight >= 0, prefix, "codebook_weight", "must be >= 0")
        self.check(self.commitment_beta >= 0, prefix, "commitment_beta", "must be >= 0")
        self.check(self.codebook_update in CODEBOOK_UPDATES, prefix, "codebook_update",
                   f"must be one of {CODEBOOK_UPDATES}")  # fmt: skip
        self.check(0.0 < self.codebook_ema_decay < 1.0, prefix, "codebook_ema_decay", "must be in (0, 1)")


LOSS_CONFIGS = {"kl": KLLossConfig, "vq": VQLossConfig}


@dataclasses.dataclass(frozen=True, kw_only=True)
class DiscConfig(config_lib.Section):
    """``config.disc``: the patch discriminator and its adversarial term (``ldm_jax.training.gan``)."""

    enabled: bool = True  # False: no discriminator at all (no parameters, no adversarial term)
    start: int  # step from which the adversarial terms count (disc_factor is 0 before)
    weight: float  # multiplies the adaptive weight
    factor: float = 1.0  # disc_factor: scales both players' adversarial losses once started
    loss: str = "hinge"  # or "vanilla" (softplus)
    n_layers: int = 3
    base_channels: int = 64
    norm: str = "batch"  # "batch" (batch statistics of each call, as the reference trains) or "none"

    def validate(self, prefix: str) -> None:
        if not self.enabled:
            return
        self.check(self.loss in gan.DISC_LOSSES, prefix, "loss", f"must be one of {gan.DISC_LOSSES}")
        self.check(self.norm in NORMS, prefix, "norm", f"must be one of {NORMS}")
        for name in ("start", "weight", "factor"):
            self.check(getattr(self, name) >= 0, prefix, name, "must be >= 0")
        self.check(self.base_channels >= 1, prefix, "base_channels", "must be >= 1")
        self.check(self.n_layers >= 1, prefix, "n_layers", "must be >= 1")


def loss_section(kind: str, **overrides):
    return LOSS_CONFIGS[kind].defaults(**overrides)


def disc_section(start: int, weight: float, **overrides):
    return DiscConfig.defaults(start=start, weight=weight, **overrides)


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
    tokenizer = None  # batches carry images only
    label_field = None
    EVAL_OPTIONS = ("fid_weights", "lpips_vgg_weights")
    # The reconstruction metrics (PSNR, SSIM, LPIPS, rFID) come with every preview (``preview``).
    eval_every = 0

    @staticmethod
    def periodic_eval(params, frozen, mesh) -> dict[str, float]:
        return {}

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

    @staticmethod
    def validate(c) -> None:
        """The model, loss and discriminator sections and the rules between them and the data."""
        m = model_config(c.model)
        size = c.data.image_size
        f = m.downsampling_factor
        config_lib.check(size % f == 0, "data.image_size", size, f"must be divisible by the autoencoder's factor f={f}")
        LOSS_CONFIGS[m.kind].from_config(c.loss, "loss.")
        d = DiscConfig.from_config(c.disc, "disc.")
        if d.enabled:
            need = min_image_size(d.n_layers)
            config_lib.check(
                size >= need,
                "disc.n_layers",
                d.n_layers,
                f"gives no logits on {size}px images (needs a side >= 3 * 2**n_layers = {need})",
            )

    # --- parameters and state -------------------------------------------------------------------------------
    def init_params(self, rng: jax.Array):
        s = self.config.data.image_size
        x = jnp.zeros((1, s, s, 3), jnp.float32)
        args = (x,) if self.kind == "vq" else (x, rng)
        return self.model.init({"params": rng}, *args)["params"]

    def init_state(self, rng: jax.Array, tx, disc_tx, params=None) -> gan.GANTrainState:
        """The training state; ``params`` (``init_from``'s weights) replace the autoencoder's random init, and the
        EMA codebook's statistics start from their codes. The discriminator is drawn from ``rng`` either way."""
        ae_rng, disc_rng = jax.random.split(rng)
        if params is None:
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

    trains_from_init = True  # init_from initialises the autoencoder's params

    def train_loader(self, start_step: int):
        """This process's share of every training batch from ``start_step`` on."""
        c = self.config
        return pipeline.make_loader(c.data, "train", c.data.global_batch_size, None, None, start_step=start_step)

    def adapt_init_params(self, params: dict) -> dict:
        return params

    def make_step(self, lr_schedule_total_steps: int):
        """(init_state(rng, params=None), the step function to jit) for the training loop."""
        c = self.config
        tx, lr_schedule = make_optimizer(c.optim, lr_schedule_total_steps, c.data.global_batch_size)
        # The discriminator has its own optimizer (and moments) with the same settings, as in the reference.
        disc_tx, _ = make_optimizer(c.optim, lr_schedule_total_steps, c.data.global_batch_size)

        def init_state(rng, params=None):
            return self.init_state(rng, tx, disc_tx, params)

        return init_state, self.gan_step(tx, disc_tx, lr_schedule)

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
            accum_steps=c.train.grad_accum_steps,
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

    # --- ldm_jax.sample and ldm_jax.evaluate ----------------------------------------------------------------
    def sample_request(self, inputs: SampleInputs):
        raise ValueError(
            "this workdir holds an autoencoder run; sampling needs a txt2img, class_cond, unconditional, inpainting "
            "or superres run"
        )

    def evaluate_workdir(self, workdir: str, inputs: EvalInputs) -> tuple[dict, np.ndarray, str]:
        """Reconstruction quality of the run's EMA weights on ``inputs.split``: PSNR, SSIM, L1, LPIPS (with the
        run's VGG16 weights or ``--lpips_vgg_weights``), rFID (with ``--fid_weights``), codebook usage for VQ."""
        params, _, step = checkpoint.load_trained_params(workdir, "ema")
        mesh = make_mesh()
        params = transfer.to_mesh(params, replicated(mesh))
        frozen, not_computed = {}, {}
        loss = self.config.loss
        given = inputs.lpips_vgg_weights
        vgg = given or (loss.lpips_vgg_weights if loss.perceptual_weight > 0 else "")
        if given and not os.path.isfile(given):
            raise ValueError(f"--lpips_vgg_weights={given!r}: no such file")
        if not vgg:
            not_computed["lpips"] = "no VGG16 weights: the run trained without LPIPS and --lpips_vgg_weights is unset"
        elif not os.path.isfile(vgg):
            # The run's file may live on the machine that trained it; say so in the result rather than fail the rest.
            not_computed["lpips"] = f"the run's loss.lpips_vgg_weights={vgg!r} is not on this machine"
            logging.warning("LPIPS not computed: %s", not_computed["lpips"])
        else:
            loss.lpips_vgg_weights = vgg
            frozen["lpips"] = transfer.to_mesh(self.lpips_params(), replicated(mesh))
        if not inputs.fid_weights:
            not_computed["rfid"] = "--fid_weights unset"
        if inputs.num_examples < 1:
            raise ValueError(f"--num_examples={inputs.num_examples}: must be >= 1")
        images = pipeline.first_images(self.config.data, inputs.split, inputs.num_examples)
        t0 = time.perf_counter()
        rec, metrics = self.evaluate(params, images, frozen, mesh)
        originals = to_uint8(images)
        if inputs.fid_weights:
            metrics["rfid"] = _rfid(inputs.fid_weights, originals, rec)
        result = dict(
            split=inputs.split,
            dataset=self.config.data.name,
            num_examples=int(images.shape[0]),
            checkpoint_step=step,
            seconds=time.perf_counter() - t0,
            autoencoder=metrics,
            not_computed=not_computed,
        )
        k = min(8, images.shape[0])
        logging.info("autoencoder on %s (%d examples): %s", inputs.split, images.shape[0], metrics)
        grid = make_grid(np.concatenate([originals[:k], rec[:k]]), ncol=k)
        return result, grid, f"eval_{inputs.split}"


def _rfid(weights: str, originals, reconstructions, batch: int = 50) -> float:
    """rFID: Fréchet distance between Inception features of the real images and of their reconstructions (uint8,
    as pytorch-fid reads image files). Meaningful with thousands of images; with a few hundred it is biased high."""
    from ldm_jax.evaluation import fid

    try:
        params = fid.load_fid_inception(weights)
    except ValueError as e:
        raise ValueError(f"--fid_weights={weights!r}: {e}") from e
    stats = []
    for images in (originals, reconstructions):
        acc = fid.FeatureStatistics()
        for i in range(0, len(images), batch):
            acc.update(fid.inception_features(params, images[i : i + batch]))
        stats.append((acc.mean(), acc.covariance()))
    return float(fid.frechet_distance(*stats[0], *stats[1]))

"""Forward process and training targets (pure jnp, no networks).

Shapes: x0, noise [B, H, W, C]; t [B] int32.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ldm_jax import config_lib, rng_streams
from ldm_jax.diffusion.schedules import SCHEDULES, NoiseSchedule

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
LOSS_WEIGHTINGS = ("simple", "min_snr", "min_snr_plus_one")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DiffusionConfig(config_lib.Section):
    """``config.diffusion``: the training schedule and objective (Stable Diffusion's by default)."""

    beta_schedule: str = "scaled_linear"
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    rescale_betas_zero_snr: bool = False  # zero terminal SNR (Lin et al. 2024); pair with v_prediction
    prediction_type: str = "epsilon"
    # or "min_snr" (Hang et al. 2023), or "min_snr_plus_one" (its cap on the low-noise steps without zeroing the
    # zero-SNR ones: loss_weights says how)
    loss_weighting: str = "simple"
    min_snr_gamma: float = 5.0
    offset_noise: float = 0.0  # std of a per-channel constant added to the training noise; 0 disables
    cond_drop_prob: float = 0.1  # conditions replaced by the null condition this often, for classifier-free guidance

    def validate(self, prefix: str) -> None:
        self.check(self.beta_schedule in SCHEDULES, prefix, "beta_schedule", f"must be one of {SCHEDULES}")
        self.check(
            self.prediction_type in PREDICTION_TYPES, prefix, "prediction_type", f"must be one of {PREDICTION_TYPES}"
        )
        self.check(self.num_train_timesteps >= 2, prefix, "num_train_timesteps", "must be >= 2")
        if self.beta_schedule != "squaredcos_cap_v2":  # the cosine schedule ignores the two betas
            self.check(0.0 < self.beta_start <= self.beta_end, prefix, "beta_start",
                       f"must be in (0, {prefix}beta_end={self.beta_end}]")  # fmt: skip
            self.check(self.beta_end < 1.0, prefix, "beta_end", "must be < 1 (a beta of 1 leaves no signal)")
        self.check(0.0 <= self.cond_drop_prob < 1.0, prefix, "cond_drop_prob", "must be in [0, 1)")
        self.check(
            self.loss_weighting in LOSS_WEIGHTINGS, prefix, "loss_weighting", f"must be one of {LOSS_WEIGHTINGS}"
        )
        self.check(self.min_snr_gamma > 0, prefix, "min_snr_gamma", "must be > 0")
        self.check(self.offset_noise >= 0, prefix, "offset_noise", "must be >= 0")
        self.check(
            not (self.rescale_betas_zero_snr and self.prediction_type == "epsilon"),
            prefix,
            "rescale_betas_zero_snr",
            "needs prediction_type 'v_prediction' or 'sample': at zero SNR an epsilon model cannot recover x0",
        )
        # min(SNR, gamma) on the x0 error vanishes as SNR -> 0: the zero-SNR schedule's first sampling steps, where
        # the layout is drawn from pure noise, would go untrained. Measured on the shapes demo's f=2 recipe
        # (docs/demo_fidelity.md): held-out position 1.000 with "simple", 0.219 with "min_snr".
        self.check(
            not (self.rescale_betas_zero_snr and self.loss_weighting == "min_snr"),
            prefix,
            "loss_weighting",
            "cannot be 'min_snr' with rescale_betas_zero_snr=True: its weight, min(SNR, gamma) on the x0 error, is 0 "
            "at the zero-SNR steps, which would not be trained; use 'simple' or 'min_snr_plus_one'",
        )
        self.check(
            not (self.loss_weighting == "min_snr_plus_one" and self.prediction_type == "epsilon"),
            prefix,
            "loss_weighting",
            "cannot be 'min_snr_plus_one' with prediction_type 'epsilon': on the epsilon error its weight, "
            "min(SNR + 1, gamma) / SNR, grows without bound as SNR -> 0; use 'min_snr', or predict 'v_prediction'",
        )


def diffusion_section(**overrides):
    return DiffusionConfig.defaults(**overrides)


def _bcast(v: jax.Array, like: jax.Array) -> jax.Array:
    return v.reshape(v.shape + (1,) * (like.ndim - v.ndim))


def add_noise(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """q(x_t | x_0): sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
    abar = _bcast(schedule.alphas_cumprod[t], x0)
    return jnp.sqrt(abar) * x0 + jnp.sqrt(1.0 - abar) * noise


def training_target(prediction_type: str, schedule: NoiseSchedule, x0, noise, t) -> jax.Array:
    """What the network is trained to output for ``prediction_type``."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x0
    if prediction_type == "v_prediction":
        abar = _bcast(schedule.alphas_cumprod[t], x0)
        return jnp.sqrt(abar) * noise - jnp.sqrt(1.0 - abar) * x0
    raise ValueError(f"prediction_type={prediction_type!r}: must be one of {PREDICTION_TYPES}")


def predict_x0_eps(prediction_type: str, alpha_bar: jax.Array, x_t: jax.Array, model_out: jax.Array):
    """Converts a model output to (x0, eps) given abar_t (scalar or broadcastable to x_t)."""
    sa, sb = jnp.sqrt(alpha_bar), jnp.sqrt(1.0 - alpha_bar)
    if prediction_type == "epsilon":
        eps = model_out
        return (x_t - sb * eps) / sa, eps
    if prediction_type == "sample":
        x0 = model_out
        return x0, (x_t - sa * x0) / sb
    if prediction_type == "v_prediction":
        return sa * x_t - sb * model_out, sa * model_out + sb * x_t
    raise ValueError(f"prediction_type={prediction_type!r}: must be one of {PREDICTION_TYPES}")


def per_example_loss(model_out: jax.Array, target: jax.Array) -> jax.Array:
    """Mean squared error of each example [B], in float32."""
    return jnp.mean(jnp.square(model_out.astype(jnp.float32) - target), axis=tuple(range(1, target.ndim)))


def diffusion_loss(model_out: jax.Array, target: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """``per_example_loss`` averaged over the batch with optional per-example weights [B]."""
    per_example = per_example_loss(model_out, target)
    if weights is not None:
        per_example = per_example * weights
    return jnp.mean(per_example)


def snr(schedule: NoiseSchedule, t: jax.Array) -> jax.Array:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at integer timesteps t [B]."""
    abar = schedule.alphas_cumprod[t]
    return abar / (1.0 - abar)


def loss_weights(weighting: str, prediction_type: str, schedule: NoiseSchedule, t: jax.Array, gamma: float = 5.0):
    """Per-example MSE weights [B].

    ``simple``: 1 (Ho et al.). ``min_snr``: Hang et al. 2023's min(SNR, gamma) weight on the x0 error, expressed for
    the target actually regressed: / SNR for epsilon, / (SNR + 1) for v, as is for x0. At SNR = 0 (a zero-terminal-
    SNR schedule's last step) the epsilon weight takes its limit 1.

    ``min_snr_plus_one``: min(SNR + 1, gamma) on the x0 error, i.e. min(1, gamma / (SNR + 1)) on the v error (the
    form early diffusers training scripts used for v-prediction): the low-noise steps (SNR > gamma - 1) are capped as
    min-SNR caps them, while the noisiest steps keep the plain v loss, 1 at SNR = 0, where min-SNR's weight is 0.
    Not for epsilon (its weight, / SNR, is unbounded as SNR -> 0; ``DiffusionConfig.validate`` refuses the pair).
    """
    if weighting == "simple":
        return jnp.ones(t.shape, jnp.float32)
    if weighting not in ("min_snr", "min_snr_plus_one"):
        raise ValueError(f"loss_weighting={weighting!r}: must be one of {LOSS_WEIGHTINGS}")
    s = snr(schedule, t)
    if weighting == "min_snr_plus_one" and prediction_type == "epsilon":
        raise ValueError("loss_weighting='min_snr_plus_one' needs prediction_type 'v_prediction' or 'sample'")
    x0_weight = jnp.minimum(s + 1.0 if weighting == "min_snr_plus_one" else s, gamma)
    if prediction_type == "epsilon":
        return jnp.where(s > 0, x0_weight / jnp.where(s > 0, s, 1.0), 1.0)
    if prediction_type == "v_prediction":
        return x0_weight / (s + 1.0)
    if prediction_type == "sample":
        return x0_weight
    raise ValueError(f"prediction_type={prediction_type!r}: must be one of {PREDICTION_TYPES}")


def sample_noise(rng: jax.Array, shape: tuple, offset: float = 0.0, dtype=jnp.float32) -> jax.Array:
    """Training noise; ``offset`` > 0 adds a per-example, per-channel constant (Guttenberg's offset noise).

    The constant shift lets the model learn to change an image's mean brightness, which plain noise at the final
    timesteps almost never asks of it.
    """
    noise = jax.random.normal(rng, shape, dtype)
    if offset:
        b, c = shape[0], shape[-1]
        shift = jax.random.normal(
            jax.random.fold_in(rng, rng_streams.OFFSET_NOISE_SHIFT), (b,) + (1,) * (len(shape) - 2) + (c,), dtype
        )
        noise = noise + offset * shift
    return noise

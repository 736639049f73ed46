"""Forward process and training targets (pure jnp, no networks).

Shapes: x0, noise [B, H, W, C]; t [B] int32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ldm_jax.diffusion.schedules import NoiseSchedule

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


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


def diffusion_loss(model_out: jax.Array, target: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """Mean squared error per example, averaged over the batch with optional per-example weights [B]."""
    per_example = jnp.mean(jnp.square(model_out.astype(jnp.float32) - target), axis=tuple(range(1, target.ndim)))
    if weights is not None:
        per_example = per_example * weights
    return jnp.mean(per_example)

"""Samplers as ``jax.lax.scan`` loops over a pure step, plus classifier-free guidance.

A model function is ``model_fn(x_t [B, H, W, C], t [B] int32) -> model output [B, H, W, C]`` (epsilon, v or x0,
per ``prediction_type``). Timestep tables are computed on the host from static arguments, so one compiled program
serves every prompt, seed and guidance scale for a given (sampler, steps, shape).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.diffusion.objectives import predict_x0_eps
from ldm_jax.diffusion.schedules import NoiseSchedule

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]
SPACINGS = ("leading", "trailing", "linspace")


def inference_timesteps(num_train_timesteps: int, num_steps: int, spacing: str = "leading", steps_offset: int = 1):
    """Descending timesteps used at inference, as diffusers' ``set_timesteps`` computes them."""
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps={num_steps}: must be in [1, {num_train_timesteps}]")
    if spacing == "leading":
        ratio = num_train_timesteps // num_steps
        ts = (np.arange(num_steps) * ratio).round()[::-1].astype(np.int64) + steps_offset
    elif spacing == "trailing":
        ratio = num_train_timesteps / num_steps
        ts = np.round(np.arange(num_train_timesteps, 0, -ratio)).astype(np.int64) - 1
    elif spacing == "linspace":
        ts = np.linspace(0, num_train_timesteps - 1, num_steps).round()[::-1].astype(np.int64)
    else:
        raise ValueError(f"timestep_spacing={spacing!r}: must be one of {SPACINGS}")
    return ts


class DDIMTables(NamedTuple):
    timesteps: np.ndarray  # [S] int, descending
    alpha_t: np.ndarray  # [S]
    alpha_prev: np.ndarray  # [S]


def ddim_tables(schedule: NoiseSchedule, num_steps: int, spacing="leading", steps_offset=1, set_alpha_to_one=False):
    abar = np.asarray(schedule.alphas_cumprod, dtype=np.float32)
    n = schedule.num_train_timesteps
    ts = inference_timesteps(n, num_steps, spacing, steps_offset)
    # DDIMScheduler steps back by a fixed n // num_steps whatever the spacing.
    prev = ts - n // num_steps
    final = np.float32(1.0) if set_alpha_to_one else abar[0]
    alpha_prev = np.where(prev >= 0, abar[np.clip(prev, 0, n - 1)], final).astype(np.float32)
    return DDIMTables(ts, abar[ts], alpha_prev)


def ddim_sample(
    model_fn: ModelFn,
    schedule: NoiseSchedule,
    x_T: jax.Array,
    num_steps: int,
    rng: jax.Array,
    eta: float | jax.Array = 0.0,
    prediction_type: str = "epsilon",
    spacing: str = "leading",
    steps_offset: int = 1,
    set_alpha_to_one: bool = False,
    return_intermediates: bool = False,
):
    """DDIM (Song et al. 2021); ``eta=0`` is deterministic, ``eta=1`` matches DDPM's variance.

    Returns the final sample [B, H, W, C], or ``(final, [S, B, H, W, C] per-step samples)`` when
    ``return_intermediates``.
    """
    tables = ddim_tables(schedule, num_steps, spacing, steps_offset, set_alpha_to_one)
    batch = x_T.shape[0]
    keys = jax.random.split(rng, num_steps)

    def step(x, inputs):
        t, a_t, a_prev, key = inputs
        out = model_fn(x, jnp.full((batch,), t, dtype=jnp.int32))
        x0, eps = predict_x0_eps(prediction_type, a_t, x, out)
        var = (1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)
        std = eta * jnp.sqrt(var)
        direction = jnp.sqrt(jnp.maximum(1.0 - a_prev - std**2, 0.0)) * eps
        x_prev = jnp.sqrt(a_prev) * x0 + direction + std * jax.random.normal(key, x.shape, x.dtype)
        return x_prev, (x_prev if return_intermediates else None)

    xs = (jnp.asarray(tables.timesteps, jnp.int32), jnp.asarray(tables.alpha_t), jnp.asarray(tables.alpha_prev), keys)
    final, inter = jax.lax.scan(step, x_T, xs)
    return (final, inter) if return_intermediates else final


def classifier_free_guidance(
    apply_fn: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
    cond_context: jax.Array,
    uncond_context: jax.Array,
    guidance_scale: jax.Array | float,
) -> ModelFn:
    """Wraps ``apply_fn(x, t, context)`` into a guided model function.

    The conditional and unconditional passes run as one batched call (2B rows):
    ``out = uncond + scale * (cond - uncond)``.
    """

    def model_fn(x, t):
        out = apply_fn(
            jnp.concatenate([x, x], axis=0),
            jnp.concatenate([t, t], axis=0),
            jnp.concatenate([uncond_context, cond_context], axis=0),
        )
        uncond, cond = jnp.split(out, 2, axis=0)
        return uncond + guidance_scale * (cond - uncond)

    return model_fn

"""Classifier-free guidance (Ho & Salimans 2022) with guidance rescale (Lin et al. 2024), pure jnp.

The conditional and unconditional passes run as one network call on 2B rows; the "unconditional" condition is
whatever the caller passes (the empty prompt, a negative prompt, the null class).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from ldm_jax.diffusion.samplers import ModelFn


def validate_guidance(guidance_scale: float, guidance_rescale: float, prefix: str = "sample.") -> None:
    """The guidance settings of a ``config.sample`` section (or of flags, with ``prefix="--"``)."""
    if not guidance_scale >= 0:
        raise ValueError(f"{prefix}guidance_scale={guidance_scale!r}: must be >= 0")
    if not 0.0 <= guidance_rescale <= 1.0:
        raise ValueError(f"{prefix}guidance_rescale={guidance_rescale!r}: must be in [0, 1]")


def rescale_guided(guided: jax.Array, cond: jax.Array, rescale: jax.Array | float) -> jax.Array:
    """Blends ``guided`` with a copy rescaled to the conditional output's per-example std (over H, W, C).

    This undoes the over-exposure large guidance scales cause with zero-terminal-SNR schedules; ``rescale`` = 0 is
    plain guidance. (diffusers' rescale_noise_cfg uses the unbiased std; the ratio of the two stds is the same.)
    """
    if isinstance(rescale, (int, float)) and rescale == 0:
        return guided
    axes = tuple(range(1, guided.ndim))
    std_guided = jnp.std(guided, axis=axes, keepdims=True)
    ratio = jnp.where(std_guided > 0, jnp.std(cond, axis=axes, keepdims=True) / std_guided, 1.0)
    return rescale * (guided * ratio) + (1.0 - rescale) * guided


def classifier_free_guidance(
    apply_fn: Callable[[jax.Array, jax.Array, Any], jax.Array],
    cond: Any,
    uncond: Any,
    guidance_scale: jax.Array | float,
    guidance_rescale: jax.Array | float = 0.0,
) -> ModelFn:
    """Wraps ``apply_fn(x, t, condition)`` into a guided model function ``fn(x, t)``.

    ``cond`` and ``uncond`` are pytrees of per-example conditions (text embeddings [B, L, D], class ids [B], ...):
    ``out = uncond + scale * (cond - uncond)``, then optionally rescaled.
    """

    def model_fn(x, t):
        both = jax.tree.map(lambda u, c: jnp.concatenate([u, c], axis=0), uncond, cond)
        out = apply_fn(jnp.concatenate([x, x], axis=0), jnp.concatenate([t, t], axis=0), both)
        out_uncond, out_cond = jnp.split(out, 2, axis=0)
        guided = out_uncond + guidance_scale * (out_cond - out_uncond)
        return rescale_guided(guided, out_cond, guidance_rescale)

    return model_fn

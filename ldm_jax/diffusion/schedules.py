"""Discrete-time noise schedules (pure jnp).

A schedule is the per-timestep table ``alphas_cumprod[t] = prod_{s<=t} (1 - beta_s)`` for t in [0, T). Values match
diffusers' ``DDPMScheduler`` for the same ``beta_schedule`` name.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


class NoiseSchedule(NamedTuple):
    betas: jax.Array  # [T] float32
    alphas_cumprod: jax.Array  # [T] float32

    @property
    def num_train_timesteps(self) -> int:
        return self.betas.shape[0]


def _betas(kind: str, num_train_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
    if kind == "linear":
        return np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)
    if kind == "scaled_linear":
        # Linear in sqrt(beta): the LDM / Stable Diffusion schedule.
        return np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float64) ** 2
    if kind == "squaredcos_cap_v2":
        # Nichol & Dhariwal's cosine schedule with betas capped at 0.999.
        f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        n = num_train_timesteps
        return np.array([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)], dtype=np.float64)
    raise ValueError(f"beta_schedule={kind!r}: must be one of {SCHEDULES}")


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2024 (Algorithm 1): shift and scale sqrt(abar) so the last timestep has zero SNR.

    The first timestep keeps its value; the model then sees pure noise at t = T - 1, which only v- or x0-prediction
    can handle (epsilon has no signal to predict x0 from there).
    """
    abar_sqrt = np.sqrt(np.cumprod(1.0 - betas, dtype=betas.dtype))
    first, last = abar_sqrt[0].copy(), abar_sqrt[-1].copy()
    abar_sqrt = (abar_sqrt - last) * (first / (first - last))
    abar = abar_sqrt**2
    alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return (1.0 - alphas).astype(betas.dtype)


def make_schedule(
    kind: str = "scaled_linear",
    num_train_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    rescale_betas_zero_snr: bool = False,
) -> NoiseSchedule:
    """Builds the schedule table (betas computed in float64 on the host, stored as float32 like diffusers)."""
    if num_train_timesteps < 2:
        raise ValueError(f"num_train_timesteps={num_train_timesteps}: must be >= 2")
    betas = _betas(kind, num_train_timesteps, beta_start, beta_end)
    if rescale_betas_zero_snr:
        # In float64: the rescale differences nearby square roots, which float32 (diffusers) resolves to ~1e-3.
        betas = rescale_zero_terminal_snr(betas)
    betas = betas.astype(np.float32)
    alphas_cumprod = np.cumprod(1.0 - betas, dtype=np.float32)
    return NoiseSchedule(jnp.asarray(betas), jnp.asarray(alphas_cumprod))


def schedule_from_config(d) -> NoiseSchedule:
    """The schedule a ``config.diffusion`` block names."""
    return make_schedule(d.beta_schedule, d.num_train_timesteps, d.beta_start, d.beta_end, d.rescale_betas_zero_snr)

"""Euler and Euler-ancestral samplers in sigma space (Karras et al. 2022), as diffusers' EulerDiscreteScheduler and
EulerAncestralDiscreteScheduler (no churn).

The state is ``x = x0 + sigma * eps``; the network sees ``x / sqrt(sigma^2 + 1)``, the variance-preserving sample.
Timesteps may be fractional (linspace spacing, Karras sigmas); the UNet's sinusoidal embedding takes them as floats.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ldm_jax.diffusion.samplers.base import Sampler, spaced_timesteps
from ldm_jax.diffusion.samplers.sigmas import karras, schedule_sigmas, sigma_to_t


def euler_timesteps(n_train: int, num_steps: int, spacing: str, steps_offset: int) -> np.ndarray:
    if spacing == "linspace":
        return np.linspace(0, n_train - 1, num_steps, dtype=np.float32)[::-1].copy()
    if spacing == "leading":
        ratio = n_train // num_steps
        return (np.arange(num_steps) * ratio).round()[::-1].astype(np.float32) + steps_offset
    return spaced_timesteps(n_train, num_steps, "trailing", 0).astype(np.float32)


class _SigmaSampler(Sampler):
    ancestral = False
    spacing_rule = staticmethod(euler_timesteps)

    def __init__(self, options, schedule, first_step=0):
        super().__init__(options, schedule, first_step)
        o = options
        full = schedule_sigmas(self.abar)
        ts = self.spacing_rule(self.n_train, o.num_steps, o.spacing, o.steps_offset)
        sig = np.interp(ts, np.arange(len(full)), full)
        if o.karras_sigmas:
            sig = karras(float(sig[-1]), float(sig[0]), o.num_steps)
            ts = sigma_to_t(sig, np.log(full))
        last = float(full[0]) if o.final_sigmas_type == "sigma_min" else 0.0
        sig = np.concatenate([sig, [last]]).astype(np.float32)
        max_sigma = np.float32(sig.max())
        self.init_noise_sigma = max_sigma if o.spacing in ("linspace", "trailing") else (max_sigma**2 + 1) ** 0.5
        # Per-step quantities are computed on the device in float32 in diffusers' operation order: the first steps
        # of a zero-terminal-SNR schedule (sigma = 4096) cancel large terms, so host float64 would drift from it.
        self.rows = {"t": np.asarray(ts, np.float32), "sigma": sig[:-1], "sigma_next": sig[1:]}
        self.rows = {k: np.asarray(v, np.float32)[first_step:] for k, v in self.rows.items()}

    def start(self, noise, x0=None):
        if x0 is None:
            return {"x": noise * np.float32(self.init_noise_sigma)}
        return {"x": self.noised(x0, noise, 0)}

    def noise_levels(self):
        return np.ones_like(self.rows["sigma"]), self.rows["sigma"]

    def model_input(self, state, row):
        return state["x"] / jnp.sqrt(row["sigma"] ** 2 + 1)

    def step(self, state, row, out, noise):
        x, sigma = state["x"], row["sigma"]
        pred = self.options.prediction_type
        if pred == "epsilon":
            x0 = x - sigma * out
        elif pred == "v_prediction":
            x0 = out * (-sigma / jnp.sqrt(sigma**2 + 1)) + x / (sigma**2 + 1)
        else:
            x0 = out
        sigma_next = row["sigma_next"]
        if self.ancestral:
            sigma_up = jnp.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
            sigma_next = jnp.sqrt(sigma_next**2 - sigma_up**2)  # sigma_down
        x = x + (x - x0) / sigma * (sigma_next - sigma)
        if self.ancestral:
            x = x + noise * sigma_up
        return {"x": x}


class Euler(_SigmaSampler):
    pass


class EulerAncestral(_SigmaSampler):
    ancestral = True
    stochastic = True

    @classmethod
    def check_options(cls, options, prefix):
        if options.karras_sigmas:
            raise ValueError(f"{prefix}karras_sigmas=True: supported by dpmpp_2m and euler, not euler_ancestral")
        if options.final_sigmas_type != "zero":
            raise ValueError(f"{prefix}final_sigmas_type={options.final_sigmas_type!r}: euler_ancestral ends at 0")

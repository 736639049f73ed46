"""Noise levels sigma = sqrt((1 - alpha_bar) / alpha_bar) for the sigma-parameterised samplers (DPM-Solver++, Euler).

Karras et al. (2022) spacing and the sigma -> fractional timestep inverse follow diffusers' helpers exactly.
"""

from __future__ import annotations

import numpy as np

# diffusers pins the last alpha_bar of a zero-terminal-SNR schedule to 2^-24 so sigma stays finite.
ZERO_SNR_ALPHA_BAR = 2.0**-24


def schedule_sigmas(abar: np.ndarray) -> np.ndarray:
    """[T] ascending sigmas of the float32 alpha_bar table, computed in float32 as diffusers does."""
    abar = np.asarray(abar, np.float32).copy()
    if abar[-1] == 0.0:
        abar[-1] = ZERO_SNR_ALPHA_BAR
    return ((1 - abar) / abar) ** 0.5


def karras(sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0) -> np.ndarray:
    ramp = np.linspace(0, 1, num_steps)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional timestep whose log-sigma interpolates ``sigma`` in the schedule's table."""
    sigma = np.asarray(sigma, np.float64)
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    return ((1 - w) * low + w * (low + 1)).reshape(sigma.shape)


def vp_coefficients(sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(alpha_t, sigma_t) of the variance-preserving process at noise level ``sigma``."""
    alpha = 1.0 / np.sqrt(sigma**2 + 1.0)
    return alpha, sigma * alpha

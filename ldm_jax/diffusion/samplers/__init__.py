"""Samplers, each a ``jax.lax.scan`` over a pure step (see ``base``), matching the diffusers schedulers step for step.

ddpm             DDPMScheduler (ancestral)
ddim             DDIMScheduler (eta)
pndm             PNDMScheduler (PLMS; optional Runge-Kutta warm-up)
dpmpp_2m         DPMSolverMultistepScheduler, algorithm dpmsolver++ (order 1 or 2, optional Karras sigmas)
euler            EulerDiscreteScheduler (optional Karras sigmas)
euler_ancestral  EulerAncestralDiscreteScheduler
"""

from __future__ import annotations

from ldm_jax.diffusion.samplers.base import SPACINGS, ModelFn, Sampler, sample, spaced_timesteps
from ldm_jax.diffusion.samplers.dpm_solver import DPMSolverPP
from ldm_jax.diffusion.samplers.options import SAMPLERS, SamplerOptions
from ldm_jax.diffusion.schedules import NoiseSchedule

__all__ = ["SAMPLERS", "SPACINGS", "ModelFn", "Sampler", "SamplerOptions", "make_sampler", "sample", "spaced_timesteps"]


def make_sampler(
    options: SamplerOptions, schedule: NoiseSchedule, first_step: int = 0, beta_schedule: str = ""
) -> Sampler:
    """The sampler ``options.name`` with its tables for ``schedule``; validates the options first.

    ``beta_schedule`` matters only to DPM-Solver++ with Karras sigmas (diffusers keeps fractional timesteps for the
    cosine schedule and rounds them otherwise).
    """
    options.validate(schedule.num_train_timesteps)
    if not 0 <= first_step < options.num_steps:
        raise ValueError(f"first_step={first_step}: must be in [0, {options.num_steps})")
    cls = SAMPLERS[options.name]
    if cls is DPMSolverPP:
        return cls(options, schedule, first_step, beta_schedule)
    return cls(options, schedule, first_step)

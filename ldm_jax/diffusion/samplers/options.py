"""Every sampler setting (``SamplerOptions``), the registry of samplers by name, and their validation."""

from __future__ import annotations

import dataclasses

import numpy as np

from ldm_jax.diffusion.objectives import PREDICTION_TYPES
from ldm_jax.diffusion.samplers.base import SPACINGS
from ldm_jax.diffusion.samplers.ddim import DDIM, DDPM
from ldm_jax.diffusion.samplers.dpm_solver import DPMSolverPP
from ldm_jax.diffusion.samplers.euler import Euler, EulerAncestral
from ldm_jax.diffusion.samplers.pndm import PNDM

SAMPLERS = {
    "ddpm": DDPM,
    "ddim": DDIM,
    "pndm": PNDM,
    "dpmpp_2m": DPMSolverPP,
    "euler": Euler,
    "euler_ancestral": EulerAncestral,
}
VARIANCE_TYPES = ("fixed_small", "fixed_large")
SOLVER_TYPES = ("midpoint", "heun")
FINAL_SIGMAS = ("zero", "sigma_min")


def evaluated_timesteps(options: "SamplerOptions", num_steps: int, n_train: int) -> np.ndarray:
    """The timesteps ``options.name`` evaluates the model at, for ``num_steps`` steps (each sampler's own rule)."""
    return np.asarray(SAMPLERS[options.name].spacing_rule(n_train, num_steps, options.spacing, options.steps_offset))


def _timesteps_fit(options: "SamplerOptions", num_steps: int, n_train: int) -> bool:
    """Whether the steps stay in the trained range, one per step, none repeated: past the end ("leading" spacing
    with steps_offset=1 reaches t = n_train at n_train steps) the table lookup fails or the model sees a timestep it
    never trained on, and DPM-Solver++'s update divides by the gap between two equal timesteps."""
    ts = evaluated_timesteps(options, num_steps, n_train)
    return len(ts) == num_steps and ts.min() >= 0 and ts.max() <= n_train - 1 and len(np.unique(ts)) == num_steps


@dataclasses.dataclass(frozen=True)
class SamplerOptions:
    """Every sampler setting, named as in the diffusers scheduler configs they mirror.

    Fields a sampler does not use are ignored by it (``eta`` only matters to DDIM, ``solver_order`` to DPM-Solver++).
    """

    name: str = "ddim"
    num_steps: int = 50
    prediction_type: str = "epsilon"
    spacing: str = "leading"  # diffusers' timestep_spacing
    steps_offset: int = 1  # added to "leading" timesteps (Stable Diffusion's configs use 1)
    eta: float = 0.0  # DDIM: 0 deterministic, 1 DDPM-like variance
    clip_sample: bool = False  # DDPM/DDIM: clip predicted x0 to +-clip_sample_range (pixel-space models)
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = False  # DDIM/PNDM: alpha_bar after the last step is 1 (else alpha_bar[0])
    variance_type: str = "fixed_small"  # DDPM posterior variance
    skip_prk_steps: bool = True  # PNDM: True = PLMS only (Stable Diffusion), False = 12 Runge-Kutta warm-up steps
    solver_order: int = 2  # DPM-Solver++: 1 or 2 (2M)
    solver_type: str = "midpoint"  # DPM-Solver++ second-order update
    lower_order_final: bool = True  # DPM-Solver++: first/second order for the last steps when < 15 steps
    euler_at_final: bool = False  # DPM-Solver++: first-order last step always
    karras_sigmas: bool = False  # DPM-Solver++ / Euler: Karras et al. rho=7 sigma spacing
    final_sigmas_type: str = "zero"  # DPM-Solver++ / Euler: last sigma 0, or the schedule's smallest sigma

    def validate(self, num_train_timesteps: int, prefix: str = "sample.") -> None:
        """Raises ValueError naming ``<prefix><field>`` (``sample.`` for configs, ``--`` for flags)."""

        def check(cond, field, rule):
            if not cond:
                label = "sampler" if field == "name" else field  # the config calls the name "sample.sampler"
                raise ValueError(f"{prefix}{label}={getattr(self, field)!r}: {rule}")

        check(self.name in SAMPLERS, "name", f"must be one of {tuple(SAMPLERS)}")
        check(1 <= self.num_steps <= num_train_timesteps, "num_steps", f"must be in [1, {num_train_timesteps}]")
        check(self.prediction_type in PREDICTION_TYPES, "prediction_type", f"must be one of {PREDICTION_TYPES}")
        check(self.spacing in SPACINGS, "spacing", f"must be one of {SPACINGS}")
        check(self.steps_offset >= 0, "steps_offset", "must be >= 0")
        check(self.eta >= 0, "eta", "must be >= 0")
        check(self.clip_sample_range > 0, "clip_sample_range", "must be > 0")
        check(self.variance_type in VARIANCE_TYPES, "variance_type", f"must be one of {VARIANCE_TYPES}")
        check(self.solver_order in (1, 2), "solver_order", "must be 1 or 2")
        check(self.solver_type in SOLVER_TYPES, "solver_type", f"must be one of {SOLVER_TYPES}")
        check(self.final_sigmas_type in FINAL_SIGMAS, "final_sigmas_type", f"must be one of {FINAL_SIGMAS}")
        SAMPLERS[self.name].check_options(self, prefix)
        if not _timesteps_fit(self, self.num_steps, num_train_timesteps):
            fits = next(
                (n for n in range(self.num_steps - 1, 0, -1) if _timesteps_fit(self, n, num_train_timesteps)), 0
            )
            ts = evaluated_timesteps(self, self.num_steps, num_train_timesteps)
            raise ValueError(
                f"{prefix}num_steps={self.num_steps}: with {prefix}spacing={self.spacing!r} and "
                f"{prefix}steps_offset={self.steps_offset}, {self.name}'s timesteps run from {int(ts.max())} down to "
                f"{int(ts.min())} ({len(np.unique(ts))} distinct), outside the model's 0..{num_train_timesteps - 1} or "
                f"repeated; use num_steps <= {fits}, or {prefix}spacing='trailing'"
            )

    def replace(self, **changes) -> "SamplerOptions":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_config(cls, sample, prediction_type: str) -> "SamplerOptions":
        """Options from a ``config.sample`` block (``sampler`` names the sampler; the block's other fields, such as
        prompts and guidance, are not sampler options) and the model's prediction type."""
        names = ["sampler"] + [f.name for f in dataclasses.fields(cls) if f.name not in ("name", "prediction_type")]
        missing = [k for k in names if k not in sample]
        if missing:
            raise ValueError(f"sample.{missing[0]}: missing; config.sample must declare every sampler option")
        values = {k: sample[k] for k in names[1:]}
        return cls(name=sample["sampler"], prediction_type=prediction_type, **values)

    @classmethod
    def for_run(cls, config, prefix: str = "sample.", **overrides) -> "SamplerOptions":
        """A run's sampler: its ``config.sample`` and ``config.diffusion``, with the non-None ``overrides`` (e.g.
        from flags), validated."""
        opts = cls.from_config(config.sample, config.diffusion.prediction_type)
        opts = opts.replace(**{k: v for k, v in overrides.items() if v is not None})
        opts.validate(config.diffusion.num_train_timesteps, prefix)
        return opts

    def to_config(self) -> dict:
        """The ``config.sample`` fields for these options (inverse of ``from_config``)."""
        out = dataclasses.asdict(self)
        out["sampler"] = out.pop("name")
        del out["prediction_type"]
        return out

"""What every sampler shares: its options, the host-side step tables, and the ``lax.scan`` driver.

A sampler is a table of per-step constants computed on the host (numpy, float64, from the float32 schedule) and a
pure ``step`` over a small state pytree. The tables depend only on static settings (sampler, steps, schedule), so one
compiled program serves every prompt, seed and guidance scale.

A model function is ``model_fn(x_t [B, H, W, C], t [B] float32) -> output [B, H, W, C]`` (epsilon, v or x0 per
``prediction_type``); ``x_t`` is always in the variance-preserving space the network was trained on, whatever space
the sampler integrates in (the Euler samplers integrate ``x0 + sigma * eps`` and scale inputs down).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.diffusion.objectives import PREDICTION_TYPES
from ldm_jax.diffusion.schedules import NoiseSchedule

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]
SPACINGS = ("leading", "trailing", "linspace")
VARIANCE_TYPES = ("fixed_small", "fixed_large")
SOLVER_TYPES = ("midpoint", "heun")
FINAL_SIGMAS = ("zero", "sigma_min")


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
        from ldm_jax.diffusion.samplers import SAMPLERS  # the registry imports the sampler modules

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

    def replace(self, **changes) -> "SamplerOptions":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_config(cls, sample, prediction_type: str) -> "SamplerOptions":
        """Options from a ``config.sample`` block (``sampler`` names the sampler) and the model's prediction type.

        Fields absent from an older saved config take their defaults here.
        """
        fields = {f.name: f.default for f in dataclasses.fields(cls)}
        values = {k: sample.get(k, default) for k, default in fields.items() if k not in ("name", "prediction_type")}
        return cls(name=sample.get("sampler", "ddim"), prediction_type=prediction_type, **values)

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


def spaced_timesteps(n_train: int, num_steps: int, spacing: str, steps_offset: int) -> np.ndarray:
    """Descending timesteps as DDPM/DDIM ``set_timesteps`` computes them (int64)."""
    if not 1 <= num_steps <= n_train:
        raise ValueError(f"num_steps={num_steps}: must be in [1, {n_train}]")
    if spacing == "leading":
        ratio = n_train // num_steps
        return (np.arange(num_steps) * ratio).round()[::-1].astype(np.int64) + steps_offset
    if spacing == "trailing":
        ratio = n_train / num_steps
        return np.round(np.arange(n_train, 0, -ratio)).astype(np.int64) - 1
    if spacing == "linspace":
        return np.linspace(0, n_train - 1, num_steps).round()[::-1].astype(np.int64)
    raise ValueError(f"spacing={spacing!r}: must be one of {SPACINGS}")


def alphas_cumprod(schedule: NoiseSchedule) -> np.ndarray:
    return np.asarray(schedule.alphas_cumprod, dtype=np.float32)


class Sampler:
    """Base class. Subclasses set ``rows`` (dict of [S, ...] arrays), ``stochastic`` and the state functions.

    ``first_step`` > 0 starts at that step of the full ``num_steps`` schedule (image-to-image), with multistep
    histories empty, as a diffusers scheduler does after ``set_begin_index``.
    """

    stochastic = False

    def __init__(self, options: SamplerOptions, schedule: NoiseSchedule, first_step: int = 0):
        self.options = options
        self.n_train = schedule.num_train_timesteps
        self.abar = alphas_cumprod(schedule)
        self.first_step = first_step
        self.rows: dict[str, np.ndarray] = {}

    @classmethod
    def check_options(cls, options: SamplerOptions, prefix: str) -> None:
        """Raises ValueError for settings this sampler cannot honour."""

    # ---- state ---------------------------------------------------------------------------------------------
    def start(self, noise: jax.Array, x0: jax.Array | None = None) -> dict:
        """Initial state from standard-normal ``noise``; with ``x0``, that image noised to the first step's level."""
        return {"x": noise if x0 is None else self.noised(x0, noise, 0)}

    def noise_levels(self) -> tuple[np.ndarray, np.ndarray]:
        """(a [S], b [S]): the sample entering model evaluation j is ``a[j] x0 + b[j] noise`` in this sampler's space.

        Variance-preserving samplers: sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t) of the evaluation's timestep.
        """
        abar = self.abar.astype(np.float64)[np.round(self.rows["t"]).astype(np.int64)]
        return np.sqrt(abar).astype(np.float32), np.sqrt(1.0 - abar).astype(np.float32)

    def noised(self, x0: jax.Array, noise: jax.Array, j) -> jax.Array:
        """``x0`` noised to the level of model evaluation ``j`` (traced int ok); ``x0`` itself once j >= S.

        What diffusers' ``scheduler.add_noise`` gives for the same step: image-to-image starts there, and
        latent-space inpainting pastes the known region at the next step's level after every step.
        """
        a, b = (jnp.asarray(v) for v in self.noise_levels())
        k = jnp.minimum(j, self.num_evals - 1)
        return jnp.where(j < self.num_evals, a[k] * x0 + b[k] * noise, x0)

    def model_input(self, state: dict, row: dict) -> jax.Array:
        return state["x"]

    def step(self, state: dict, row: dict, out: jax.Array, noise: jax.Array | None) -> dict:
        raise NotImplementedError

    @property
    def num_evals(self) -> int:
        return len(self.rows["t"])

    @property
    def timesteps(self) -> np.ndarray:
        """The timestep the network sees at each model evaluation, in order."""
        return self.rows["t"]


def sample(
    sampler: Sampler,
    model_fn: ModelFn,
    noise: jax.Array,
    *,
    x0: jax.Array | None = None,
    rng: jax.Array | None = None,
    step_noise: jax.Array | None = None,
    blend: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
    return_intermediates: bool = False,
):
    """Runs ``sampler`` as one ``lax.scan`` over its model evaluations.

    Args:
      noise: [B, H, W, C] standard-normal starting noise (scaled by the sampler as its scheduler would).
      x0: optional clean latents to start from instead (image-to-image): noised to the first step's level.
      rng: for stochastic samplers, one key, or [B] keys so that example b's noise depends only on its own key.
      step_noise: [S, B, H, W, C] per-step noise instead of ``rng`` (to replay a reference run exactly).
      blend: optional ``blend(x, i) -> x`` applied to the sample after step i (latent-space inpainting).
      return_intermediates: also return the sample after every step, [S, B, H, W, C].
    Returns:
      The final sample [B, H, W, C] (and the intermediates).
    """
    batch, n = noise.shape[0], sampler.num_evals
    if sampler.stochastic and rng is None and step_noise is None:
        raise ValueError(f"sampler {sampler.options.name!r} is stochastic: pass rng or step_noise")
    if step_noise is not None and step_noise.shape != (n, *noise.shape):
        raise ValueError(f"step_noise shape {step_noise.shape}: must be {(n, *noise.shape)}")
    rows = {k: jnp.asarray(v) for k, v in sampler.rows.items()}
    per_example_keys = rng is not None and rng.ndim == 1

    def draw(i, given):
        if not sampler.stochastic:
            return None
        if given is not None:
            return given
        if per_example_keys:
            return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), noise.shape[1:], noise.dtype))(rng)
        return jax.random.normal(jax.random.fold_in(rng, i), noise.shape, noise.dtype)

    def body(state, inputs):
        row, i, given = inputs
        t = jnp.broadcast_to(row["t"].astype(jnp.float32), (batch,))
        out = model_fn(sampler.model_input(state, row), t)
        state = sampler.step(state, row, out.astype(noise.dtype), draw(i, given))
        if blend is not None:
            state = {**state, "x": blend(state["x"], i)}
        return state, (state["x"] if return_intermediates else None)

    state = sampler.start(noise, x0)
    final, inter = jax.lax.scan(body, state, (rows, jnp.arange(n), step_noise))
    return (final["x"], inter) if return_intermediates else final["x"]

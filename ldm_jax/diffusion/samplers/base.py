"""What every sampler shares: the host-side step tables and the ``lax.scan`` driver (options: ``options.py``).

A sampler is a table of per-step constants computed on the host (numpy, float64, from the float32 schedule) and a
pure ``step`` over a small state pytree. The tables depend only on static settings (sampler, steps, schedule), so one
compiled program serves every prompt, seed and guidance scale.

A model function is ``model_fn(x_t [B, H, W, C], t [B] float32) -> output [B, H, W, C]`` (epsilon, v or x0 per
``prediction_type``); ``x_t`` is always in the variance-preserving space the network was trained on, whatever space
the sampler integrates in (the Euler samplers integrate ``x0 + sigma * eps`` and scale inputs down).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.diffusion.schedules import NoiseSchedule

if TYPE_CHECKING:  # the options name the samplers, which build on this module
    from ldm_jax.diffusion.samplers.options import SamplerOptions

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]
SPACINGS = ("leading", "trailing", "linspace")


def spaced_timesteps(n_train: int, num_steps: int, spacing: str, steps_offset: int) -> np.ndarray:
    """Descending timesteps as DDPM/DDIM ``set_timesteps`` computes them (int64)."""
    if not 1 <= num_steps <= n_train:
        raise ValueError(f"num_steps={num_steps}: must be in [1, {n_train}]")
    if spacing == "leading":
        ratio = n_train // num_steps
        return (np.arange(num_steps) * ratio).round()[::-1].astype(np.int64) + steps_offset
    if spacing == "trailing":
        ratio = n_train / num_steps
        # [:num_steps]: for some counts (61, 103, 121, ...) float error leaves a last arange entry just above 0,
        # which would round to t = -1 (alpha_bar[-1] wraps to the noisiest step): one step too many, the last wrong.
        return np.round(np.arange(n_train, 0, -ratio))[:num_steps].astype(np.int64) - 1
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
    # (n_train, num_steps, spacing, steps_offset) -> the timesteps of the steps: this sampler's spacing rule, which
    # diffusers' scheduler of the same name follows (SamplerOptions.validate checks them against the schedule).
    spacing_rule = staticmethod(spaced_timesteps)

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

"""DDPM ancestral sampling (Ho et al. 2020) and DDIM (Song et al. 2021), as diffusers' DDPMScheduler/DDIMScheduler."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ldm_jax.diffusion.objectives import predict_x0_eps
from ldm_jax.diffusion.samplers.base import Sampler


def _predict(opts, a_t, x, out):
    x0, eps = predict_x0_eps(opts.prediction_type, a_t, x, out)
    if opts.clip_sample:
        x0 = jnp.clip(x0, -opts.clip_sample_range, opts.clip_sample_range)
    return x0, eps


class DDPM(Sampler):
    """Ancestral sampling from the posterior q(x_prev | x_t, x0_hat); steps to the next listed timestep."""

    stochastic = True

    def __init__(self, options, schedule, first_step=0):
        super().__init__(options, schedule, first_step)
        ts = self.spacing_rule(self.n_train, options.num_steps, options.spacing, options.steps_offset)
        abar = self.abar.astype(np.float64)
        a_t = abar[ts]
        a_prev = np.append(abar[ts[1:]], 1.0)  # after the last listed step: alpha_bar = 1
        cur_alpha = a_t / a_prev
        cur_beta = 1.0 - cur_alpha
        if options.variance_type == "fixed_small":
            var = np.maximum((1.0 - a_prev) / (1.0 - a_t) * cur_beta, 1e-20)
        else:  # fixed_large
            var = cur_beta
        std = np.where(ts > 0, np.sqrt(var), 0.0)  # no noise is added on the step to t = 0
        self.rows = {
            "t": ts.astype(np.float32),
            "a_t": a_t.astype(np.float32),
            "c_x0": (np.sqrt(a_prev) * cur_beta / (1.0 - a_t)).astype(np.float32),
            "c_x": (np.sqrt(cur_alpha) * (1.0 - a_prev) / (1.0 - a_t)).astype(np.float32),
            "std": std.astype(np.float32),
        }
        self.rows = {k: v[first_step:] for k, v in self.rows.items()}

    def step(self, state, row, out, noise):
        x = state["x"]
        x0, _ = _predict(self.options, row["a_t"], x, out)
        return {"x": row["c_x0"] * x0 + row["c_x"] * x + row["std"] * noise}


class DDIM(Sampler):
    """DDIM; ``eta`` = 0 is deterministic. Steps back by ``n_train // num_steps`` whatever the spacing, as diffusers."""

    def __init__(self, options, schedule, first_step=0):
        super().__init__(options, schedule, first_step)
        self.stochastic = options.eta > 0
        ts = self.spacing_rule(self.n_train, options.num_steps, options.spacing, options.steps_offset)
        abar = self.abar.astype(np.float64)
        prev = ts - self.n_train // options.num_steps
        final = 1.0 if options.set_alpha_to_one else abar[0]
        a_t = abar[ts]
        a_prev = np.where(prev >= 0, abar[np.clip(prev, 0, None)], final)
        var = (1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)
        std = options.eta * np.sqrt(var)
        self.rows = {
            "t": ts.astype(np.float32),
            "a_t": a_t.astype(np.float32),
            "sqrt_a_prev": np.sqrt(a_prev).astype(np.float32),
            "c_eps": np.sqrt(np.maximum(1.0 - a_prev - std**2, 0.0)).astype(np.float32),
            "std": std.astype(np.float32),
        }
        self.rows = {k: v[first_step:] for k, v in self.rows.items()}

    def step(self, state, row, out, noise):
        x0, eps = _predict(self.options, row["a_t"], state["x"], out)
        x = row["sqrt_a_prev"] * x0 + row["c_eps"] * eps
        if noise is not None:
            x = x + row["std"] * noise
        return {"x": x}

"""DPM-Solver++ multistep (Lu et al. 2022), first order or 2M, as diffusers' DPMSolverMultistepScheduler with
``algorithm_type="dpmsolver++"``.

Every update is ``x_next = A x + B m0 + C (m0 - m1)`` with m0, m1 the current and previous x0 predictions; A, B, C
depend only on the sigma table, so they are computed on the host (C = 0 on first-order steps).
"""

from __future__ import annotations

import numpy as np

from ldm_jax.diffusion.samplers.base import Sampler, spaced_timesteps
from ldm_jax.diffusion.samplers.sigmas import karras, schedule_sigmas, sigma_to_t, vp_coefficients


def dpm_timesteps(n_train: int, num_steps: int, spacing: str, steps_offset: int) -> np.ndarray:
    """DPMSolverMultistepScheduler's spacing: ``num_steps + 1`` points with the last (t = 0) dropped."""
    if spacing == "linspace":
        return np.linspace(0, n_train - 1, num_steps + 1).round()[::-1][:-1].astype(np.int64)
    if spacing == "leading":
        ratio = n_train // (num_steps + 1)
        return (np.arange(num_steps + 1) * ratio).round()[::-1][:-1].astype(np.int64) + steps_offset
    return spaced_timesteps(n_train, num_steps, "trailing", 0)


class DPMSolverPP(Sampler):
    spacing_rule = staticmethod(dpm_timesteps)

    def __init__(self, options, schedule, first_step=0, beta_schedule: str = ""):
        super().__init__(options, schedule, first_step)
        o = options
        full = schedule_sigmas(self.abar)
        log_sigmas = np.log(full)
        ts = self.spacing_rule(self.n_train, o.num_steps, o.spacing, o.steps_offset)
        if o.karras_sigmas:
            sig = karras(float(full[0]), float(full[-1]), o.num_steps)
            ts = sigma_to_t(sig, log_sigmas)
            if beta_schedule != "squaredcos_cap_v2":
                ts = ts.round()
            # The model sees them as integers (diffusers casts with truncation; for the cosine schedule that can
            # repeat 999, where diffusers' step-index lookup then skips a step: we do not copy that).
            ts = ts.astype(np.int64)
        else:
            sig = np.interp(ts, np.arange(len(full)), full)
        last = float(full[0]) if o.final_sigmas_type == "sigma_min" else 0.0
        sig = np.concatenate([sig, [last]]).astype(np.float32).astype(np.float64)
        n = len(ts)
        alpha, sigma = vp_coefficients(sig)
        with np.errstate(divide="ignore"):
            lam = np.log(alpha) - np.log(sigma)  # +inf at sigma = 0
        rows = {k: [] for k in ("t", "alpha_s", "sigma_s", "A", "B", "C")}
        for i in range(first_step, n):
            history = min(i - first_step, o.solver_order)
            final = i == n - 1 and (
                o.euler_at_final or (o.lower_order_final and n < 15) or o.final_sigmas_type == "zero"
            )
            first_order = o.solver_order == 1 or history < 1 or final
            h = lam[i + 1] - lam[i]
            with np.errstate(invalid="ignore", over="ignore"):
                em1 = np.expm1(-h) if np.isfinite(h) else -1.0  # exp(-h) - 1
            a = sigma[i + 1] / sigma[i]
            b = -alpha[i + 1] * em1
            c = 0.0
            if not first_order:
                r0 = (lam[i] - lam[i - 1]) / h
                if o.solver_type == "midpoint":
                    c = -0.5 * alpha[i + 1] * em1 / r0
                else:
                    c = alpha[i + 1] * (em1 / h + 1.0) / r0
            for key, v in (("t", ts[i]), ("alpha_s", alpha[i]), ("sigma_s", sigma[i]), ("A", a), ("B", b), ("C", c)):
                rows[key].append(v)
        self.rows = {k: np.asarray(v, np.float32) for k, v in rows.items()}

    def noise_levels(self):
        return self.rows["alpha_s"], self.rows["sigma_s"]

    def start(self, noise, x0=None):
        state = super().start(noise, x0)
        return {**state, "m1": state["x"] * 0.0}

    def step(self, state, row, out, noise):
        x = state["x"]
        pred = self.options.prediction_type
        if pred == "epsilon":
            m0 = (x - row["sigma_s"] * out) / row["alpha_s"]
        elif pred == "v_prediction":
            m0 = row["alpha_s"] * x - row["sigma_s"] * out
        else:
            m0 = out
        return {"x": row["A"] * x + row["B"] * m0 + row["C"] * (m0 - state["m1"]), "m1": m0}

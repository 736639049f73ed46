"""PNDM / PLMS (Liu et al. 2022), as diffusers' PNDMScheduler.

The scheduler is a state machine over a history of model outputs (Runge-Kutta warm-up, then linear multistep).
We replay that state machine once on the host with symbolic history slots, which turns every model evaluation into
a row of constant coefficients; the device step is then one fixed linear combination per evaluation:

  history ets (4 slots, newest last) is pushed with the new output when ``push``;
  eff = c_out * out + c_acc * acc + sum_k c_ets[k] * ets[k]      (acc: the Runge-Kutta partial sum)
  acc = keep_acc * acc + add_acc * out
  base = stored sample ``cur`` if ``use_cur`` else x;  cur = x when ``store_cur``
  x_prev = sqrt(a_prev) * x0 + sqrt(1 - a_prev) * eps, with (x0, eps) of base and eff at alpha_bar a_t (the
          scheduler's sqrt(a_prev / a_t) base - c eps in DDIM form: finite at a_t = 0)
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ldm_jax.diffusion.samplers.base import Sampler, spaced_timesteps


def base_timesteps(n_train: int, num_steps: int, spacing: str, steps_offset: int) -> np.ndarray:
    """PNDM's ascending ``_timesteps`` (its own variant of the spacing rules)."""
    if spacing == "linspace":
        return np.linspace(0, n_train - 1, num_steps).round().astype(np.int64)
    if spacing == "leading":
        ratio = n_train // num_steps
        return (np.arange(num_steps) * ratio).round().astype(np.int64) + steps_offset
    return spaced_timesteps(n_train, num_steps, "trailing", 0)[::-1]


def pndm_plan(n_train: int, num_steps: int, spacing: str, steps_offset: int, skip_prk_steps: bool) -> list[dict]:
    """One dict of coefficients per model evaluation, replaying PNDMScheduler.step_prk / step_plms."""
    base = base_timesteps(n_train, num_steps, spacing, steps_offset)
    ratio = n_train // num_steps
    if skip_prk_steps:
        prk = np.array([], np.int64)
        plms = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1]
    else:
        prk = np.array(base[-4:]).repeat(2) + np.tile(np.array([0, ratio // 2]), 4)
        prk = prk[:-1].repeat(2)[1:-1][::-1]
        plms = base[:-3][::-1]
    plan, n_ets = [], 0
    for counter, t in enumerate(np.concatenate([prk, plms]).astype(np.int64)):
        r = dict(t=int(t), push=False, store_cur=False, use_cur=False, c_out=0.0, c_acc=0.0, c_ets=[0.0] * 4)
        r.update(keep_acc=1.0, add_acc=0.0)
        if counter < len(prk):
            phase = counter % 4
            r["t_prev"] = int(t) - (0 if counter % 2 else ratio // 2)
            r["t_from"] = int(prk[counter // 4 * 4])
            r["use_cur"] = True
            if phase == 0:
                r.update(push=True, store_cur=True, c_out=1.0, add_acc=1 / 6)
                n_ets = min(n_ets, 3) + 1
            elif phase in (1, 2):
                r.update(c_out=1.0, add_acc=1 / 3)
            else:
                r.update(c_out=1 / 6, c_acc=1.0, keep_acc=0.0)
        else:
            r["t_prev"], r["t_from"] = int(t) - ratio, int(t)
            if counter != 1:
                r["push"] = True
                n_ets = min(n_ets, 3) + 1
            else:
                r["t_prev"], r["t_from"] = int(t), int(t) + ratio
            if n_ets == 1 and counter == 0:
                r.update(c_out=1.0, store_cur=True)
            elif n_ets == 1 and counter == 1:
                r.update(c_out=0.5, use_cur=True)
                r["c_ets"] = [0.0, 0.0, 0.0, 0.5]
            elif n_ets == 2:
                r["c_ets"] = [0.0, 0.0, -0.5, 1.5]
            elif n_ets == 3:
                r["c_ets"] = [0.0, 5 / 12, -16 / 12, 23 / 12]
            else:
                r["c_ets"] = [-9 / 24, 37 / 24, -59 / 24, 55 / 24]
        plan.append(r)
    return plan


class PNDM(Sampler):
    spacing_rule = staticmethod(base_timesteps)  # ascending; its plan evaluates these, one repeated (PLMS warm-up)

    @classmethod
    def check_options(cls, options, prefix):
        if options.prediction_type == "sample":
            raise ValueError(
                f"{prefix}sampler='pndm': needs an 'epsilon' or 'v_prediction' model, this one predicts 'sample'"
            )
        if not options.skip_prk_steps and options.num_steps < 4:
            raise ValueError(f"{prefix}num_steps={options.num_steps}: PNDM with Runge-Kutta steps needs >= 4")

    def __init__(self, options, schedule, first_step=0):
        super().__init__(options, schedule, first_step)
        if first_step:
            raise ValueError("sampler 'pndm' cannot start part-way (image-to-image); use ddim, dpmpp_2m or euler")
        plan = pndm_plan(self.n_train, options.num_steps, options.spacing, options.steps_offset, options.skip_prk_steps)
        abar = self.abar.astype(np.float64)
        final = 1.0 if options.set_alpha_to_one else abar[0]
        a_t = np.array([abar[r["t_from"]] for r in plan])
        a_prev = np.array([abar[r["t_prev"]] if r["t_prev"] >= 0 else final for r in plan])
        f32 = lambda key: np.array([r[key] for r in plan], np.float32)  # noqa: E731
        self.rows = {
            "t": f32("t"),
            "a_t": a_t.astype(np.float32),
            "sqrt_a_prev": np.sqrt(a_prev).astype(np.float32),
            "sqrt_1m_a_prev": np.sqrt(1.0 - a_prev).astype(np.float32),
            "push": f32("push"),
            "store_cur": f32("store_cur"),
            "use_cur": f32("use_cur"),
            "c_out": f32("c_out"),
            "c_acc": f32("c_acc"),
            "c_ets": np.array([r["c_ets"] for r in plan], np.float32),
            "keep_acc": f32("keep_acc"),
            "add_acc": f32("add_acc"),
        }

    def start(self, noise, x0=None):
        zeros = jnp.zeros_like(noise)
        x = noise if x0 is None else self.noised(x0, noise, 0)
        return {"x": x, "cur": zeros, "acc": zeros, "ets": jnp.zeros((4, *noise.shape), noise.dtype)}

    def step(self, state, row, out, noise):
        x, cur, acc, ets = state["x"], state["cur"], state["acc"], state["ets"]
        pushed = jnp.concatenate([ets[1:], out[None]], axis=0)
        ets = jnp.where(row["push"] > 0, pushed, ets)
        cur = jnp.where(row["store_cur"] > 0, x, cur)
        eff = row["c_out"] * out + row["c_acc"] * acc + jnp.tensordot(row["c_ets"], ets, axes=1)
        acc = row["keep_acc"] * acc + row["add_acc"] * out
        base = jnp.where(row["use_cur"] > 0, cur, x)
        # PNDMScheduler's transfer, sqrt(a_prev / a_t) x - (a_prev - a_t) / (a_t sqrt(1 - a_prev) + sqrt(a_t (1 -
        # a_t) a_prev)) eps, is algebraically the DDIM step sqrt(a_prev) x0 + sqrt(1 - a_prev) eps. Written that way
        # it stays finite at a_t = 0 (a zero-terminal-SNR schedule's first step, v-prediction), where the ratio form
        # divides by zero and every image came out NaN; elsewhere the two agree to float rounding (diffusers parity).
        sa, sb = jnp.sqrt(row["a_t"]), jnp.sqrt(1.0 - row["a_t"])
        if self.options.prediction_type == "v_prediction":
            x0, eps = sa * base - sb * eff, sa * eff + sb * base
        else:
            x0, eps = (base - sb * eff) / sa, eff
        x = row["sqrt_a_prev"] * x0 + row["sqrt_1m_a_prev"] * eps
        return {"x": x, "cur": cur, "acc": acc, "ets": ets}

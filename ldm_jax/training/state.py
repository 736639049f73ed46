"""The train state: only what training updates (step, params, EMA params, optimizer state, skip counters)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    # Steps whose loss or gradients were not finite: their update was skipped (see ``skip_if_nonfinite``).
    nonfinite_total: jax.Array
    nonfinite_streak: jax.Array  # consecutive, ending at the latest step
    nonfinite_max_streak: jax.Array  # longest streak so far: the loop reads it every log_every steps

    @classmethod
    def create(cls, params, tx: optax.GradientTransformation) -> TrainState:
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            ema_params=jax.tree.map(jnp.copy, params),
            opt_state=tx.init(params),
            **zero_counters(),
        )


def zero_counters() -> dict:
    zero = jnp.zeros((), jnp.int32)
    return {"nonfinite_total": zero, "nonfinite_streak": zero, "nonfinite_max_streak": zero}


def skip_if_nonfinite(old: TrainState, update: Callable[[TrainState], TrainState], finite: jax.Array) -> TrainState:
    """``update(old)`` when the step was finite; else ``old`` with only the step and the skip counters advanced.

    The step still advances on a skip, so the batch and the step's randomness are consumed exactly as in a run
    without the bad step (resume and data order stay a function of the step).

    A ``lax.cond``, not a select of the two states: with the state donated, an element-wise select between the old
    and the new value of every parameter and optimizer leaf made XLA copy each of them at the start of the step
    (it could not prove every read of the old value came before the in-place write): a copy of the parameters and
    both Adam moments per step, as memory traffic and as temporaries (docs/demo_fidelity.md: 995 copies a step,
    2026-12-05). The skipped branch returns its operand, the same buffers."""
    kept = jax.lax.cond(finite, update, lambda s: s, old)
    bad = jnp.logical_not(finite).astype(jnp.int32)
    streak = (old.nonfinite_streak + 1) * bad
    return kept.replace(
        step=old.step + 1,
        nonfinite_total=old.nonfinite_total + bad,
        nonfinite_streak=streak,
        nonfinite_max_streak=jnp.maximum(old.nonfinite_max_streak, streak),
    )


def counter_metrics(state: TrainState) -> dict:
    return {"train/nonfinite_skipped": state.nonfinite_total, "train/nonfinite_streak": state.nonfinite_streak}


def ema_decay_at(step: jax.Array, max_decay: float) -> jax.Array:
    """EMA decay with warm-up, (1 + step) / (10 + step) capped at ``max_decay``: early EMA tracks the weights."""
    step = step.astype(jnp.float32)
    return jnp.minimum(max_decay, (1.0 + step) / (10.0 + step))


def ema_update(ema, params, decay: jax.Array):
    return jax.tree.map(lambda e, p: e + (1.0 - decay) * (p - e), ema, params)

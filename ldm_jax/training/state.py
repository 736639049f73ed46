"""The train state: only what training updates (step, params, EMA params, optimizer state)."""

from __future__ import annotations

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

    @classmethod
    def create(cls, params, tx: optax.GradientTransformation) -> "TrainState":
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            ema_params=jax.tree.map(jnp.copy, params),
            opt_state=tx.init(params),
        )


def ema_decay_at(step: jax.Array, max_decay: float) -> jax.Array:
    """EMA decay with warm-up, (1 + step) / (10 + step) capped at ``max_decay``: early EMA tracks the weights."""
    step = step.astype(jnp.float32)
    return jnp.minimum(max_decay, (1.0 + step) / (10.0 + step))


def ema_update(ema, params, decay: jax.Array):
    return jax.tree.map(lambda e, p: e + (1.0 - decay) * (p - e), ema, params)

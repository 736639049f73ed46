"""The pure training step shared by every task.

``train_step(state, frozen, batch, rng) -> (state, metrics)``; the task's loss, the optimizer and constants are
bound with ``functools.partial`` before ``jax.jit``. ``rng`` is the run's root key: the step folds in
``state.step`` so a resumed run draws exactly the same randomness as an uninterrupted one.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from ldm_jax.training.state import TrainState, ema_decay_at, ema_update

# loss_fn(params, frozen, batch, rng) -> (scalar loss, dict of scalar metrics)
LossFn = Callable[[Any, Any, dict, jax.Array], tuple[jax.Array, dict]]


def train_step(
    state: TrainState,
    frozen: Any,
    batch: dict,
    rng: jax.Array,
    *,
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    lr_schedule: optax.Schedule,
    ema_decay: float,
) -> tuple[TrainState, dict]:
    step_rng = jax.random.fold_in(rng, state.step)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, frozen, batch, step_rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = ema_update(state.ema_params, params, ema_decay_at(state.step, ema_decay))
    metrics = {
        "train/loss": loss,
        "train/grad_norm": optax.global_norm(grads),
        "train/lr": jnp.asarray(lr_schedule(state.step), jnp.float32),
        **{f"train/{k}": v for k, v in aux.items()},
    }
    new_state = state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state)
    return new_state, metrics

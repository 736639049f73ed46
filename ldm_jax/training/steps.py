"""The pure training step shared by every task.

``train_step(state, frozen, batch, rng) -> (state, metrics)``; the task's loss, the optimizer and constants are
bound with ``functools.partial`` before ``jax.jit``. ``rng`` is the run's root key: the step folds in
``state.step`` so a resumed run draws exactly the same randomness as an uninterrupted one.

With ``accum_steps = k > 1`` the batch is split into k micro-batches whose gradients are averaged in a
``lax.scan`` inside the same compiled step (activation memory of one micro-batch, one optimizer update). Micro-batch
i takes rows i, i + k, i + 2k, ... so that every device contributes to every micro-batch (the batch is split over
devices in contiguous blocks) and no data moves between devices. A step whose loss or gradient norm is not finite
changes nothing but the step and the skip counters (``state.skip_if_nonfinite``).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from ldm_jax.training.state import TrainState, counter_metrics, ema_decay_at, ema_update, skip_if_nonfinite

# loss_fn(params, frozen, batch, rng) -> (scalar loss, dict of scalar metrics)
LossFn = Callable[[Any, Any, dict, jax.Array], tuple[jax.Array, dict]]


def micro_batches(batch: dict, k: int) -> dict:
    """[B, ...] leaves -> [k, B / k, ...]; micro-batch i holds rows i, i + k, ... (see the module docstring)."""

    def split(x):
        if x.shape[0] % k:
            raise ValueError(f"train.grad_accum_steps={k}: must divide the batch ({x.shape[0]} rows)")
        return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def loss_and_grads(loss_fn: LossFn, params, frozen, batch: dict, rng: jax.Array, accum_steps: int = 1):
    """``(loss, aux, grads)`` of the batch mean; with ``accum_steps > 1``, averaged over micro-batches in a scan
    (micro-batch i draws its randomness from ``fold_in(rng, i)``)."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if accum_steps == 1:
        (loss, aux), grads = grad_fn(params, frozen, batch, rng)
        return loss, aux, grads

    def body(acc, xs):
        i, micro = xs
        (loss, aux), grads = grad_fn(params, frozen, micro, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, acc, grads), (loss, aux)

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, (losses, auxs) = jax.lax.scan(body, zeros, (jnp.arange(accum_steps), micro_batches(batch, accum_steps)))
    mean = lambda x: jnp.mean(x, axis=0)  # noqa: E731
    return mean(losses), jax.tree.map(mean, auxs), jax.tree.map(lambda g: g / accum_steps, grads)


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
    accum_steps: int = 1,
) -> tuple[TrainState, dict]:
    step_rng = jax.random.fold_in(rng, state.step)
    loss, aux, grads = loss_and_grads(loss_fn, state.params, frozen, batch, step_rng, accum_steps)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = ema_update(state.ema_params, params, ema_decay_at(state.step, ema_decay))
    grad_norm = optax.global_norm(grads)
    metrics = {
        "train/loss": loss,
        "train/grad_norm": grad_norm,
        "train/lr": jnp.asarray(lr_schedule(state.step), jnp.float32),
        **{f"train/{k}": v for k, v in aux.items()},
    }
    new_state = state.replace(params=params, ema_params=ema, opt_state=opt_state)
    new_state = skip_if_nonfinite(state, new_state, jnp.isfinite(loss) & jnp.isfinite(grad_norm))
    return new_state, {**metrics, **counter_metrics(new_state)}

"""The step core every train step is built from, and the diffusion tasks' step.

``train_step(state, frozen, batch, rng) -> (state, metrics)``; the task's loss, the optimizer and constants are
bound with ``functools.partial`` before ``jax.jit``. ``rng`` is the run's root key: the step folds in
``state.step`` so a resumed run draws exactly the same randomness as an uninterrupted one.

The core, shared with the adversarial first stage (``training.gan.gan_train_step``):

- ``accumulate(fn, batch, rng, accum_steps, grads_like)``: the gradients (and metrics) of the batch. With
  ``accum_steps = k > 1`` the batch is split into k micro-batches whose gradients are averaged in a ``lax.scan``
  inside the same compiled step (activation memory of one micro-batch, one optimizer update). Micro-batch i takes
  rows i, i + k, i + 2k, ... so that every device contributes to every micro-batch (the batch is split over
  devices in contiguous blocks) and no data moves between devices; it draws its randomness from
  ``fold_in(rng, i)``.
- ``finish_step(old, update, ...)``: the optimizer update (``update(old)``), the EMA update, the common metrics
  (loss, gradient norm, learning rate and the task's own) and the non-finite skip: a step whose loss or gradient
  norm is not finite changes nothing but the step and the skip counters (``state.skip_if_nonfinite``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from ldm_jax.training import optim
from ldm_jax.training.state import TrainState, counter_metrics, ema_decay_at, ema_update, skip_if_nonfinite

# loss_fn(params, frozen, batch, rng) -> (scalar loss, dict of scalar metrics)
LossFn = Callable[[Any, Any, dict, jax.Array], tuple[jax.Array, dict]]
# fn(batch, rng) -> (grads, values, rows): see ``accumulate``
MicroStepFn = Callable[[dict, jax.Array], tuple[Any, Any, Any]]


def micro_batches(batch: dict, k: int) -> dict:
    """[B, ...] leaves -> [k, B / k, ...]; micro-batch i holds rows i, i + k, ... (see the module docstring)."""

    def split(x):
        if x.shape[0] % k:
            raise ValueError(f"train.grad_accum_steps={k}: must divide the batch ({x.shape[0]} rows)")
        return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def merge_micro_batches(rows: Any) -> Any:
    """The inverse of ``micro_batches``: [k, B / k, ...] leaves -> [B, ...] in the batch's row order."""
    return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:]), rows)


def accumulate(fn: MicroStepFn, batch: dict, rng: jax.Array, accum_steps: int, grads_like: Any):
    """``fn(batch, rng) -> (grads, values, rows)`` for the whole batch, computed over ``accum_steps`` micro-batches.

    ``fn`` must return gradients of batch means (so the mean over equal micro-batches is the full batch's):
      grads   summed in the scan's carry (zeros shaped like ``grads_like``), then divided by ``accum_steps``
      values  scalars (losses, metrics): the mean over micro-batches, exact for batch means
      rows    per-example arrays [micro-batch, ...]: concatenated back in the batch's row order, [B, ...]
    With ``accum_steps`` 1, ``fn(batch, rng)`` itself: no scan, no reordering.
    """
    if accum_steps == 1:
        return fn(batch, rng)

    def body(acc, xs):
        i, micro = xs
        grads, values, rows = fn(micro, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, acc, grads), (values, rows)

    zeros = jax.tree.map(jnp.zeros_like, grads_like)
    grads, (values, rows) = jax.lax.scan(body, zeros, (jnp.arange(accum_steps), micro_batches(batch, accum_steps)))

    def mean(x):
        return jnp.mean(x, axis=0)

    return jax.tree.map(lambda g: g / accum_steps, grads), jax.tree.map(mean, values), merge_micro_batches(rows)


def loss_and_grads(loss_fn: LossFn, params, frozen, batch: dict, rng: jax.Array, accum_steps: int = 1):
    """``(loss, aux, grads)`` of the batch mean; with ``accum_steps > 1``, averaged over micro-batches in a scan
    (micro-batch i draws its randomness from ``fold_in(rng, i)``)."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def micro(b, r):
        (loss, aux), grads = grad_fn(params, frozen, b, r)
        return grads, (loss, aux), {}

    grads, (loss, aux), _ = accumulate(micro, batch, rng, accum_steps, params)
    return loss, aux, grads


def finish_step(
    old: TrainState,
    update: Callable[[TrainState], TrainState],
    *,
    loss: jax.Array,
    grads: Any,
    metrics: dict,
    lr_schedule: optax.Schedule,
    ema_decay: float,
    finite: jax.Array | None = None,
) -> tuple[TrainState, dict]:
    """The tail of every train step: ``update(old)`` (``old`` with its updates applied, EMA weights not yet) gets
    the EMA of its params; metrics are ``train/loss``, ``train/grad_norm`` (of ``grads``), ``train/lr`` and
    ``metrics`` under ``train/``; the step is skipped unless loss, gradient norm and ``finite`` (further checks) are
    finite. ``update`` runs only for a finite step (``state.skip_if_nonfinite``): the optimizer goes there, not
    before this call, so that it updates the donated buffers in place.
    """
    grad_norm = optim.global_norm(grads)
    out = {
        "train/loss": loss,
        "train/grad_norm": grad_norm,
        "train/lr": jnp.asarray(lr_schedule(old.step), jnp.float32),
        **{f"train/{k}": v for k, v in metrics.items()},
    }
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if finite is not None:
        ok &= finite

    def updated(state: TrainState) -> TrainState:
        new = update(state)
        return new.replace(ema_params=ema_update(state.ema_params, new.params, ema_decay_at(state.step, ema_decay)))

    new_state = skip_if_nonfinite(old, updated, ok)
    return new_state, {**out, **counter_metrics(new_state)}


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

    def update(s: TrainState) -> TrainState:
        updates, opt_state = tx.update(grads, s.opt_state, s.params)
        return s.replace(params=optax.apply_updates(s.params, updates), opt_state=opt_state)

    return finish_step(
        state,
        update,
        loss=loss,
        grads=grads,
        metrics=aux,
        lr_schedule=lr_schedule,
        ema_decay=ema_decay,
    )

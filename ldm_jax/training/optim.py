"""Optimizer and learning-rate schedule from ``config.optim``."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from ldm_jax import config_lib

LR_SCHEDULES = ("constant", "cosine")
# How the peak learning rate follows the global batch: lr x (global_batch_size / base_batch_size) ** power.
LR_SCALING = {"none": 0.0, "linear": 1.0, "sqrt": 0.5}


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig(config_lib.Section):
    """``config.optim``: AdamW, its learning-rate schedule, clipping and the EMA of the weights."""

    lr: float
    warmup_steps: int
    schedule: str = "constant"
    final_lr_fraction: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float
    # Peak lr = lr x (data.global_batch_size / base_batch_size) ** {none: 0, linear: 1, sqrt: 0.5}.
    lr_scaling: str = "none"
    base_batch_size: int = 256

    def validate(self, prefix: str) -> None:
        self.check(self.lr > 0, prefix, "lr", "must be > 0")
        self.check(self.warmup_steps >= 0, prefix, "warmup_steps", "must be >= 0")
        for name in ("b1", "b2"):  # Adam's bias correction divides by 1 - b ** t
            self.check(0.0 <= getattr(self, name) < 1.0, prefix, name, "must be in [0, 1)")
        self.check(self.eps > 0, prefix, "eps", "must be > 0")
        self.check(self.weight_decay >= 0, prefix, "weight_decay", "must be >= 0")
        self.check(self.schedule in LR_SCHEDULES, prefix, "schedule", f"must be one of {LR_SCHEDULES}")
        self.check(0.0 <= self.ema_decay < 1.0, prefix, "ema_decay", "must be in [0, 1)")
        self.check(self.grad_clip >= 0, prefix, "grad_clip", "must be >= 0 (0 disables clipping)")
        self.check(self.lr_scaling in LR_SCALING, prefix, "lr_scaling", f"must be one of {tuple(LR_SCALING)}")
        self.check(self.base_batch_size >= 1, prefix, "base_batch_size", "must be >= 1")
        self.check(0.0 <= self.final_lr_fraction <= 1.0, prefix, "final_lr_fraction", "must be in [0, 1]")


def optim_section(lr: float, warmup_steps: int, ema_decay: float, schedule: str = "constant"):
    return OptimConfig.defaults(lr=lr, warmup_steps=warmup_steps, ema_decay=ema_decay, schedule=schedule)


def peak_learning_rate(optim, global_batch_size: int) -> float:
    """``optim.lr`` scaled by ``optim.lr_scaling`` for this global batch (the LDM reference scales linearly:
    base_lr x batch x GPUs, i.e. ``lr_scaling="linear"`` with ``base_batch_size=1``)."""
    power = LR_SCALING[optim.lr_scaling]
    return float(optim.lr) * (global_batch_size / optim.base_batch_size) ** power


def learning_rate_schedule(optim, total_steps: int, global_batch_size: int) -> optax.Schedule:
    """Linear warm-up from 0 to the peak rate over ``optim.warmup_steps``, then constant or cosine decay."""
    peak = peak_learning_rate(optim, global_batch_size)
    warm = optax.linear_schedule(0.0, peak, max(optim.warmup_steps, 1))
    if optim.schedule == "constant":
        after = optax.constant_schedule(peak)
    elif optim.schedule == "cosine":
        after = optax.cosine_decay_schedule(
            peak, max(total_steps - optim.warmup_steps, 1), alpha=optim.final_lr_fraction
        )
    else:
        raise ValueError(f"optim.schedule={optim.schedule!r}: must be one of {LR_SCHEDULES}")
    return optax.join_schedules([warm, after], [optim.warmup_steps])


def global_norm(tree) -> jax.Array:
    """The L2 norm of all leaves together, each squared and summed in float32 in leaf order: ``optax.global_norm``'s
    value for real leaves. Why not optax's: it also squares each leaf's imaginary part (zeros for real weights) and
    adds it, several operations per leaf that XLA removes only after paying for them. On the tiny txt2img train step
    (228 leaves, 8 CPU devices) this and ``clip_by_global_norm`` below cut tracing and lowering from 4.0-4.1 s to
    3.7-3.8 s and XLA's compile from 12.5 s to 11.6 s."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """``optax.clip_by_global_norm``: updates whose ``global_norm`` is at least ``max_norm`` are scaled down to it.
    One multiply per leaf by a scalar factor. The train step reports the norm of the same gradients through the
    same function (``steps.finish_step``); XLA keeps one of the two computations, as it did with optax's. Its
    state is optax's (``EmptyState``), so an optimizer state saved with either restores with the other."""

    def update(updates, state, params=None):
        del params
        norm = global_norm(updates)
        factor = jnp.where(norm < max_norm, 1.0, max_norm / norm)
        return jax.tree.map(lambda g: g * factor.astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(
    optim, total_steps: int, global_batch_size: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with global-norm clipping (clip first, as the reference trainers do)."""
    schedule = learning_rate_schedule(optim, total_steps, global_batch_size)
    chain = []
    if optim.grad_clip > 0:
        chain.append(clip_by_global_norm(optim.grad_clip))
    chain.append(optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay))
    return optax.chain(*chain), schedule

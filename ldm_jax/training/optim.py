"""Optimizer and learning-rate schedule from ``config.optim``."""

from __future__ import annotations

import optax

LR_SCHEDULES = ("constant", "cosine")


def learning_rate_schedule(optim, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to ``optim.lr`` over ``optim.warmup_steps``, then constant or cosine decay."""
    warm = optax.linear_schedule(0.0, optim.lr, max(optim.warmup_steps, 1))
    if optim.schedule == "constant":
        after = optax.constant_schedule(optim.lr)
    elif optim.schedule == "cosine":
        after = optax.cosine_decay_schedule(
            optim.lr, max(total_steps - optim.warmup_steps, 1), alpha=optim.final_lr_fraction
        )
    else:
        raise ValueError(f"optim.schedule={optim.schedule!r}: must be one of {LR_SCHEDULES}")
    return optax.join_schedules([warm, after], [optim.warmup_steps])


def make_optimizer(optim, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with global-norm clipping (clip first, as the reference trainers do)."""
    schedule = learning_rate_schedule(optim, total_steps)
    chain = []
    if optim.grad_clip > 0:
        chain.append(optax.clip_by_global_norm(optim.grad_clip))
    chain.append(optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay))
    return optax.chain(*chain), schedule

"""Rematerialisation (gradient checkpointing) policies, by name, for the per-block submodules of the networks.

A policy says which intermediates of a block's forward pass the backward pass may keep; the rest are recomputed.
Wrapping keeps every submodule's explicit ``name=``, so the parameter tree is the same under every policy and
checkpoints, weight converters and exports do not care which one trained a model.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax

_POLICIES: dict[str, Callable[..., bool] | None] = {
    "none": None,  # no remat: every activation the backward pass needs stays in memory
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only each block's inputs; recompute the block
    "dots": jax.checkpoint_policies.dots_saveable,  # keep matmul / convolution outputs, recompute the rest
    # Keep only matmuls without batch dimensions (the projections), recompute batched ones (attention scores).
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
REMAT_POLICIES = tuple(_POLICIES)


def remat(cls: type[nn.Module], policy: str, static_argnums: tuple[int, ...] = ()) -> type[nn.Module]:
    """``cls`` itself for ``policy="none"``, else ``nn.remat(cls)`` under that policy.

    ``static_argnums`` count ``self`` as 0 (flax's convention) and name Python arguments such as ``deterministic``
    that must stay concrete inside the checkpointed function.
    """
    if policy not in _POLICIES:
        raise ValueError(f"remat_policy={policy!r}: must be one of {REMAT_POLICIES}")
    if policy == "none":
        return cls
    return nn.remat(cls, policy=_POLICIES[policy], static_argnums=static_argnums)

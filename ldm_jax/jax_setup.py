"""Process-wide JAX settings, applied by every entry point (and the tests) before any computation."""

from __future__ import annotations

import jax


def configure() -> None:
    """Applies ldm_jax's JAX settings; idempotent.

    Threefry's "partitionable" mode (JAX's default) makes XLA:CPU compile ``jax.random.normal`` on
    multi-dimensional shapes about 20x slower (3.7 s vs 0.15 s for one (3, 3, 16, 16) draw on our 2-core CI
    machine): a tiny autoencoder's jitted init took 60 s to compile instead of 5 s, and every train step pays it
    for its noise draws. The classic mode draws the same values whatever the device count or mesh (the 8-vs-1
    device test checks this for our train step); a sharded draw is computed whole before slicing, which costs
    memory only at parameter init.
    """
    jax.config.update("jax_threefry_partitionable", False)

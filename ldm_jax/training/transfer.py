"""Host memory <-> the device mesh, correct when the mesh spans several processes.

Multi-process JAX has no cross-host device transfer: ``jax.device_put`` of an array that lives on one local device
onto a sharding that covers other processes' devices fails ("does not support cross-host device transfers"), numpy
inputs to a jitted function whose input sharding splits them over processes are refused, and ``jax.device_get`` of
an array split over processes cannot see the other processes' shards. So every value that enters or leaves the
mesh outside the training batches (which enter through ``data.pipeline.to_global``) goes through here:

- ``to_mesh``: a value that every process holds whole in host memory (weights read from a checkpoint, prompts,
  seeds, evaluation images) becomes a global array; each process builds only the shards its own devices hold, from
  its own copy, so nothing crosses hosts.
- ``to_host``: a global array becomes a numpy array on every process: a replicated one from a local replica, a
  split one by an all-gather over processes (a collective: every process must call it, in the same order).

In a single process both reduce to plain transfers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils


def _host_value(x) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        raise ValueError(
            f"to_mesh: got a global array of shape {x.shape} that spans processes; it is already on a mesh "
            "(use it as it is, or to_host it first)"
        )
    return np.asarray(x)


def to_mesh(tree: Any, shardings: Any) -> Any:
    """``tree`` (numpy / Python scalars / single-device jax arrays, the same full value on every process) placed
    with ``shardings`` (one ``Sharding`` for every leaf, or a tree of them matching ``tree``). None leaves stay
    None. Every process must pass the same values: each builds its own shards from its copy."""

    def put(x, sharding):
        if x is None:
            return None
        value = _host_value(x)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: put(x, shardings), tree)
    return jax.tree.map(put, tree, shardings)


def to_host(tree: Any) -> Any:
    """Global arrays -> numpy arrays holding the whole value, on every process. A leaf split over processes is
    all-gathered (collective: call on every process); replicated and process-local leaves are read locally."""

    def get(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return np.asarray(jax.device_get(x))
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(get, tree)


def rows_to_mesh(shape: tuple[int, ...], dtype, sharding, rows: Callable[[int, int], np.ndarray]) -> jax.Array:
    """A global array of ``shape`` whose leading axis ``sharding`` splits (a batch), built from ``rows(lo, hi)``
    (numpy [hi - lo, *shape[1:]]): each process is asked only for the rows its own devices hold, so a process reads
    and decodes only its share of a batch (images of an evaluation set, say), not the whole batch."""

    def shard(index):
        lo, hi, _ = index[0].indices(shape[0])
        return np.asarray(rows(lo, hi), dtype)[(slice(None), *index[1:])]

    return jax.make_array_from_callback(shape, sharding, shard)


def local_rows(x: jax.Array) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, numpy block) of each block of the leading axis this process's devices hold, each row once (a
    row replicated on several local devices comes from one of them). No communication."""
    for shard in x.addressable_shards:
        if shard.replica_id == 0:
            yield shard.index[0].indices(x.shape[0])[0], np.asarray(shard.data)


def rows_per_call(batch_size: int, num_devices: int) -> int:
    """``batch_size`` (at least 1) rounded up to a multiple of ``num_devices``: every device gets the same rows."""
    return -(-max(batch_size, 1) // num_devices) * num_devices


def padded_batches(n: int, per_call: int) -> Iterator[tuple[int, int, list[int]]]:
    """``(start, count, indices)`` of consecutive batches of ``per_call`` rows over ``n`` items; the last batch repeats
    its last item up to ``per_call`` rows, so every batch has one shape (one compiled program) and its first ``count``
    rows are items ``start .. start + count - 1``."""
    for start in range(0, n, per_call):
        count = min(per_call, n - start)
        yield start, count, [start + min(i, count - 1) for i in range(per_call)]

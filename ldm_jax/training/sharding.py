"""Device mesh and the shardings of parameters and batches: the one place that names mesh axes.

The mesh has axes ``('data', 'fsdp')``. Batches are split over both axes (every device sees its own examples).
Parameters, EMA and optimizer state are replicated when ``fsdp == 1`` (pure data parallelism, the default) and
otherwise split along one dimension over ``'fsdp'`` (fully sharded data parallelism); XLA inserts the gathers.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ldm_jax import config_lib

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")
# Leaves smaller than this stay replicated under FSDP: splitting them saves no memory worth the collectives.
FSDP_MIN_SIZE = 2**14


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig(config_lib.Section):
    """``config.mesh``: devices along each mesh axis; -1 fills the devices the other axis leaves."""

    data: int = -1
    fsdp: int = 1

    def validate(self, prefix: str) -> None:
        for name in ("data", "fsdp"):
            v = getattr(self, name)
            self.check(v == -1 or v >= 1, prefix, name, "must be -1 (fill) or >= 1")


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
    """Builds the ('data', 'fsdp') mesh over all devices; ``-1`` for one axis fills the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if data == -1 and fsdp == -1:
        raise ValueError("mesh.data and mesh.fsdp are both -1: at most one axis may be -1")
    if data == -1:
        if fsdp < 1 or n % fsdp:
            raise ValueError(f"mesh.fsdp={fsdp}: must be >= 1 and divide the device count {n}")
        data = n // fsdp
    elif fsdp == -1:
        if data < 1 or n % data:
            raise ValueError(f"mesh.data={data}: must be >= 1 and divide the device count {n}")
        fsdp = n // data
    if data * fsdp != n:
        raise ValueError(f"mesh.data={data} x mesh.fsdp={fsdp} = {data * fsdp} devices, but {n} are available")
    return Mesh(np.asarray(devices).reshape(data, fsdp), MESH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over every device."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch_size(global_batch_size: int, mesh: Mesh, field: str = "data.global_batch_size") -> None:
    n = mesh.size
    if global_batch_size % n or global_batch_size % jax.process_count():
        raise ValueError(
            f"{field}={global_batch_size}: must be divisible by the device count {n} "
            f"(and the process count {jax.process_count()})"
        )


def _leaf_spec(shape, fsdp: int) -> P:
    if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < FSDP_MIN_SIZE:
        return P()
    # Split the largest dimension that the fsdp axis divides; ties go to the last (output) dimension.
    best = None
    for dim in range(len(shape)):
        if shape[dim] % fsdp == 0 and (best is None or shape[dim] >= shape[best]):
            best = dim
    if best is None:
        return P()
    spec = [None] * len(shape)
    spec[best] = "fsdp"
    return P(*spec)


def tree_shardings(abstract_tree, mesh: Mesh):
    """NamedSharding for every leaf of a parameter-like tree (params, EMA, optimizer moments)."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, _leaf_spec(x.shape, fsdp)), abstract_tree)

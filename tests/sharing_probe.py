"""A small program over a mesh that spans processes, for ``test_multihost``'s checks of ``compile_sharing.py`` and of
the persistent cache in multi-process CPU jobs:

  python tests/compile_sharing.py tests.sharing_probe --out=FILE [--coordinator_address=... --num_processes=2
      --process_id=0|1]

Each process contributes its own rows; each writes the replicated result (a reduction, whose XLA:CPU kernel a
badly shared executable lacks) to ``FILE.<process>.npy``.
"""

import jax
import numpy as np
from absl import app, flags

from ldm_jax import jax_setup
from ldm_jax.training import distributed


def program(x):
    return (x * 3).sum(axis=1) * x.mean()


def rows(process: int) -> np.ndarray:
    return np.arange(4, dtype=np.float32).reshape(2, 2) + 10 * process


def main(out_prefix: str, initialize_distributed) -> None:
    initialize_distributed()
    jax_setup.configure()  # as every entry point does: it decides whether this job may use the persistent cache
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(jax.devices()), ("data",))
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, PartitionSpec("data")), rows(jax.process_index()))
    out = jax.jit(program, out_shardings=NamedSharding(mesh, PartitionSpec()))(x)
    np.save(f"{out_prefix}.{jax.process_index()}.npy", np.asarray(out))


if __name__ == "__main__":
    # Flags only when run: the test imports program and rows into a pytest worker that holds other modules' flags.
    _out = flags.DEFINE_string("out", None, "Result path prefix.")
    _initialize = distributed.define_flags()
    app.run(lambda argv: main(_out.value, _initialize))

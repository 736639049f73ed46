"""The tiny UNet's forward pass under the splash attention kernel (Pallas's interpreter) with its batch on a mesh that
spans processes: the worker of ``test_attention.py``'s two-process test.

  PYTHONPATH=.:tests python tests/splash_driver.py --out=out.npy \\
      --coordinator_address=127.0.0.1:PORT --num_processes=2 --process_id=0|1

Each process starts the JAX distributed system as ``python -m ldm_jax.train`` does, puts the batch on a ('data',
'fsdp') mesh over every device of both processes, runs the jitted forward pass, and process 0 writes the gathered
output and whether the program ran the kernel under ``shard_map``.
"""

from __future__ import annotations

import json

import compile_sharing
from absl import app, flags

from ldm_jax.training import distributed


def tiny_unet_case(batch: int = 8):
    """The tiny UNet (attention at its 8x8 level: 64-position self-attention, 5-token cross-attention), its
    parameters with a random (non-zero) output layer, its inputs, and ``apply(params, x, t, ctx)``."""
    import jax
    import jax.numpy as jnp

    from ldm_jax.models.unet import UNET_VARIANTS, UNetConfig

    unet = UNetConfig(**UNET_VARIANTS["tiny"]).build(in_channels=4, out_channels=4, context_dim=16)
    x = jax.random.normal(jax.random.key(1), (batch, 16, 16, 4))
    t = jnp.arange(batch) * 120
    ctx = jax.random.normal(jax.random.key(2), (batch, 5, 16))
    params = unet.init(jax.random.key(0), x[:1], t[:1], ctx[:1])["params"]
    params["conv_out"] = jax.tree.map(lambda a: jax.random.normal(jax.random.key(3), a.shape) * 0.1, params["conv_out"])
    return params, (x, t, ctx), lambda p, x, t, c: unet.apply({"params": p}, x, t, c)


def run(out_path: str, initialize_distributed) -> None:
    compile_sharing.share_compiles()  # process 0 compiles the sharded UNet, process 1 loads it
    initialize_distributed()
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    from ldm_jax import jax_setup
    from ldm_jax.models import attention
    from ldm_jax.training.sharding import batch_sharding, make_mesh, replicated
    from ldm_jax.training.transfer import to_mesh

    jax_setup.configure()  # as every entry point (and the tests' process): the same random draws
    attention.set_implementation("splash", interpret=True)
    params, inputs, apply = tiny_unet_case()
    mesh = make_mesh(-1, 2)  # 2 processes x 2 devices: data 2 x fsdp 2, each process holding its own rows

    params = to_mesh(params, replicated(mesh))
    rows = batch_sharding(mesh)
    inputs = to_mesh(list(inputs), rows)
    program = str(jax.make_jaxpr(apply)(params, *inputs))
    out = jax.jit(apply)(params, *inputs)
    full = np.asarray(multihost_utils.process_allgather(out, tiled=True))
    if jax.process_index() == 0:
        np.save(out_path, full)
        with open(out_path + ".json", "w") as f:
            json.dump(
                {
                    "processes": jax.process_count(),
                    "devices": jax.device_count(),
                    "kernel": "pallas_call" in program,
                    "shard_maps": program.count("shard_map"),
                    "output_sharded_like_rows": out.sharding.is_equivalent_to(rows, out.ndim),
                },
                f,
            )


if __name__ == "__main__":
    # Flags are defined here, not at import: the tests import tiny_unet_case into processes whose other modules
    # define the same distributed flags.
    out = flags.DEFINE_string("out", None, "Where process 0 writes the gathered output (.npy) and a .json beside it.")
    initialize = distributed.define_flags()
    flags.mark_flags_as_required(["out"])
    app.run(lambda argv: run(out.value, initialize))

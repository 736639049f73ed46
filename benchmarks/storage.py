"""Checkpoint save and restore throughput: a GCS bucket (a fake-gcs-server emulator on 127.0.0.1) against local disk,
for one run's whole train state (params, EMA, optimizer), through the training loop's ``Checkpointer``.

  .venv/bin/python benchmarks/storage.py [--workdir=runs/demo/txt2img] [--repeats=3]

The state is the newest checkpoint of ``--workdir`` (the demo's txt2img run by default: ``bash launch/local.sh demo``
makes it), restored onto one CPU device. Each repeat saves it as a new step to a local folder and to
``gs://bench/...`` on the emulator, then restores that step from each. Reports MiB/s and the bucket/local ratio.
The emulator stores objects on the same local disk, so the ratio is the cost of the GCS protocol path (HTTP,
tensorstore's GCS driver, commit markers), not of a network: a real bucket adds its latency and bandwidth.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", "runs/demo/txt2img", "A run whose newest checkpoint is the state saved.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Save/restore rounds per destination; the median is reported.")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))  # the emulator starter the tests use


def _state(workdir: str):
    import jax

    from ldm_jax.training.checkpoint import Checkpointer

    ckpt = Checkpointer(workdir, max_to_keep=100, async_save=False)
    step = ckpt.latest_step()
    if step is None:
        raise app.UsageError(f"--workdir={workdir}: no checkpoint; run `bash launch/local.sh demo` first")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    meta = ckpt.manager.item_metadata(step)["state"]
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta)
    state, _ = ckpt.restore(step, abstract)
    ckpt.close()
    return state, abstract


def _round(directory: str, state, abstract, step: int) -> tuple[float, float]:
    import jax

    from ldm_jax.training.checkpoint import Checkpointer

    ckpt = Checkpointer(directory, max_to_keep=100, async_save=False)
    t0 = time.perf_counter()
    ckpt.save(step, state, {"bench": step}, force=True)
    ckpt.wait()
    saved = time.perf_counter() - t0
    t0 = time.perf_counter()
    restored, _ = ckpt.restore(step, abstract)
    jax.block_until_ready(restored)
    loaded = time.perf_counter() - t0
    ckpt.close()
    return saved, loaded


def main(argv):
    del argv
    import jax
    import numpy as np
    from gcs_emulator import Emulator

    state, abstract = _state(_WORKDIR.value)
    mib = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)) / 2**20
    with tempfile.TemporaryDirectory() as tmp:
        emulator = Emulator(os.path.join(tmp, "gcs"), ("bench",))
        os.environ.update(emulator.env)
        try:
            times = {"local": [], "bucket": []}
            for r in range(_REPEATS.value):
                times["local"].append(_round(os.path.join(tmp, "local"), state, abstract, r))
                times["bucket"].append(_round("gs://bench/run", state, abstract, r))
        finally:
            emulator.stop()
    print(f"state of {_WORKDIR.value}: {len(jax.tree.leaves(state))} arrays, {mib:.1f} MiB; median of {_REPEATS.value}")
    print("| | save (s) | save MiB/s | restore (s) | restore MiB/s |")
    print("|---|---|---|---|---|")
    med = {k: np.median(np.asarray(v), axis=0) for k, v in times.items()}
    for k, (s, r) in med.items():
        print(f"| {k} | {s:.2f} | {mib / s:.0f} | {r:.2f} | {mib / r:.0f} |")
    print(f"bucket / local time: save {med['bucket'][0] / med['local'][0]:.2f}x, "
          f"restore {med['bucket'][1] / med['local'][1]:.2f}x")  # fmt: skip


if __name__ == "__main__":
    app.run(main)

"""Trains a list of runs in one process of a (possibly multi-process) JAX job: the multi-host matrix's worker.

  PYTHONPATH=. python tests/multihost_driver.py --spec=cases.json \\
      [--coordinator_address=127.0.0.1:PORT --num_processes=2 --process_id=0|1]

Each process starts the JAX distributed system exactly as ``python -m ldm_jax.train`` does
(``ldm_jax.training.distributed.initialize`` from the same flags), then, for every case of the spec, calls the same
``train_and_evaluate`` once per entry of ``stops`` (``config.train.num_steps`` set to it): ``[2, 4]`` trains to step
2, returns (checkpoint written, everything closed) and resumes from that checkpoint to step 4. One process running
several cases pays the interpreter, JAX and distributed start-up once instead of once per case.

The spec: ``{"cases": [{"name", "config": "<module>:<preset>" or a config.json path, "set": {"dotted.field":
value}, "workdir", "stops": [int, ...], "damage_before_stop": int (optional: the newest checkpoint is damaged before
the invocation that trains to that stop)}], "timings": "<path or empty>", "shared_compile_cache": "<folder or
empty>"}``; process 0 writes per-case wall times to ``timings``.

With ``shared_compile_cache`` (a multi-process spec), process 0 compiles every program and hands the executable to
the other processes (``share_compiles``): the other processes of a job run the same program, so they would only
compile it again, on the same CPU cores.
"""

from __future__ import annotations

import importlib
import json
import time

from absl import app, flags, logging

from ldm_jax.training import distributed

_SPEC = flags.DEFINE_string("spec", None, "JSON file listing the runs (see the module docstring).")
flags.mark_flags_as_required(["spec"])
_INITIALIZE_DISTRIBUTED = distributed.define_flags()  # the same flags and start-up as ldm_jax.train


def build_config(name: str, overrides: dict):
    """``name``: "<configs module>:<preset>", or the path of a run's config.json (e.g. a converted pipeline's)."""
    if name.endswith(".json"):
        from ldm_jax import config_lib

        config = config_lib.load_config(name)
    else:
        module, preset = name.split(":")
        config = importlib.import_module(f"configs.{module}").get_config(preset)
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        section = config
        for p in parents:
            section = section[p]
        section[leaf] = value
    return config


def _damage_newest(workdir: str) -> None:
    """Process 0 damages the newest checkpoint of ``workdir`` (as a bad write would); every process waits for it."""
    import os

    import jax
    from damage import damage_checkpoint

    from ldm_jax.training.distributed import barrier

    if jax.process_index() == 0:
        folder = os.path.join(workdir, "checkpoints")
        newest = max((n for n in os.listdir(folder) if n.isdigit()), key=int)
        damage_checkpoint(os.path.join(folder, newest))
        logging.info("damaged checkpoint %s of %s", newest, workdir)
    barrier("matrix_damage")


def share_compiles(cache_dir: str) -> None:
    """Process 0 compiles each program once and the others load its executable (JAX's
    ``jax_share_binary_between_hosts``), with XLA's persistent cache in ``cache_dir``, a folder of this job alone.

    Why the patch: JAX keys a compiled program partly by the devices' topology fingerprint, and on the CPU backend
    that fingerprint differs between the processes of one job (each describes its own host), so process 1 would
    wait for a key that process 0 never writes. The replacement hashes the global device list instead, which every
    process sees alike; single-process programs keep JAX's key. The folder must be this job's own: if process 0
    found a program in a cache that another job had just written, it would not share it, and process 1, which had
    looked a moment earlier, would wait for it until the share timeout.
    """
    import hashlib

    import jax
    from jax._src import cache_key

    original = cache_key._hash_accelerator_config  # fails loudly if a JAX release renames it

    def hash_accelerators(hash_obj, accelerators):
        devices = list(accelerators.flat)
        if devices[0].platform != "cpu" or len({d.process_index for d in devices}) == 1:
            return original(hash_obj, accelerators)
        described = ";".join(f"{d.platform}:{d.id}:{d.process_index}" for d in devices)
        hash_obj.update(hashlib.sha256(described.encode()).digest())

    cache_key._hash_accelerator_config = hash_accelerators
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_share_binary_between_hosts", True)
    # Longer than any one compile of the matrix on a busy 2-core machine; a process left waiting fails the test.
    jax.config.update("jax_share_binary_between_hosts_timeout_ms", 600_000)


def main(argv):
    del argv
    import jax

    from ldm_jax import jax_setup
    from ldm_jax.training.loop import train_and_evaluate
    from ldm_jax.training.reporting import quiet_library_logs

    logging.set_verbosity(logging.INFO)
    quiet_library_logs()
    with open(_SPEC.value) as f:
        spec = json.load(f)
    if spec.get("shared_compile_cache"):  # before anything compiles: JAX opens its cache folder once
        share_compiles(spec["shared_compile_cache"])
    _INITIALIZE_DISTRIBUTED()
    jax_setup.configure()  # after distributed: it asks for the backend
    timings = {}
    for case in spec["cases"]:
        t0 = time.perf_counter()
        for stop in case["stops"]:
            if case.get("damage_before_stop") == stop:
                _damage_newest(case["workdir"])
            config = build_config(case["config"], case["set"])
            config.train.num_steps = stop
            train_and_evaluate(config, case["workdir"])
        timings[case["name"]] = round(time.perf_counter() - t0, 1)
    if spec.get("timings") and jax.process_index() == 0:
        with open(spec["timings"], "w") as f:
            json.dump(timings, f)


if __name__ == "__main__":
    app.run(main)

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
the invocation that trains to that stop)}], "timings": "<path or empty>"}``; process 0 writes per-case wall times to
``timings``.

In a multi-process job, process 0 compiles every program that spans processes and hands the executable to the
others (``compile_sharing.share_compiles``): they run the same programs, so they would only compile them again, on
the same CPU cores.
"""

from __future__ import annotations

import importlib
import json
import time

import compile_sharing
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
    compile_sharing.share_compiles()  # before anything compiles; single-process programs are left as they are
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

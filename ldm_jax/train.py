"""Training entry point.

  python -m ldm_jax.train --config=configs/txt2img.py:demo --workdir=runs/demo/txt2img [--config.optim.lr=3e-5]

Trains ``config.task`` (see ``configs/``) in ``--workdir``, resuming from its latest checkpoint when present. A resume
under a config that changes what the steps compute (another batch, model, optimizer, data ...) is refused, naming the
fields, unless ``--allow_config_change`` (``training/resume_config.py``).

Multi-process (several hosts, or one process per GPU): the same command in every process. On a TPU pod slice and
under SLURM (``srun``) the cluster is detected; elsewhere pass the coordinator (process 0's host:port), the process
count and each process's id (or set LDM_JAX_COORDINATOR_ADDRESS, LDM_JAX_NUM_PROCESSES, LDM_JAX_PROCESS_ID):

  python -m ldm_jax.train --config=... --workdir=<shared> --coordinator_address=10.0.0.1:1234 --num_processes=2 \
      --process_id=0     # and --process_id=1 in the other process

See ``ldm_jax/training/distributed.py`` and ``launch/``.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from ldm_jax import jax_setup, user_errors
from ldm_jax.training import distributed

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, optionally with ':preset'.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, previews and config.json.")
flags.mark_flags_as_required(["config", "workdir"])
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change",
    False,
    "Resume a workdir whose run was trained with a config that differs in what the steps compute (model, data, "
    "batch, optimizer, diffusion, seed); without it such a resume is refused, naming each changed field. The old "
    "config.json is kept as config.before_step<N>.json. See ldm_jax/training/resume_config.py.",
)
_INITIALIZE_DISTRIBUTED = distributed.define_flags()
_CONFIGURE_JAX = jax_setup.define_flags()


def refuse_repeated_tuple_overrides(args: list[str]) -> None:
    """ml_collections appends the values of a tuple field given twice (``--config.unet.num_heads=2,2
    --config.unet.num_heads=8,8`` becomes (2, 2, 8, 8)) where any other flag keeps its last value: a launcher's
    default followed by a user's override would silently build another model, or fail far from the cause.
    Refused by name instead."""
    given: dict[str, list[str]] = {}
    for i, arg in enumerate(args):
        if not arg.startswith("--config."):
            continue
        name, eq, value = arg[2:].partition("=")
        if not eq:  # --config.field value
            value = args[i + 1] if i + 1 < len(args) else ""
        if name in flags.FLAGS and isinstance(flags.FLAGS[name], flags.MultiFlag):
            given.setdefault(name, []).append(value)
    for name, values in given.items():
        if len(values) > 1:
            raise app.UsageError(
                f"--{name} is given {len(values)} times ({' and '.join(values)}): its values would be appended into "
                f"one tuple; give it once with all its entries, e.g. --{name}={values[-1]}"
            )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    refuse_repeated_tuple_overrides(sys.argv[1:])
    from ldm_jax.training.loop import train_and_evaluate
    from ldm_jax.training.reporting import quiet_library_logs

    logging.set_verbosity(logging.INFO)
    quiet_library_logs()
    _INITIALIZE_DISTRIBUTED()
    _CONFIGURE_JAX()  # after distributed: it asks for the backend
    train_and_evaluate(_CONFIG.value, _WORKDIR.value, _ALLOW_CONFIG_CHANGE.value)


if __name__ == "__main__":
    user_errors.run(main)

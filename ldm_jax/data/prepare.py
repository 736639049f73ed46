"""First-use preparation of the embedded TFDS datasets, offline, serialised between processes.

Every builder here generates its examples locally (nothing is downloaded). Processes that share a data directory
(the hosts of one job, parallel test workers) take a file lock around preparation: the first prepares, the others
wait and then find the dataset ready. A file lock rather than a collective, so that no code path has to be entered
by every process.
"""

from __future__ import annotations

import contextlib
import fcntl
import os

import tensorflow_datasets as tfds


def default_data_dir() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "ldm_jax", "tensorflow_datasets")


@contextlib.contextmanager
def _lock(data_dir: str, name: str):
    os.makedirs(data_dir, exist_ok=True)
    with open(os.path.join(data_dir, f".{name}.prepare.lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepared_builder(builder_cls: type[tfds.core.GeneratorBasedBuilder], config_name: str, data_dir: str = ""):
    """``builder_cls`` at ``config_name`` in ``data_dir`` (default: ``default_data_dir()``), prepared on first use."""
    names = [c.name for c in builder_cls.BUILDER_CONFIGS]
    if config_name not in names:
        raise ValueError(f"data.config={config_name!r}: must be one of {names}")
    data_dir = data_dir or default_data_dir()
    with _lock(data_dir, f"{builder_cls.name}-{config_name}"):
        builder = builder_cls(config=config_name, data_dir=data_dir, file_format="array_record")
        builder.download_and_prepare()
    return builder

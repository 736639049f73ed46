"""What a training run optimises: the task kinds of ``config.task``, built and validated from their config.

Every latent diffusion kind is ``LatentDiffusionTask`` with a conditioner and a concat input (``TASKS``); the first
stage is ``AutoencoderTask``. The interface callers rely on is in ``tasks/protocol.py``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import jax
import jax.numpy as jnp

from ldm_jax import config_lib
from ldm_jax.data.pipeline import DataConfig
from ldm_jax.tasks.autoencoder import AutoencoderTask
from ldm_jax.tasks.concat_inputs import LowResConcat, MaskConcat, NoConcat
from ldm_jax.tasks.conditioners import ClassConditioner, NoiseLevelConditioner, NullConditioner, TextConditioner
from ldm_jax.tasks.latent_diffusion import LatentDiffusionTask
from ldm_jax.training.train_config import TrainConfig
from ldm_jax.training.optim import OptimConfig
from ldm_jax.training.sharding import MeshConfig

DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class TaskKind:
    build: Callable  # config -> task
    validate: Callable  # config -> None, raises ValueError naming the field
    parts: tuple = ()  # the classes it is composed of (latent diffusion: conditioner, concat input)
    labelled: bool = False  # trains on captions or class labels (not on an images-only dataset)
    # Can train from a latent cache (``data.source=latents:DIR``): its step needs the latents, not the pixels.
    from_latents: bool = False


def _latent(conditioner, concat) -> TaskKind:
    return TaskKind(
        build=lambda c: LatentDiffusionTask(c, conditioner, concat),
        validate=lambda c: LatentDiffusionTask.validate(c, conditioner, concat),
        parts=(conditioner, concat),
        labelled=conditioner in (TextConditioner, ClassConditioner),
        from_latents=not concat.needs_pixels,
    )


TASKS = {
    "autoencoder": TaskKind(AutoencoderTask, AutoencoderTask.validate),
    "txt2img": _latent(TextConditioner, NoConcat),
    "class_cond": _latent(ClassConditioner, NoConcat),
    "unconditional": _latent(NullConditioner, NoConcat),
    "inpainting": _latent(TextConditioner, MaskConcat),
    "superres": _latent(NoiseLevelConditioner, LowResConcat),
}
DIFFUSION_TASKS = tuple(k for k, v in TASKS.items() if v.parts)
# The ldm_jax.sample flags whose meaning depends on the task: each is read by one kind of part.
SAMPLE_FLAGS = tuple(dict.fromkeys(f for k in TASKS.values() for part in k.parts for f in part.FLAGS))


def _kind(name) -> TaskKind:
    if name not in TASKS:
        raise ValueError(f"task={name!r}: must be one of {tuple(TASKS)}")
    return TASKS[name]


def build_task(config):
    return _kind(config.task).build(config)


def validate_config(c) -> None:
    """Checks a config before any device work; raises ValueError naming the first bad field."""
    kind = _kind(c.task)
    config_lib.check(c.dtype in DTYPES, "dtype", c.dtype, f"must be one of {DTYPES}")
    # The run's PRNG key, and preview image i's seed + i as a uint32 key.
    config_lib.check(0 <= c.seed < 2**31, "seed", c.seed, "must be in [0, 2**31)")
    data = DataConfig.from_config(c.data, "data.")
    config_lib.check(
        data.labelled or not kind.labelled,
        "data.name",
        data.name,
        f"has images only (no captions or class labels); task={c.task!r} needs a labelled dataset: 'shapes_captions'",
    )
    config_lib.check(
        kind.from_latents or not data.from_latents,
        "data.source",
        data.source,
        f"task={c.task!r} needs the images in its step (a latent cache trains txt2img, class_cond and unconditional "
        "models); name the images themselves",
    )
    OptimConfig.from_config(c.optim, "optim.")
    train = TrainConfig.from_config(c.train, "train.")
    config_lib.check(
        data.global_batch_size % train.grad_accum_steps == 0,
        "train.grad_accum_steps",
        train.grad_accum_steps,
        f"must divide data.global_batch_size={data.global_batch_size}",
    )
    MeshConfig.from_config(c.mesh, "mesh.")
    kind.validate(c)


def check_sample_flags(task_name: str, given: set[str]) -> None:
    """Raises ValueError naming the ``ldm_jax.sample`` flags in ``given`` that no part of this task reads."""
    kind = _kind(task_name)
    read = {f for part in kind.parts for f in part.FLAGS}
    for other in dict.fromkeys(p for k in TASKS.values() for p in k.parts):
        stray = [f for f in other.FLAGS if f in given and f not in read]
        if stray:
            names = [f"--{f}" for f in other.FLAGS]
            listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
            verb = "needs" if len(names) == 1 else "need"
            raise ValueError(f"{listed} {verb} {other.NEEDS}; this is a {task_name} run")


def load_for_sampling(workdir: str, weights: str = "ema", image_size: int = 0, tasks=DIFFUSION_TASKS, config=None):
    """(task, params, frozen, mesh, step) of a latent diffusion workdir, ready for ``task.generate_images``.

    ``image_size`` > 0 samples at another resolution than the run's ``data.image_size`` (the UNet is convolutional).
    ``config``: the workdir's config when the caller has already read it.
    """
    if config is None:
        config = config_lib.load_config(os.path.join(workdir, "config.json"))
    if image_size:
        config.data.image_size = int(image_size)
    if config.task not in tasks:
        raise ValueError(f"workdir {workdir!r}: holds a {config.task!r} run; sampling needs a {' or '.join(tasks)} run")
    task = build_task(config)
    params, frozen, mesh, step = task.load_weights(workdir, weights)
    return task, params, frozen, mesh, step


def cast_weights(params, frozen, dtype):
    """``params`` and ``frozen`` with every floating-point network weight in ``dtype`` (sampling in bfloat16 holds
    half the bytes and reads half as many per step). One jitted elementwise program: each array keeps its sharding,
    so it works when the mesh spans processes (every process calls it, as every process loaded the weights).
    ``frozen["latent_scale"]`` stays as it is, since the latents it scales are float32 in the sampler."""
    dtype = jnp.dtype(dtype)

    @jax.jit
    def cast(tree):
        return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)

    frozen = {k: (v if k == "latent_scale" else cast(v)) for k, v in frozen.items()}
    return cast(params), frozen

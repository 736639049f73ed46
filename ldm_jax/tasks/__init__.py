"""What a training run optimises: one class per ``config.task``."""

from __future__ import annotations

import os

from absl import logging

from ldm_jax import config_lib
from ldm_jax.tasks.autoencoder import AutoencoderTask
from ldm_jax.tasks.class_cond import ClassCondTask
from ldm_jax.tasks.inpainting import InpaintingTask
from ldm_jax.tasks.superres import SuperResTask
from ldm_jax.tasks.txt2img import Txt2ImgTask

TASK_CLASSES = {
    "autoencoder": AutoencoderTask,
    "txt2img": Txt2ImgTask,
    "class_cond": ClassCondTask,
    "unconditional": ClassCondTask,
    "inpainting": InpaintingTask,
    "superres": SuperResTask,
}
DIFFUSION_TASKS = ("txt2img", "class_cond", "unconditional", "inpainting", "superres")


def build_task(config):
    if config.task not in TASK_CLASSES:
        raise ValueError(f"task={config.task!r}: must be one of {tuple(TASK_CLASSES)}")
    return TASK_CLASSES[config.task](config)


def load_for_sampling(workdir: str, weights: str = "ema", image_size: int = 0, tasks=DIFFUSION_TASKS, config=None):
    """(task, params, frozen, mesh, step) of a latent diffusion workdir, ready for ``task.generate_images``.

    ``image_size`` > 0 samples at another resolution than the run's ``data.image_size`` (the UNet is convolutional).
    ``config``: the workdir's config when the caller has already read it.
    """
    from ldm_jax.training import checkpoint, transfer
    from ldm_jax.training.sharding import make_mesh, replicated

    if config is None:
        config = config_lib.load_config(os.path.join(workdir, "config.json"))
    if image_size:
        config.data.image_size = int(image_size)
    if config.task not in tasks:
        raise ValueError(f"workdir {workdir!r}: holds a {config.task!r} run; sampling needs a {' or '.join(tasks)} run")
    mesh = make_mesh(-1, 1)
    task = build_task(config)
    params, meta, step = checkpoint.load_trained_params(workdir, weights)
    frozen, _ = task.setup(meta)
    # Every process read the same weights: each places its own replicas (works when the mesh spans processes).
    params, frozen = transfer.to_mesh((params, frozen), replicated(mesh))
    logging.info("loaded %s weights of %s at step %d; %d devices", weights, workdir, step, mesh.size)
    return task, params, frozen, mesh, step

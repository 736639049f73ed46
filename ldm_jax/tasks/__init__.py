"""What a training run optimises: one class per ``config.task``."""

from ldm_jax.tasks.autoencoder import AutoencoderTask
from ldm_jax.tasks.txt2img import Txt2ImgTask

TASK_CLASSES = {"autoencoder": AutoencoderTask, "txt2img": Txt2ImgTask}


def build_task(config):
    if config.task not in TASK_CLASSES:
        raise ValueError(f"task={config.task!r}: must be one of {tuple(TASK_CLASSES)}")
    return TASK_CLASSES[config.task](config)

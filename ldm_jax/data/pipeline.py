"""Input pipeline: grain over the TFDS data source -> per-host numpy batches -> global ``jax.Array`` batches.

Each process reads only its shard of the records (``ShardOptions(process_index, process_count)``); shuffling is a
deterministic function of ``data.shuffle_seed``; the iterator's position is checkpointable (see
``training/checkpoint.py``).
"""

from __future__ import annotations

from typing import Optional

import grain.python as grain
import jax
import numpy as np

from ldm_jax.data import photos, shapes
from ldm_jax.data.tokenizer import CLIPTokenizer


def to_model_range(images: np.ndarray) -> np.ndarray:
    """uint8 images -> float32 in [-1, 1], the range every model here takes."""
    return images.astype(np.float32) / 127.5 - 1.0


class Preprocess(grain.MapTransform):
    """uint8 image -> float32 in [-1, 1]; caption -> token ids (when a tokenizer is given); attributes -> a class
    id under ``labeling`` (see ``shapes.LABELINGS``) as "label"."""

    def __init__(self, tokenizer: Optional[CLIPTokenizer], labeling: Optional[str] = None):
        self.tokenizer = tokenizer
        self.labeling = labeling

    def map(self, example: dict) -> dict:
        out = {"image": to_model_range(example["image"])}
        if self.labeling:
            out["label"] = np.int32(shapes.class_label(example, self.labeling))
        if self.tokenizer is not None:
            text = example["caption"]
            text = text.decode("utf-8") if isinstance(text, bytes) else str(text)
            out["tokens"] = self.tokenizer(text)[0]
        return out


def data_source(data_config, split: str):
    if data_config.name == "shapes_captions":
        builder = shapes.get_builder(data_config.config, data_config.data_dir)
    elif data_config.name == "photo_crops":
        builder = photos.get_builder(data_config.config, data_config.data_dir)
    else:
        raise ValueError(f"data.name={data_config.name!r}: must be one of ('shapes_captions', 'photo_crops')")
    size = builder.builder_config.image_size
    if size != data_config.image_size:
        raise ValueError(
            f"data.image_size={data_config.image_size}: dataset config {data_config.config!r} has {size}x{size} images"
        )
    return builder.as_data_source(split=split)


def first_images(data_config, split: str, count: int) -> np.ndarray:
    """The first ``count`` images of ``split`` in record order (no shuffle), as float32 [N, H, W, 3] in [-1, 1]."""
    source = data_source(data_config, split)
    n = min(count, len(source))
    return to_model_range(np.stack([source[i]["image"] for i in range(n)]))


def make_loader(
    data_config,
    split: str,
    global_batch_size: int,
    tokenizer: Optional[CLIPTokenizer] = None,
    labeling: Optional[str] = None,
    shuffle: bool = True,
    num_epochs: Optional[int] = None,
) -> grain.DataLoader:
    """A grain loader yielding this process's share (global_batch_size / process_count) of every batch."""
    source = data_source(data_config, split)
    local = global_batch_size // jax.process_count()
    sampler = grain.IndexSampler(
        num_records=len(source),
        shard_options=grain.ShardOptions(
            shard_index=jax.process_index(), shard_count=jax.process_count(), drop_remainder=True
        ),
        shuffle=shuffle,
        num_epochs=num_epochs,
        seed=data_config.shuffle_seed,
    )
    return grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=[Preprocess(tokenizer, labeling), grain.Batch(local, drop_remainder=True)],
        worker_count=data_config.worker_count,
    )


def to_global(batch: dict, sharding: jax.sharding.Sharding) -> dict:
    """Assembles process-local numpy batches into global arrays split over the mesh's batch axes."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}

"""Input pipeline: grain over the TFDS data source -> per-host numpy batches -> global ``jax.Array`` batches.

The order of examples is a pure function of (``data.shuffle_seed``, step) and does not depend on the number of
processes or devices: global batch ``s`` holds positions ``s * G ... (s + 1) * G - 1`` of an endless stream that
visits every record once per epoch in a fresh seeded permutation (the last ``N mod G`` records of each epoch's
permutation are dropped). Process ``p`` of ``P`` reads only its contiguous share of each global batch, positions
``s * G + p * G / P ...``, which is the block of rows ``jax.make_array_from_process_local_data`` gives it. So a
resumed run needs only the step to continue with exactly the examples an uninterrupted run would have seen, on any
number of hosts, and 2 processes x 4 devices see the same global batches as 1 process x 8 devices.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import grain.python as grain
import jax
import ml_collections
import numpy as np

from ldm_jax import config_lib
from ldm_jax.data import latent_cache, photos, preprocess, shapes, sources
from ldm_jax.data.tokenizer import CLIPTokenizer

BUILDERS = {"shapes_captions": shapes.get_builder, "photo_crops": photos.get_builder}  # TFDS builders in data/
# Their configurations, read without building or preparing anything (for validation).
BUILDER_CONFIGS = {
    "shapes_captions": {c.name: c for c in shapes.ShapesCaptions.BUILDER_CONFIGS},
    "photo_crops": {c.name: c for c in photos.PhotoCrops.BUILDER_CONFIGS},
}
# Images only: no captions or class attributes, so no text- or class-conditioned task can train on them.
UNLABELLED_DATASETS = ("photo_crops",)
DATASET_CONFIGS = ("tiny", "32px", "64px", "256px")
# ``classes`` / labeling of class-conditional runs on the user's data: labels from the source itself.
SOURCE_LABELS = "source"
# data.source of presets that train on the user's data: validation asks for a real source.
SOURCE_REQUIRED = "required"


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig(config_lib.Section):
    """``config.data``: which dataset, at which size, in which batches.

    ``source`` "" trains on the embedded dataset ``name`` / ``config``; otherwise it names the user's data
    (``data/sources.py``: ``folder:``, ``webdataset:``, ``tfds:``, ``arrayrecord:``), decoded and cropped to
    ``image_size`` (``data/preprocess.py``); ``eval_source`` (default: ``source``) feeds previews and evaluation."""

    name: str = "shapes_captions"
    config: str
    data_dir: str = ""  # "" = ~/.cache/ldm_jax/tensorflow_datasets (embedded); a tfds: source's data_dir
    image_size: int
    global_batch_size: int
    shuffle_seed: int = 0
    worker_count: int = 0  # grain worker processes (decoding, cropping, tokenizing); 0 reads in the training process
    read_threads: int = 16  # grain's reader threads per process (grain's default)
    # Examples read ahead per process. Not grain's 500: its reader scans the ready part of this buffer on every
    # example it hands out, which at 500 cost the 32px demo a third of its data time (62 vs 34-45 ms a batch of 64).
    prefetch_buffer_size: int = 128
    source: str = ""
    eval_source: str = ""
    image_key: str = "image"  # tfds: the image feature
    caption_key: str = ""  # tfds: the caption feature ("captions/text" for coco_captions); folder metadata: column
    label_key: str = ""  # tfds: the class-label feature
    crop: str = "center"  # "center" or "random" square crop after resizing the shorter side
    random_flip: bool = False
    # The run stops when more than this fraction of the examples so far came from bad records (substituted).
    max_bad_fraction: float = 0.05

    def validate(self, prefix: str) -> None:
        self.check(self.name in BUILDERS, prefix, "name", f"must be one of {tuple(BUILDERS)}")
        self.check(self.config in DATASET_CONFIGS, prefix, "config", f"must be one of {DATASET_CONFIGS}")
        self.check(self.global_batch_size >= 1, prefix, "global_batch_size", "must be >= 1")
        self.check(self.shuffle_seed >= 0, prefix, "shuffle_seed", "must be >= 0")
        self.check(self.worker_count >= 0, prefix, "worker_count", "must be >= 0")
        self.check(self.read_threads >= 1, prefix, "read_threads", "must be >= 1")
        self.check(self.prefetch_buffer_size >= 1, prefix, "prefetch_buffer_size", "must be >= 1")
        self.check(self.image_size >= 1, prefix, "image_size", "must be >= 1")
        self.check(self.crop in preprocess.CROPS, prefix, "crop", f"must be one of {preprocess.CROPS}")
        self.check(0.0 <= self.max_bad_fraction <= 1.0, prefix, "max_bad_fraction", "must be in [0, 1]")
        if not self.source:  # the embedded dataset: its sizes are known now, not after the state is built
            embedded = BUILDER_CONFIGS[self.name][self.config]
            sizes = ", ".join(f"{c.name} {c.image_size}" for c in BUILDER_CONFIGS[self.name].values())
            self.check(self.image_size == embedded.image_size, prefix, "image_size",
                       f"the embedded {self.name} config {self.config!r} has {embedded.image_size}x"
                       f"{embedded.image_size} images: set {prefix}config to the size's ({sizes}) or train on your "
                       "own data (data.source)")  # fmt: skip
            self.check(self.global_batch_size <= embedded.num_train, prefix, "global_batch_size",
                       f"larger than the embedded {self.name} config {self.config!r}'s train split "
                       f"({embedded.num_train} records)")  # fmt: skip
        if self.source == SOURCE_REQUIRED:
            raise ValueError(
                f"{prefix}source={self.source!r}: this preset trains on your data; set it, e.g. "
                "--config.data.source='webdataset:/data/laion/{00000..01023}.tar', 'folder:/data/pets', "
                "'tfds:coco_captions' (with data.data_dir, data.caption_key='captions/text'), or "
                "'arrayrecord:/data/prepared' (python -m ldm_jax.prepare_data); see README, Train on your own data"
            )
        for field in ("source", "eval_source"):
            spec = getattr(self, field)
            if spec:
                try:
                    sources.check_exists(spec)
                except sources.SourceError as e:
                    raise ValueError(str(e).replace("data.source=", f"{prefix}{field}=", 1)) from None
        self.check(not self.eval_source or bool(self.source), prefix, "eval_source", "needs data.source too")
        self.check(not is_latent_cache(self.eval_source), prefix, "eval_source",
                   "must name images (previews and evaluation compare pixels), not a latent cache")  # fmt: skip
        if is_latent_cache(self.source):
            info = latent_cache.read_info(self.source)
            fixed = f"a latent cache holds the centre crops it was made from ({self.source!r})"
            self.check(self.crop == "center", prefix, "crop", f"must be 'center': {fixed}")
            self.check(not self.random_flip, prefix, "random_flip", f"must be False: {fixed}")
            self.check(self.image_size == info["image_size"], prefix, "image_size",
                       f"must be the cache's image size {info['image_size']} ({self.source!r})")  # fmt: skip

    @property
    def from_latents(self) -> bool:
        """Whether the run trains from a latent cache (``latents:DIR``) instead of images."""
        return is_latent_cache(self.source)

    @property
    def labelled(self) -> bool:
        """Whether examples carry captions or class labels (the user's sources are assumed to; a record without
        one counts as bad at run time)."""
        return bool(self.source) or self.name not in UNLABELLED_DATASETS


def is_latent_cache(spec: str) -> bool:
    return spec.startswith(f"{sources.LATENTS}:")


def cache_info(data_config) -> dict | None:
    """The latent cache's ``dataset_info.json`` when ``data.source`` names one, else None."""
    return latent_cache.read_info(data_config.source) if is_latent_cache(data_config.source) else None


def data_section(config_name: str, image_size: int, global_batch_size: int) -> ml_collections.ConfigDict:
    return DataConfig.defaults(config=config_name, image_size=image_size, global_batch_size=global_batch_size)


def to_model_range(images: np.ndarray) -> np.ndarray:
    """uint8 images -> float32 in [-1, 1], the range every model here takes."""
    return images.astype(np.float32) / 127.5 - 1.0


# Fields of a latent-cache example that go to the step as they are.
LATENT_FIELDS = ("latent_mean", "latent_std", "context")


class Preprocess(grain.MapTransform):
    """The fields the step reads: the uint8 image (made float on the device, ``to_global``: a quarter of the bytes
    cross from grain's worker processes and onto the devices) or a latent cache's latents and text context;
    caption -> token ids (when a tokenizer is given and no context is cached); attributes -> a class id under
    ``labeling`` (see ``shapes.LABELINGS``) as "label"."""

    def __init__(self, tokenizer: Optional[CLIPTokenizer], labeling: Optional[str] = None):
        self.tokenizer = tokenizer
        self.labeling = labeling

    def map(self, example: dict) -> dict:
        out = {k: example[k] for k in ("image", "prior_image", *LATENT_FIELDS) if k in example}
        if self.tokenizer is None:
            out.pop("context", None)  # cached text embeddings, for a run without text conditioning
        for k in ("original_size", "crop_offset", "_bad"):
            out[k] = example[k]
        if self.labeling == SOURCE_LABELS:
            out["label"] = np.int32(example["label"])
        elif self.labeling:
            out["label"] = np.int32(shapes.class_label(example, self.labeling))
        if self.tokenizer is not None and "context" not in example:
            text = example["caption"]
            text = text.decode("utf-8") if isinstance(text, bytes) else str(text)
            out["tokens"] = self.tokenizer(text)[0]
            if "prior_caption" in example:  # DreamBooth's class half (tasks/dreambooth.py)
                out["prior_tokens"] = self.tokenizer(example["prior_caption"])[0]
        return out


def data_source(data_config, split: str, needs: tuple[str, ...] = ()):
    """Random access to the examples of ``split`` (``source.get(index, position)``; ``source[i]`` is
    ``get(i, i)``): uint8 "image" at ``data.image_size``, "caption", labels, "original_size", "crop_offset" and
    the bad-record code "_bad". ``needs``: what an example of the user's data must have ("caption", "label")."""
    if data_config.source:
        spec = data_config.source
        if split != "train" and data_config.eval_source:
            spec = data_config.eval_source
        if is_latent_cache(spec):
            if split == "train":
                return latent_cache.LatentExamples(spec, data_config.shuffle_seed, needs)
            origin = latent_cache.embedded_origin(latent_cache.read_info(spec))
            if origin is None:
                raise ValueError(
                    f"data.source={spec!r}: a latent cache holds no images for the {split!r} split (previews and "
                    "evaluation compare pixels); set data.eval_source to the images it was cached from"
                )
            # A cache of an embedded dataset: its other splits are that dataset's, whatever data.name says.
            return _embedded_examples(*origin, data_config.data_dir, data_config.image_size, split)
        raw = sources.open_source(
            spec, data_config.data_dir, data_config.image_key, data_config.caption_key, data_config.label_key
        )
        training = split == "train"
        crop = data_config.crop if training else "center"  # previews and evaluation see the same pixels every time
        flip = data_config.random_flip and training
        return preprocess.ExampleSource(raw, data_config.image_size, crop, flip, data_config.shuffle_seed, needs)
    d = data_config
    return _embedded_examples(d.name, d.config, d.data_dir, d.image_size, split)


def _embedded_examples(name: str, config: str, data_dir: str, image_size: int, split: str):
    if name not in BUILDERS:
        raise ValueError(f"data.name={name!r}: must be one of {tuple(BUILDERS)}")
    builder = BUILDERS[name](config, data_dir)
    size = builder.builder_config.image_size
    if size != image_size:
        raise ValueError(f"data.image_size={image_size}: dataset config {config!r} has {size}x{size} images")
    return preprocess.EmbeddedExamples(builder.as_data_source(split=split), size)


def source_class_names(data_config) -> list[str]:
    """The class names of the user's source (folder sub-folders, a TFDS label feature, prepared shards)."""
    d = data_config
    if is_latent_cache(d.source):
        return list(latent_cache.read_info(d.source)["class_names"])
    return list(_class_names(d.source, d.data_dir, d.image_key, d.caption_key, d.label_key))


@functools.lru_cache(maxsize=8)
def _class_names(spec: str, data_dir: str, image_key: str, caption_key: str, label_key: str) -> tuple[str, ...]:
    # Validation and the task's construction both ask: opening a source (indexing every tar shard) happens once.
    return tuple(sources.open_source(spec, data_dir, image_key, caption_key, label_key).class_names)


def first_images(data_config, split: str, count: int) -> np.ndarray:
    """The first ``count`` images of ``split`` in record order (no shuffle), as float32 [N, H, W, 3] in [-1, 1]."""
    source = data_source(data_config, split)
    n = min(count, len(source))
    return to_model_range(np.stack([source[i]["image"] for i in range(n)]))


@functools.lru_cache(maxsize=4)
def _epoch_permutation(num_records: int, seed: int, epoch: int) -> np.ndarray:
    # Cached per epoch and shared by grain's reader threads (lru_cache is thread-safe; a race computes it twice).
    return np.random.default_rng([seed, epoch]).permutation(num_records)


class GlobalOrder:
    """Record index of every position of the run's example stream (see the module docstring)."""

    def __init__(self, num_records: int, global_batch_size: int, seed: int, shuffle: bool = True):
        self.num_records = num_records
        self.global_batch_size = global_batch_size
        self.steps_per_epoch = num_records // global_batch_size
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"data.global_batch_size={global_batch_size}: larger than the split ({num_records} records)"
            )
        self.seed = seed
        self.shuffle = shuffle

    def record(self, position: int) -> int:
        epoch, offset = divmod(position, self.steps_per_epoch * self.global_batch_size)
        if not self.shuffle:
            return offset
        return int(_epoch_permutation(self.num_records, self.seed, epoch)[offset])


class _ProcessShare:
    """A random-access view of this process's share of the stream from ``start_step`` on: local index ``i`` is
    row ``i mod L`` of this process's block of global batch ``start_step + i // L`` (``L`` local batch size)."""

    def __init__(self, source, order: GlobalOrder, start_step: int, num_steps: int, process_index: int, local: int):
        self.source, self.order = source, order
        self.start_step, self.num_steps = start_step, num_steps
        self.process_index, self.local = process_index, local

    def __len__(self) -> int:
        return self.num_steps * self.local

    def __getitem__(self, i: int):
        step, row = divmod(int(i), self.local)
        g = self.order.global_batch_size
        position = (self.start_step + step) * g + self.process_index * self.local + row
        return self.source.get(self.order.record(position), position)


# An "endless" run's stream length in steps: large enough for any run, small enough for grain's int64 indices.
_ENDLESS_STEPS = 2**40


def make_loader(
    data_config,
    split: str,
    global_batch_size: int,
    tokenizer: Optional[CLIPTokenizer] = None,
    labeling: Optional[str] = None,
    shuffle: bool = True,
    num_epochs: Optional[int] = None,
    start_step: int = 0,
    source=None,
) -> grain.DataLoader:
    """A grain loader yielding this process's share (global_batch_size / process_count) of every global batch,
    from global batch ``start_step`` on (``num_epochs`` None: endless). ``source``: examples to read instead of
    ``data_source(data_config, split)`` (DreamBooth's pairs)."""
    needs = (("caption",) if tokenizer is not None else ()) + (("label",) if labeling == SOURCE_LABELS else ())
    if source is None:
        source = data_source(data_config, split, needs)
    count = jax.process_count()
    if global_batch_size % count:
        raise ValueError(f"data.global_batch_size={global_batch_size}: must be divisible by the process count {count}")
    local = global_batch_size // count
    order = GlobalOrder(len(source), global_batch_size, data_config.shuffle_seed, shuffle)
    total = _ENDLESS_STEPS if num_epochs is None else num_epochs * order.steps_per_epoch
    share = _ProcessShare(source, order, start_step, max(total - start_step, 0), jax.process_index(), local)
    sampler = grain.IndexSampler(
        num_records=len(share), shard_options=grain.NoSharding(), shuffle=False, num_epochs=1, seed=0
    )
    return grain.DataLoader(
        data_source=share,
        sampler=sampler,
        operations=[Preprocess(tokenizer, labeling), grain.Batch(local, drop_remainder=True)],
        worker_count=data_config.worker_count,
        read_options=grain.ReadOptions(
            num_threads=data_config.read_threads, prefetch_buffer_size=data_config.prefetch_buffer_size
        ),
    )


# ``to_model_range`` of every uint8 value: looked up on the device, the float batch is bit-identical to converting on
# the host (XLA turns the division into a multiplication by the reciprocal, which rounds differently).
_MODEL_RANGE_TABLE = to_model_range(np.arange(256, dtype=np.uint8))


@jax.jit
def _model_range_on_device(images: jax.Array) -> jax.Array:
    # Elementwise, so it keeps the batch's sharding.
    return jax.numpy.asarray(_MODEL_RANGE_TABLE)[images.astype(np.int32)]


def to_global(batch: dict, sharding: jax.sharding.Sharding) -> dict:
    """Assembles process-local numpy batches into global arrays split over the mesh's batch axes (fields whose
    name starts with "_" are host-side bookkeeping and stay behind); uint8 images become float32 in [-1, 1] on the
    devices."""
    out = {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items() if k[0] != "_"}
    for k in ("image", "prior_image"):
        if k in out and out[k].dtype == np.uint8:
            out[k] = _model_range_on_device(out[k])
    return out

"""DreamBooth (Ruiz et al. 2023): fine-tune a text-to-image model on a few images of one subject, named by a rare
identifier in ``instance_prompt``, with a prior-preservation loss on images the frozen model draws for the class
prompt, so that the model keeps what the class looks like.

``config.dreambooth`` (configs/dreambooth.py) turns a txt2img run into one:

- Data: every example pairs an instance image (``instance_dir``, repeated ``repeats`` times per epoch, all with
  ``instance_prompt``) with a class image (``class_dir``, all with ``class_prompt``), cropped and flipped as
  ``data.crop`` / ``data.random_flip`` say. A step trains ``data.global_batch_size`` instance and as many class
  examples together.
- Class images: when ``class_dir`` holds fewer than ``num_class_images`` images, the missing ones are drawn before
  training by the ``init_from`` model with the run's sampler settings (``sample``) and written as PNGs one batch at
  a time; a rerun counts what is there and draws only the rest.
- Loss: mean over the instance rows + ``prior_loss_weight`` x mean over the class rows (diffusers' recipe).
- ``model_from_init``: the model sections (UNet, text encoder, diffusion, first stage, latent scale) are read from
  ``init_from``'s config.json, so any converted Stable Diffusion fine-tunes without restating its architecture.

Everything else is the txt2img run's: LoRA (``lora.rank``), a trainable text encoder, EMA, bf16, remat,
accumulation, FSDP, preemption and resume.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from ldm_jax import config_lib
from ldm_jax.data import preprocess, sources

# The model sections ``model_from_init`` takes from init_from's config.json (the text encoder's ``trainable`` stays
# this run's).
MODEL_SECTIONS = ("unet", "text_encoder", "diffusion", "first_stage")
# The diffusion fields that shape the loss, not the model: this run's are kept.
TRAINING_FIELDS = ("loss_weighting", "min_snr_gamma", "offset_noise", "cond_drop_prob")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DreamBoothConfig(config_lib.Section):
    """``config.dreambooth``."""

    instance_dir: str = ""  # images of the subject (required)
    instance_prompt: str = ""  # e.g. "a photo of sks dog" (required)
    class_dir: str = ""  # "": no prior preservation
    class_prompt: str = ""  # e.g. "a photo of a dog" (required with class_dir)
    num_class_images: int = 100
    prior_loss_weight: float = 1.0
    repeats: int = 1  # instance images per epoch = repeats x their number
    model_from_init: bool = True

    def validate(self, prefix: str) -> None:
        self.check(bool(self.instance_dir), prefix, "instance_dir", "must name a folder of images of the subject")
        self.check(bool(self.instance_prompt.strip()), prefix, "instance_prompt",
                   "must be the prompt naming the subject, e.g. 'a photo of sks dog'")  # fmt: skip
        if self.class_dir:
            self.check(bool(self.class_prompt.strip()), prefix, "class_prompt",
                       "must be the class's prompt (e.g. 'a photo of a dog') when class_dir is set")  # fmt: skip
            self.check(self.num_class_images >= 1, prefix, "num_class_images", "must be >= 1")
            self.check(self.prior_loss_weight >= 0, prefix, "prior_loss_weight", "must be >= 0")
        self.check(self.repeats >= 1, prefix, "repeats", "must be >= 1")

    @property
    def prior_preservation(self) -> bool:
        return bool(self.class_dir)


def dreambooth_section(**overrides) -> ml_collections.ConfigDict:
    return DreamBoothConfig.defaults(**overrides)


def from_run_config(config) -> DreamBoothConfig | None:
    section = config.get("dreambooth") if hasattr(config, "get") else None
    return None if section is None else DreamBoothConfig.from_config(section, "dreambooth.")


def validate(config) -> None:
    db = from_run_config(config)
    if db is None:
        return
    config_lib.check(config.task == "txt2img", "task", config.task, "DreamBooth fine-tunes a txt2img model")
    config_lib.check(bool(config.init_from), "init_from", config.init_from,
                     "DreamBooth fine-tunes a trained or converted txt2img run: set init_from to it")  # fmt: skip
    for field, folder in (("instance_dir", db.instance_dir), ("class_dir", db.class_dir)):
        # Read as image folders (data.source's folder reader): local or mounted paths. A URL class_dir would have
        # its class images drawn and uploaded before the reader refused it.
        config_lib.check("://" not in folder, f"dreambooth.{field}", folder,
                         "must be a local or mounted folder (e.g. a bucket mounted with gcsfuse), not a URL")  # fmt: skip
    config_lib.check(os.path.isdir(db.instance_dir), "dreambooth.instance_dir", db.instance_dir, "no such folder")
    # Before the class images are drawn (minutes to hours), not after: the subject's photos must be readable.
    from ldm_jax.data import sources

    try:
        sources.FolderSource(f"folder:{db.instance_dir}", db.instance_dir)
    except sources.SourceError:
        config_lib.fail("dreambooth.instance_dir", db.instance_dir,
                        f"holds no image file ({', '.join(sources.IMAGE_EXTENSIONS)}); name a folder of the "
                        "subject's photos")  # fmt: skip
    config_lib.check(not config.data.source, "data.source", config.data.source,
                     "must be empty: DreamBooth reads dreambooth.instance_dir and class_dir")  # fmt: skip


def resolve(config) -> None:
    """Fills in what a DreamBooth config leaves to the run (in place, before validation; the saved config.json
    records the result): previews of the instance and class prompts when ``sample.prompts`` is empty, and with
    ``dreambooth.model_from_init`` the model sections of ``init_from``'s config.json."""
    db = config.get("dreambooth")
    if db is None:
        return
    if not config.sample.prompts:
        with config.unlocked():
            config.sample.prompts = tuple(p for p in (db.instance_prompt, db.class_prompt) if p)
    if not db.get("model_from_init") or not config.init_from:
        return
    source = config_lib.load_config(os.path.join(config.init_from, "config.json"))
    if source.task != "txt2img":
        raise ValueError(f"init_from={config.init_from!r}: holds a {source.task!r} run; DreamBooth needs a txt2img one")
    # This run's own training settings stay: whether the text encoder trains, and how the loss is formed.
    keep = {"text_encoder": ("trainable",), "diffusion": TRAINING_FIELDS}
    with config.unlocked():
        for name in MODEL_SECTIONS:
            mine = {k: config[name][k] for k in keep.get(name, ()) if k in config[name]}
            config[name] = ml_collections.ConfigDict(dict(source[name].to_dict(), **mine))
        config.latent_scale = source.latent_scale
    logging.info("DreamBooth: model sections %s from %s", MODEL_SECTIONS, config.init_from)


# ---- data -----------------------------------------------------------------------------------------------------
class DreamBoothExamples:
    """Random access to (instance, class) example pairs (see the module docstring); the class half is absent
    without prior preservation."""

    def __init__(self, data_config, db: DreamBoothConfig):
        size, seed = data_config.image_size, data_config.shuffle_seed
        crop, flip = data_config.crop, data_config.random_flip

        def open_folder(folder):
            raw = sources.FolderSource(f"folder:{folder}", folder)
            return preprocess.ExampleSource(raw, size, crop, flip, seed)

        self.instance = open_folder(db.instance_dir)
        self.classes = open_folder(db.class_dir) if db.prior_preservation else None
        self.instance_prompt, self.class_prompt = db.instance_prompt, db.class_prompt
        n = len(self.instance) * db.repeats
        # An epoch holds at least one batch: a few instance images repeat within it (indices wrap around).
        self.length = max(n, len(self.classes) if self.classes is not None else 0, data_config.global_batch_size)
        self.class_names = []
        self.description = f"DreamBooth {self.instance.description}" + (
            f" + {self.classes.description}" if self.classes is not None else ""
        )

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        return self.get(i, i)

    def get(self, index: int, position: int) -> dict:
        example = self.instance.get(index % len(self.instance), position)
        example["caption"] = self.instance_prompt
        if self.classes is not None:
            prior = self.classes.get(index % len(self.classes), position)
            example["prior_image"] = prior["image"]
            example["prior_caption"] = self.class_prompt
            example["_bad"] = np.int32(max(int(example["_bad"]), int(prior["_bad"])))
        return example


def joined_batch(batch: dict, prior_loss_weight: float) -> dict:
    """A batch of instance rows with their class rows (``prior_*`` fields) -> one batch, instance rows first, with
    per-row "loss_weight" such that the batch mean is mean(instance) + prior_loss_weight x mean(class)."""
    b = batch["image"].shape[0]
    out = {}
    for k, v in batch.items():
        if k.startswith("prior_"):
            continue
        prior = batch.get("prior_" + k, v)  # fields without a class counterpart (sizes, offsets) repeat
        out[k] = jnp.concatenate([v, prior.astype(v.dtype)], axis=0)
    out["loss_weight"] = jnp.concatenate([jnp.full((b,), 2.0), jnp.full((b,), 2.0 * prior_loss_weight)])
    return out


# ---- class images ----------------------------------------------------------------------------------------------
def _existing(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        return []
    return sorted(n for n in os.listdir(folder) if n.lower().endswith(sources.IMAGE_EXTENSIONS))


def ensure_class_images(config, options, load_base) -> int:
    """Draws the class images ``class_dir`` lacks with the ``init_from`` model (see the module docstring) and the
    sampler ``options``; returns how many it drew. ``load_base()`` -> (task, params, frozen, mesh) of the base model
    on every device. Every process takes part (the batch is split over every device); process 0 writes."""
    from ldm_jax.imaging import save_png
    from ldm_jax.training import distributed
    from ldm_jax.training.distributed import barrier

    db = from_run_config(config)
    if db is None or not db.prior_preservation:
        return 0
    existing = _existing(db.class_dir)
    taken = set(existing)
    numbers, i = [], 0
    while len(numbers) < db.num_class_images - len(existing):
        if f"class_{i:05d}.png" not in taken:
            numbers.append(i)
        i += 1
    # What process 0 sees decides (it writes them): every process must draw the same batches, and a host whose
    # listing differs (its own disk, a stale network filesystem) would otherwise skip or add a collective.
    numbers = distributed.process_0_ints(numbers)
    missing = len(numbers)
    if missing <= 0:
        logging.info("DreamBooth: %d class images in %s, %d needed", len(existing), db.class_dir, db.num_class_images)
        return 0
    logging.info("DreamBooth: drawing %d class images for %r into %s", missing, db.class_prompt, db.class_dir)
    base_task, params, frozen, mesh = load_base()
    names = [(i, f"class_{i:05d}.png") for i in numbers]
    s = config.sample
    per_call = max(mesh.size, 8 // mesh.size * mesh.size)
    for start in range(0, len(names), per_call):
        chunk = names[start : start + per_call]
        # Seeds of their own (index-based): a rerun draws the same images for the same names.
        seeds = [config.seed + 1_000_003 + idx for idx, _ in chunk]
        images = base_task.generate_images(
            params, frozen, mesh, [db.class_prompt] * len(chunk), seeds, options, s.guidance_scale,
            s.guidance_rescale, s.negative_prompt or None, per_call,
        )  # fmt: skip
        if jax.process_index() == 0:
            for (_, name), image in zip(chunk, images, strict=True):  # one image per name, or an error
                save_png(os.path.join(db.class_dir, name), image)
        barrier(f"dreambooth_class_images_{start}")
    return missing

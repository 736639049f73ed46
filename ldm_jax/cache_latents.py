"""Encode a data source once with a frozen first stage (and optionally a frozen text encoder) into a latent cache that
trains with ``data.source=latents:DIR``: no autoencoder (and no text encoder) in the training step.

  python -m ldm_jax.cache_latents --first_stage=runs/ae --source='webdataset:/data/laion/{00000..01023}.tar' \\
      --image_size=256 --out=/data/laion_latents
  # a converted Stable Diffusion workdir gives its first stage, and with --text_encoder its text encoder too:
  python -m ldm_jax.cache_latents --first_stage=runs/sd15 --text_encoder=runs/sd15 --source=folder:/data/pets \\
      --image_size=512 --out=/data/pets_latents
  python -m ldm_jax.train --config=configs/txt2img.py --config.data.source=latents:/data/pets_latents \\
      --config.init_from=runs/sd15 --config.text_encoder.trainable=False ...
  # the embedded dataset of the demo: --dataset=shapes_captions --dataset_config=32px (no --source)

Every image is decoded, resized and centre-cropped to ``--image_size`` as training would (``data/preprocess.py``),
encoded on every local device, and stored as its posterior's mean and standard deviation (a VQ first stage: the
pre-quantisation latents), so training still draws a fresh latent each step. With ``--text_encoder`` each caption's
text-encoder output is stored too. Bad records are dropped and counted by reason in ``dataset_info.json``.

Workers: output shard j holds source records [j * K, (j + 1) * K) (``--records_per_shard``); worker i of N writes
shards i, i + N, ... (``data/shards.py``), each atomically, so a killed job reruns to the same result and a cache's
bytes do not depend on the worker count or on the devices each has (for the same ``--batch_size``, per device). Workers are independent processes (``--process_index/--process_count``) or
the processes of one JAX distributed job (the training flags ``--coordinator_address`` ...; each encodes on its own
devices, no collective). A rerun with other settings in the same ``--out`` is refused by name.
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags, logging

from ldm_jax import jax_setup, storage, user_errors
from ldm_jax.training import distributed

_FIRST_STAGE = flags.DEFINE_string(
    "first_stage",
    None,
    "An autoencoder workdir, or a latent diffusion workdir (e.g. a converted SD) whose first stage.",
)
_TEXT_ENCODER = flags.DEFINE_string(
    "text_encoder", "", "A text-conditioned workdir whose EMA text encoder encodes every caption ('': no embeddings)."
)
_WEIGHTS = flags.DEFINE_enum("weights", "ema", ["ema", "params"], "Which first-stage weights encode.")
_SOURCE = flags.DEFINE_string(
    "source", "", "The images (data.source syntax: folder:, webdataset:, tfds:, arrayrecord:)."
)
_DATASET = flags.DEFINE_string("dataset", "", "Without --source: an embedded dataset (shapes_captions, photo_crops).")
_DATASET_CONFIG = flags.DEFINE_string("dataset_config", "32px", "The embedded dataset's config.")
_SPLIT = flags.DEFINE_string("split", "train", "The embedded dataset's split.")
_OUT = flags.DEFINE_string(
    "out", None, "Output folder for the shards and dataset_info.json (local or mounted: training reads it as files)."
)
_IMAGE_SIZE = flags.DEFINE_integer("image_size", None, "Side of the centre crops that are encoded (data.image_size).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Images per device in each encoder call.")
_PER_SHARD = flags.DEFINE_integer("records_per_shard", 2000, "Source records per output shard.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "float16", "bfloat16"], "Storage dtype of the arrays.")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "tfds: sources and embedded datasets: the TFDS data_dir.")
_IMAGE_KEY = flags.DEFINE_string("image_key", "image", "tfds: sources: the image feature.")
_CAPTION_KEY = flags.DEFINE_string("caption_key", "", "tfds: the caption feature; folder: the metadata column.")
_LABEL_KEY = flags.DEFINE_string("label_key", "", "tfds: sources: the class-label feature.")
_PROCESS_INDEX = flags.DEFINE_integer("process_index", 0, "Independent workers: this worker's index.")
_PROCESS_COUNT = flags.DEFINE_integer("process_count", 1, "Independent workers: their number.")
flags.mark_flags_as_required(["first_stage", "out", "image_size"])
_INITIALIZE_DISTRIBUTED = distributed.define_flags()
_CONFIGURE_JAX = jax_setup.define_flags()


def resolve_first_stage(workdir: str):
    """The autoencoder run that ``workdir`` is or names (``first_stage.workdir`` of a latent diffusion run), as
    (workdir, config)."""
    from ldm_jax import config_lib

    config = config_lib.load_run_config(workdir, "--first_stage")
    if config.task == "autoencoder":
        return workdir, config
    if "first_stage" not in config:
        raise ValueError(f"--first_stage={workdir!r}: a {config.task!r} run has no first stage")
    named = config.first_stage.workdir
    fs_config = config_lib.load_run_config(named, f"--first_stage={workdir!r} names first_stage.workdir")
    if fs_config.task != "autoencoder":
        raise ValueError(f"--first_stage={workdir!r}: names {named!r}, a {fs_config.task!r} run")
    return named, fs_config


class Encoder:
    """The frozen first stage (and text encoder) jitted over this process's devices, with fixed batch shapes."""

    def __init__(self, first_stage: str, weights: str, text_encoder: str, per_device: int):
        import jax
        import jax.numpy as jnp
        import numpy as np

        from ldm_jax import config_lib
        from ldm_jax.data import latent_cache
        from ldm_jax.models.first_stage import build_autoencoder, latent_channels
        from ldm_jax.training import checkpoint

        self.workdir, fs_config = resolve_first_stage(first_stage)
        self.module = build_autoencoder(fs_config.model, "float32", remat_policy="none")
        self.gaussian = fs_config.model.kind != "vq"
        self.factor = self.module.downsampling_factor
        self.channels = latent_channels(fs_config.model)
        params, _, step = checkpoint.load_trained_params(self.workdir, weights)
        self.first_stage = dict(
            workdir=storage.absolute(self.workdir),
            weights=weights,
            step=step,
            fingerprint=latent_cache.fingerprint(params),
        )
        devices = jax.local_devices()
        mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
        self.rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
        repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        if per_device < 1:
            raise ValueError(f"--batch_size={per_device}: must be >= 1")
        # Per device, so that every device encodes the same shapes whatever the process layout: XLA's results then do
        # not depend on how many processes and devices share the work.
        self.batch_size = per_device * len(devices)
        # Local devices only: every process encodes its own shards, with no collective between processes.
        self.params = jax.device_put(params, repl)

        def encode(p, images):
            out = self.module.apply({"params": p}, images, method="encode")
            if not self.gaussian:
                return out, jnp.zeros_like(out)
            return out.mean, jnp.exp(0.5 * out.logvar)

        self._encode = jax.jit(encode, out_shardings=(self.rows, self.rows))
        self.text = None
        if text_encoder:
            from ldm_jax.tasks.conditioners import TextConditioner

            te_config = config_lib.load_run_config(text_encoder, "--text_encoder")
            if "text_encoder" not in te_config:
                raise ValueError(f"--text_encoder={text_encoder!r}: a {te_config.task!r} run has no text encoder")
            src, _, te_step = checkpoint.load_trained_params(text_encoder, "ema")
            if "text" not in src:
                raise ValueError(f"--text_encoder={text_encoder!r}: its checkpoint holds no text encoder weights")
            self.conditioner = TextConditioner(te_config, jnp.float32)
            te = te_config.text_encoder
            self.text = dict(
                workdir=os.path.abspath(text_encoder), step=te_step, fingerprint=latent_cache.fingerprint(src["text"]),
                width=int(te.width), max_length=int(te.max_length), pad_token=te.pad_token,
            )  # fmt: skip
            self.text_params = jax.device_put(src["text"], repl)
            module = self.conditioner.text_encoder
            self._encode_text = jax.jit(lambda p, t: module.apply({"params": p}, t), out_shardings=self.rows)

    def latents(self, images):
        """uint8 [n <= batch_size, H, W, 3] -> (mean, std) float32 numpy [n, h, w, c]."""
        import jax
        import numpy as np

        from ldm_jax.data.pipeline import to_model_range

        n = len(images)
        padded = np.concatenate([images, np.repeat(images[-1:], self.batch_size - n, axis=0)], axis=0)
        mean, std = self._encode(self.params, jax.device_put(to_model_range(padded), self.rows))
        return np.asarray(mean)[:n], np.asarray(std)[:n]

    def contexts(self, captions: list[str]):
        """float32 numpy [len(captions), L, D]: the text encoder's output per caption ("" for the empty prompt)."""
        import jax
        import numpy as np

        out = []
        for start in range(0, len(captions), self.batch_size):
            chunk = captions[start : start + self.batch_size]
            tokens = self.conditioner.tokenizer(chunk + [chunk[-1]] * (self.batch_size - len(chunk)))
            ctx = self._encode_text(self.text_params, jax.device_put(np.asarray(tokens), self.rows))
            out.append(np.asarray(ctx)[: len(chunk)])
        return np.concatenate(out, axis=0)


def write_shard(examples, encoder: Encoder, j: int, n_shards: int, out: str, settings: dict) -> dict:
    """Encodes the records of output shard j and writes it atomically; returns its statistics."""
    import numpy as np
    from array_record.python.array_record_module import ArrayRecordWriter

    from ldm_jax.data import latent_cache, shapes, shards
    from ldm_jax.data.preprocess import BAD_REASONS

    stored = latent_cache._np_dtype(settings["dtype"])
    rows = shards.record_range(j, settings["records_per_shard"], len(examples))
    tmp = shards.temporary_path(out, j, n_shards)
    writer = ArrayRecordWriter(tmp, "group_size:1")
    dropped = {r: 0 for r in BAD_REASONS}
    kept = 0
    null_context = encoder.contexts([""]) if encoder.text else None
    for start in range(rows.start, rows.stop, encoder.batch_size):
        good = []
        for i in range(start, min(start + encoder.batch_size, rows.stop)):
            ex, why = examples.record_example(i)
            if ex is None:
                dropped[why] += 1
            else:
                good.append(ex)
        if not good:
            continue
        mean, std = encoder.latents(np.stack([e["image"] for e in good]))
        contexts = None
        if encoder.text:
            captions = [c for e in good for c in e["captions"]]
            flat = encoder.contexts(captions) if captions else None
        for k, ex in enumerate(good):
            arrays = {"mean": mean[k].astype(stored)}
            if encoder.gaussian:
                arrays["std"] = std[k].astype(stored)
            if encoder.text:
                n_caps = len(ex["captions"])
                if n_caps:
                    contexts, flat = flat[:n_caps], flat[n_caps:]
                else:
                    contexts = null_context
                arrays["context"] = contexts.astype(stored)
            attributes = {a: ex[a] for a in shapes.ATTRIBUTE_VALUES if a in ex}
            writer.write(
                latent_cache.encode_record(
                    ex.get("key", ""), ex["captions"], int(ex["label"]), ex["original_size"], ex["crop_offset"],
                    attributes, arrays,
                )
            )  # fmt: skip
            kept += 1
    writer.close()
    stats = {"shard": j, "source_records": len(rows), "records": kept, "dropped": dropped}
    shards.commit(out, j, n_shards, tmp, stats)
    return stats


def cache(data_config, out: str, encoder: Encoder, settings: dict, process_index: int, process_count: int):
    """Writes this worker's missing shards; writes dataset_info.json when every shard is complete. Returns the
    info, or None while other workers' shards are missing."""
    from ldm_jax.data import latent_cache, pipeline, records, shards

    shards.check_local_out(out)
    shards.check_worker(process_index, process_count)
    for name in ("records_per_shard",):
        if settings[name] < 1:
            raise ValueError(f"--{name}={settings[name]}: must be >= 1")
    size = data_config.image_size
    if size % encoder.factor:
        raise ValueError(f"--image_size={size}: must be divisible by the first stage's f={encoder.factor}")
    examples = pipeline.data_source(data_config, "train" if data_config.source else settings["split"])
    # A source that grew is refused like one that changed: shards complete by name would keep the old records
    # (a new file sorted among the old ones shifts every record after it), and the new ones past them be lost.
    settings = dict(settings, source_records=len(examples))
    os.makedirs(out, exist_ok=True)
    shards.check_settings(out, settings, "a cache", "cache_settings.json")
    n_shards = shards.num_shards(len(examples), settings["records_per_shard"])
    t0 = time.perf_counter()
    for j in range(process_index, n_shards, process_count):
        if shards.is_complete(out, j, n_shards):
            continue
        stats = write_shard(examples, encoder, j, n_shards, out, settings)
        logging.info("shard %d/%d: %d of %d records encoded (%.1f s)", j + 1, n_shards, stats["records"],
                     stats["source_records"], time.perf_counter() - t0)  # fmt: skip
    done = shards.all_stats(out, n_shards)
    if done is None:
        logging.info("this worker's shards are done; dataset_info.json follows when every worker's are")
        return None
    reasons = done[0]["dropped"].keys()
    info = {
        "kind": latent_cache.KIND,
        "source": settings["source"],
        "source_records": len(examples),
        "records": sum(s["records"] for s in done),
        "dropped": {r: sum(s["dropped"][r] for s in done) for r in reasons},
        "shards": n_shards,
        "image_size": size,
        "latent_shape": [size // encoder.factor, size // encoder.factor, encoder.channels],
        "posterior": "gaussian" if encoder.gaussian else "deterministic",
        "dtype": settings["dtype"],
        "first_stage": encoder.first_stage,
        "text_encoder": encoder.text,
        "class_names": list(examples.class_names),
        "settings": settings,
    }
    if info["records"] == 0:
        raise ValueError(f"--source={settings['source']!r}: no record could be encoded ({info['dropped']})")
    shards.write_json_atomic(os.path.join(out, records.INFO_FILE), info, indent=2, sort_keys=True)
    logging.info("%d of %d records cached in %d shards (%.1f s)", info["records"], len(examples), n_shards,
                 time.perf_counter() - t0)  # fmt: skip
    return info


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from ldm_jax.data import latent_cache, pipeline, sources
    from ldm_jax.training.reporting import quiet_library_logs

    logging.set_verbosity(logging.INFO)
    quiet_library_logs()
    _INITIALIZE_DISTRIBUTED()
    _CONFIGURE_JAX()  # after distributed: it asks for the backend
    import jax

    index, count = _PROCESS_INDEX.value, _PROCESS_COUNT.value
    if jax.process_count() > 1:
        if count != 1:
            raise app.UsageError(
                "--process_index/--process_count: not with a distributed job (its processes are the workers)"
            )
        index, count = jax.process_index(), jax.process_count()
    if bool(_SOURCE.value) == bool(_DATASET.value):
        raise app.UsageError("pass exactly one of --source (your images) and --dataset (an embedded dataset)")
    if _DATASET.value and _DATASET.value not in pipeline.BUILDERS:
        raise app.UsageError(f"--dataset={_DATASET.value!r}: must be one of {tuple(pipeline.BUILDERS)}")
    settings = dict(
        source=_SOURCE.value or latent_cache.embedded_source(_DATASET.value, _DATASET_CONFIG.value, _SPLIT.value),
        split=_SPLIT.value,
        image_size=_IMAGE_SIZE.value,
        records_per_shard=_PER_SHARD.value,
        dtype=_DTYPE.value,
        first_stage=storage.absolute(_FIRST_STAGE.value),
        weights=_WEIGHTS.value,
        text_encoder=storage.absolute(_TEXT_ENCODER.value) if _TEXT_ENCODER.value else "",
    )
    data_config = pipeline.DataConfig(
        name=_DATASET.value or "shapes_captions",
        config=_DATASET_CONFIG.value,
        data_dir=_DATA_DIR.value,
        image_size=_IMAGE_SIZE.value,
        global_batch_size=1,
        source=_SOURCE.value,
        image_key=_IMAGE_KEY.value,
        caption_key=_CAPTION_KEY.value,
        label_key=_LABEL_KEY.value,
    )
    try:
        if _SOURCE.value:
            sources.check_exists(_SOURCE.value)
        encoder = Encoder(_FIRST_STAGE.value, _WEIGHTS.value, _TEXT_ENCODER.value, _BATCH.value)
        info = cache(data_config, _OUT.value, encoder, settings, index, count)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            # Every process's shards are written: process 0 writes dataset_info.json (the others may have too).
            multihost_utils.sync_global_devices("cache_latents: shards written")
            if index == 0 and info is None:
                info = cache(data_config, _OUT.value, encoder, settings, index, count)
    except (ValueError, FileNotFoundError) as e:
        raise app.UsageError(str(e)) from e
    if info is not None and index == 0:
        print(json.dumps({k: info[k] for k in ("records", "source_records", "dropped", "shards", "latent_shape")}))


if __name__ == "__main__":
    user_errors.run(main)

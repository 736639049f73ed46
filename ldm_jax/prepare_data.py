"""Decode, filter and resize a data source into ArrayRecord shards that train with ``data.source=arrayrecord:DIR``.

  python -m ldm_jax.prepare_data --source='webdataset:/data/laion/{00000..01023}.tar' --out=/data/prepared \\
      --image_size=512 --min_side=256 --max_aspect=2.0 --require_caption
  # N independent workers (machines, or processes of one machine), each writing output shards i, i + N, ...:
  python -m ldm_jax.prepare_data ... --process_index=$i --process_count=$N

Output shard j holds raw records [j * K, (j + 1) * K) of the source that pass the filters (K =
``--records_per_shard``), resized so the shorter side is ``--image_size`` (Lanczos; training crops the square), as
PNG with the key, captions, label and the original size (``data/records.py``). A shard is written to a temporary file
and renamed with its statistics, so a killed preparation reruns to the same result and skips the shards already
complete; shard contents do not depend on the worker count. ``dataset_info.json`` (records, dropped records by
reason, sizes, source, filters, class names) is written by whichever worker finds every shard complete.
"""

from __future__ import annotations

import io
import json
import os
import time

from absl import app, flags, logging
from PIL import Image

from ldm_jax.data import records, shards, sources
from ldm_jax.data.preprocess import to_rgb

_SOURCE = flags.DEFINE_string("source", None, "The data source (data.source syntax: folder:, webdataset:, tfds:).")
_OUT = flags.DEFINE_string("out", None, "Output folder for the shards and dataset_info.json.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 512, "Shorter side of the stored images, in pixels.")
_PER_SHARD = flags.DEFINE_integer("records_per_shard", 2000, "Source records per output shard (before filtering).")
_MIN_SIDE = flags.DEFINE_integer("min_side", 0, "Drop images whose shorter side is below this (0: keep all).")
_MAX_ASPECT = flags.DEFINE_float("max_aspect", 0.0, "Drop images with long side / short side above this (0: off).")
_REQUIRE_CAPTION = flags.DEFINE_bool("require_caption", False, "Drop records without a caption.")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "tfds: sources: the TFDS data_dir.")
_IMAGE_KEY = flags.DEFINE_string("image_key", "image", "tfds: sources: the image feature.")
_CAPTION_KEY = flags.DEFINE_string("caption_key", "", "tfds: the caption feature; folder: the metadata column.")
_LABEL_KEY = flags.DEFINE_string("label_key", "", "tfds: sources: the class-label feature.")
_PROCESS_INDEX = flags.DEFINE_integer("process_index", 0, "This worker's index in [0, process_count).")
_PROCESS_COUNT = flags.DEFINE_integer("process_count", 1, "Number of independent workers.")
flags.mark_flags_as_required(["source", "out"])

DROP_REASONS = ("unreadable", "missing_image", "missing_caption", "too_small", "aspect_ratio")


def prepare_record(rec: dict, image_size: int, min_side: int, max_aspect: float, require_caption: bool):
    """(encoded record, "") or (None, reason it is dropped)."""
    if rec["error"] == "caption_not_utf8":  # the image may be fine: only its caption is unusable
        rec = dict(rec, error="", captions=[])
    if rec["error"]:
        return None, "unreadable"
    if rec["image"] is None:
        return None, "missing_image"
    if require_caption and not rec["captions"]:
        return None, "missing_caption"
    try:
        im = to_rgb(sources.decode_to_pil(rec["image"]))
    except Exception:  # PIL raises many types for corrupt data
        return None, "unreadable"
    w, h = im.size
    if min(w, h) < min_side:
        return None, "too_small"
    if max_aspect and max(w, h) / min(w, h) > max_aspect:
        return None, "aspect_ratio"
    scale = image_size / min(w, h)
    if scale < 1:  # never upscale: training resizes (and crops) anyway
        im = im.resize((max(image_size, round(w * scale)), max(image_size, round(h * scale))), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return records.encode(rec["key"], buf.getvalue(), rec["captions"], rec["label"], (h, w)), ""


def write_shard(raw, j: int, n_shards: int, out: str, settings: dict) -> dict:
    """Writes output shard j atomically (its records, then its statistics); returns the statistics."""
    from array_record.python.array_record_module import ArrayRecordWriter

    rows = shards.record_range(j, settings["records_per_shard"], len(raw))
    tmp = shards.temporary_path(out, j, n_shards)
    writer = ArrayRecordWriter(tmp, "group_size:1")
    dropped = {r: 0 for r in DROP_REASONS}
    kept = 0
    for i in rows:
        data, reason = prepare_record(
            raw[i], settings["image_size"], settings["min_side"], settings["max_aspect"], settings["require_caption"]
        )
        if data is None:
            dropped[reason] += 1
        else:
            writer.write(data)
            kept += 1
    writer.close()
    stats = {"shard": j, "source_records": len(rows), "records": kept, "dropped": dropped}
    shards.commit(out, j, n_shards, tmp, stats)
    return stats


def prepare(spec: str, out: str, settings: dict, process_index: int = 0, process_count: int = 1, **source_kw):
    """Writes this worker's missing shards; writes dataset_info.json when every shard is complete. Returns the
    dataset info, or None while other workers' shards are missing."""
    shards.check_worker(process_index, process_count)
    for name in ("image_size", "records_per_shard"):
        if settings[name] < 1:
            raise ValueError(f"--{name}={settings[name]}: must be >= 1")
    raw = sources.open_source(spec, **source_kw)
    n_shards = shards.num_shards(len(raw), settings["records_per_shard"])
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    for j in range(process_index, n_shards, process_count):
        if shards.is_complete(out, j, n_shards):
            continue  # complete from an earlier run
        stats = write_shard(raw, j, n_shards, out, settings)
        logging.info("shard %d/%d: %d records kept of %d", j + 1, n_shards, stats["records"], stats["source_records"])
    done = shards.all_stats(out, n_shards)
    if done is None:
        logging.info("this worker's shards are done; dataset_info.json follows when every worker's are")
        return None
    info = {
        "source": spec,
        "source_records": len(raw),
        "records": sum(s["records"] for s in done),
        "dropped": {r: sum(s["dropped"][r] for s in done) for r in DROP_REASONS},
        "shards": n_shards,
        "settings": settings,
        "class_names": list(getattr(raw, "class_names", [])),
        "record_format": "ldm_jax.data.records (PNG, shorter side image_size, original size in the header)",
    }
    shards.write_json_atomic(os.path.join(out, records.INFO_FILE), info, indent=2, sort_keys=True)
    logging.info("%d of %d records kept in %d shards (%.1f s): %s", info["records"], len(raw), n_shards,
                 time.perf_counter() - t0, info["dropped"])  # fmt: skip
    return info


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    settings = dict(
        image_size=_IMAGE_SIZE.value,
        records_per_shard=_PER_SHARD.value,
        min_side=_MIN_SIDE.value,
        max_aspect=_MAX_ASPECT.value,
        require_caption=_REQUIRE_CAPTION.value,
    )
    try:
        info = prepare(
            _SOURCE.value,
            _OUT.value,
            settings,
            _PROCESS_INDEX.value,
            _PROCESS_COUNT.value,
            data_dir=_DATA_DIR.value,
            image_key=_IMAGE_KEY.value,
            caption_key=_CAPTION_KEY.value,
            label_key=_LABEL_KEY.value,
        )
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    if info is not None:
        print(json.dumps({k: info[k] for k in ("records", "source_records", "dropped", "shards")}))


if __name__ == "__main__":
    app.run(main)

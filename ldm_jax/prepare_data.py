"""Decode, filter and resize a data source into ArrayRecord shards that train with ``data.source=arrayrecord:DIR``.

  python -m ldm_jax.prepare_data --source='webdataset:/data/laion/{00000..01023}.tar' --out=/data/prepared \\
      --image_size=512 --min_side=256 --max_aspect=2.0 --require_caption [--dedupe]
  # N independent workers (machines, or processes of one machine), each writing output shards i, i + N, ...:
  python -m ldm_jax.prepare_data ... --process_index=$i --process_count=$N

Output shard j holds raw records [j * K, (j + 1) * K) of the source that pass the filters (K =
``--records_per_shard``), resized so the shorter side is ``--image_size`` (Lanczos; training crops the square), as
PNG with the key, captions, label and the original size (``data/records.py``). A shard is written to a temporary file
and renamed with its statistics, so a killed preparation reruns to the same result and skips the shards already
complete; shard contents do not depend on the worker count. ``dataset_info.json`` (records, dropped records by
reason, sizes, source, filters, class names) is written by whichever worker finds every shard complete. The settings
are recorded in ``settings.json``: a rerun or a worker with other settings stops with an error.

``--dedupe`` drops exact duplicates across the whole source: two records are duplicates when the SHA-256 of their
image's encoded bytes (the file or tar member as stored; for ``tfds:`` sources, which hand over decoded pixels, of the
array's dtype, shape and bytes) are equal. The same picture encoded twice (another JPEG quality, PNG vs JPEG,
re-saved metadata) has other bytes and is not caught. Of the records that every other filter keeps, the first in
source order is kept and the others are dropped as ``duplicate``; a record that another filter drops (unreadable,
no caption, too small, ...) claims no hash, so a duplicate of it may be kept. The other filters give the same answer
for equal image bytes except the record-level ones (its read error, its caption), which is why a first pass over the
bytes alone (no decoding) can decide it: each worker writes ``hashes/<shard>.sha256`` for its shards (a flag byte and
the 32-byte digest per source record), then plans its output shards from the hash files of every shard up to its
last one (about 110 bytes of memory per source record while planning). The result is the same for any worker count.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import time

import numpy as np
from absl import app, flags, logging
from PIL import Image

from ldm_jax import user_errors
from ldm_jax.data import records, shards, sources
from ldm_jax.data.preprocess import to_rgb

_SOURCE = flags.DEFINE_string("source", None, "The data source (data.source syntax: folder:, webdataset:, tfds:).")
_OUT = flags.DEFINE_string(
    "out", None, "Output folder for the shards and dataset_info.json (local or mounted: training reads it as files)."
)
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 512, "Shorter side of the stored images, in pixels.")
_PER_SHARD = flags.DEFINE_integer("records_per_shard", 2000, "Source records per output shard (before filtering).")
_MIN_SIDE = flags.DEFINE_integer("min_side", 0, "Drop images whose shorter side is below this (0: keep all).")
_MAX_ASPECT = flags.DEFINE_float("max_aspect", 0.0, "Drop images with long side / short side above this (0: off).")
_REQUIRE_CAPTION = flags.DEFINE_bool("require_caption", False, "Drop records without a caption.")
_DEDUPE = flags.DEFINE_bool(
    "dedupe",
    False,
    "Drop exact duplicates across the whole source, keeping the first in source order: equal SHA-256 of the image's "
    "encoded bytes (the same picture in another encoding is not caught). Only records the other filters keep count.",
)
_WAIT_SECONDS = flags.DEFINE_float(
    "wait_seconds",
    600.0,
    "--dedupe: how long to wait for other workers' hash files before hashing their shards here (reading bytes only).",
)
_DATA_DIR = flags.DEFINE_string("data_dir", "", "tfds: sources: the TFDS data_dir.")
_IMAGE_KEY = flags.DEFINE_string("image_key", "image", "tfds: sources: the image feature.")
_CAPTION_KEY = flags.DEFINE_string("caption_key", "", "tfds: the caption feature; folder: the metadata column.")
_LABEL_KEY = flags.DEFINE_string("label_key", "", "tfds: sources: the class-label feature.")
_PROCESS_INDEX = flags.DEFINE_integer("process_index", 0, "This worker's index in [0, process_count).")
_PROCESS_COUNT = flags.DEFINE_integer("process_count", 1, "Number of independent workers.")
flags.mark_flags_as_required(["source", "out"])

DROP_REASONS = ("unreadable", "missing_image", "missing_caption", "too_small", "aspect_ratio", "duplicate")
HASH_DIR = "hashes"
# One hash-file entry per source record: flags (HAS_IMAGE: image bytes that prepare_record would decode;
# HAS_CAPTION: a usable caption) and the SHA-256 of the image bytes (zeros without HAS_IMAGE).
HASH_DTYPE = np.dtype([("flags", "u1"), ("sha256", "S32")])
HAS_IMAGE, HAS_CAPTION = 1, 2
_POLL_SECONDS = 1.0


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


# --- exact duplicates ---------------------------------------------------------------------------------------------


def record_hash(rec: dict) -> tuple[int, bytes]:
    """(flags, SHA-256 of the image's encoded bytes) of a raw record, without decoding it. The flags mirror the
    record-level checks of ``prepare_record``; the checks on the decoded image give the same answer for equal bytes."""
    image = rec["image"]
    if rec["error"] not in ("", "caption_not_utf8") or image is None:
        return 0, bytes(32)
    if isinstance(image, np.ndarray):  # tfds: decoded pixels; the shape tells a 4x6 image from a 6x4 one
        digest = hashlib.sha256(f"{image.dtype.str}{image.shape}".encode())
        digest.update(np.ascontiguousarray(image).tobytes())
    else:
        digest = hashlib.sha256(image)
    captioned = rec["error"] != "caption_not_utf8" and bool(rec["captions"])
    return HAS_IMAGE | (HAS_CAPTION if captioned else 0), digest.digest()


def hash_path(out: str, j: int, n: int) -> str:
    return os.path.join(out, HASH_DIR, shards.shard_name(j, n) + ".sha256")


def write_hashes(raw, j: int, n_shards: int, out: str, per_shard: int) -> None:
    """Writes the hash file of shard j's source records atomically (any worker may: its bytes are a pure function of
    the source)."""
    rows = shards.record_range(j, per_shard, len(raw))
    table = np.zeros(len(rows), HASH_DTYPE)
    for k, i in enumerate(rows):
        table[k] = record_hash(raw[i])
    path = hash_path(out, j, n_shards)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # Host and pid: workers on several machines may share the folder.
    tmp = f"{path}.tmp-{socket.gethostname()}-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(table.tobytes())
    os.replace(tmp, path)


def read_hashes(out: str, j: int, n_shards: int, expected: int) -> np.ndarray:
    path = hash_path(out, j, n_shards)
    with open(path, "rb") as f:
        data = f.read()
    if len(data) != expected * HASH_DTYPE.itemsize:
        raise ValueError(
            f"{path}: {len(data)} bytes, not {expected} records x {HASH_DTYPE.itemsize}; it was written for another "
            "source or --records_per_shard: delete it (or --out) and rerun"
        )
    return np.frombuffer(data, HASH_DTYPE)


def gather_hashes(raw, out: str, n_shards: int, upto: int, own: list[int], per_shard: int, wait_seconds: float):
    """Makes sure the hash files of shards [0, upto] exist: this worker's first, then the other workers'.

    Workers do not communicate, so a missing hash file of another worker is waited for (it is probably being
    written), and after ``wait_seconds`` hashed here. Hashing reads bytes and decodes nothing, a small cost next to
    preparing a shard, and it never blocks: workers run one after another (a job array with fewer slots than workers,
    the tests), or one that died, still finish, and every hash file has the same bytes whoever writes it."""
    for j in own:
        if not os.path.exists(hash_path(out, j, n_shards)):
            write_hashes(raw, j, n_shards, out, per_shard)
    missing = [j for j in range(upto + 1) if not os.path.exists(hash_path(out, j, n_shards))]
    if missing and wait_seconds > 0:
        logging.info("--dedupe: waiting up to %.0f s for the hash files of %d other shards", wait_seconds, len(missing))
        deadline = time.monotonic() + wait_seconds
        while missing and time.monotonic() < deadline:
            time.sleep(min(_POLL_SECONDS, max(deadline - time.monotonic(), 0)))
            missing = [j for j in missing if not os.path.exists(hash_path(out, j, n_shards))]
    if missing:
        logging.info("--dedupe: hashing the source records of shards %s here (no hash file from their worker yet)",
                     missing)  # fmt: skip
    for j in missing:
        if not os.path.exists(hash_path(out, j, n_shards)):
            write_hashes(raw, j, n_shards, out, per_shard)


def repeated_records(out: str, n_shards: int, upto: int, num_records: int, per_shard: int, require_caption: bool):
    """bool [records of shards 0..upto]: True where a record passes the record-level checks and an earlier record
    that passes them has the same image hash. Such a record is dropped as a duplicate if the image checks keep it
    (then they keep the earlier one too, and the first of them is kept)."""
    table = np.concatenate(
        [read_hashes(out, j, n_shards, len(shards.record_range(j, per_shard, num_records))) for j in range(upto + 1)]
    )
    claims = (table["flags"] & HAS_IMAGE) > 0
    if require_caption:
        claims &= (table["flags"] & HAS_CAPTION) > 0
    candidates = np.flatnonzero(claims)
    # return_index: the first occurrence of each distinct digest (a stable sort), in source order.
    _, first = np.unique(table["sha256"][candidates], return_index=True)
    repeated = claims.copy()
    repeated[candidates[first]] = False
    return repeated


# --- shards ---------------------------------------------------------------------------------------------------------


def write_shard(raw, j: int, n_shards: int, out: str, settings: dict, repeated=None) -> dict:
    """Writes output shard j atomically (its records, then its statistics); returns the statistics. ``repeated``:
    per source record of the shard, whether it repeats an earlier record's image (``repeated_records``); None: no
    deduplication."""
    from array_record.python.array_record_module import ArrayRecordWriter

    rows = shards.record_range(j, settings["records_per_shard"], len(raw))
    tmp = shards.temporary_path(out, j, n_shards)
    writer = ArrayRecordWriter(tmp, "group_size:1")
    dropped = {r: 0 for r in DROP_REASONS}
    kept = 0
    for k, i in enumerate(rows):
        data, reason = prepare_record(
            raw[i], settings["image_size"], settings["min_side"], settings["max_aspect"], settings["require_caption"]
        )
        if data is not None and repeated is not None and repeated[k]:
            data, reason = None, "duplicate"
        if data is None:
            dropped[reason] += 1
        else:
            writer.write(data)
            kept += 1
    writer.close()
    stats = {"shard": j, "source_records": len(rows), "records": kept, "dropped": dropped}
    shards.commit(out, j, n_shards, tmp, stats)
    return stats


def prepare(
    spec: str,
    out: str,
    settings: dict,
    process_index: int = 0,
    process_count: int = 1,
    dedupe: bool = False,
    wait_seconds: float = 600.0,
    **source_kw,
):
    """Writes this worker's missing shards; writes dataset_info.json when every shard is complete. Returns the
    dataset info, or None while other workers' shards are missing."""
    shards.check_local_out(out)
    shards.check_worker(process_index, process_count)
    for name in ("image_size", "records_per_shard"):
        if settings[name] < 1:
            raise ValueError(f"--{name}={settings[name]}: must be >= 1")
    if wait_seconds < 0:
        raise ValueError(f"--wait_seconds={wait_seconds}: must be >= 0")
    raw = sources.open_source(spec, **source_kw)
    # What the shards' contents depend on. A rerun with --dedupe would otherwise keep the duplicates of the shards
    # complete without it; one with another source (or key), or with a source that has grown, would keep shards of
    # the old one, complete by name, under a dataset_info.json that names the new one.
    settings = dict(settings, dedupe=bool(dedupe), source=spec, source_records=len(raw), **source_kw)
    per_shard = settings["records_per_shard"]
    n_shards = shards.num_shards(len(raw), per_shard)
    os.makedirs(out, exist_ok=True)
    shards.check_settings(out, settings, "shards")
    t0 = time.perf_counter()
    own = list(range(process_index, n_shards, process_count))
    todo = [j for j in own if not shards.is_complete(out, j, n_shards)]  # the others are complete from an earlier run
    repeated = None
    if dedupe and todo:
        gather_hashes(raw, out, n_shards, todo[-1], own, per_shard, wait_seconds)
        repeated = repeated_records(out, n_shards, todo[-1], len(raw), per_shard, settings["require_caption"])
    for j in todo:
        rows = shards.record_range(j, per_shard, len(raw))
        part = None if repeated is None else repeated[rows.start : rows.stop]
        stats = write_shard(raw, j, n_shards, out, settings, part)
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
            dedupe=_DEDUPE.value,
            wait_seconds=_WAIT_SECONDS.value,
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
    user_errors.run(main)

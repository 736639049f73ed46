"""The latent cache: a frozen first stage's posterior (and optionally a frozen text encoder's output) of every image,
written once by ``python -m ldm_jax.cache_latents`` and trained from with ``data.source=latents:DIR``.

A cached record holds the first stage's posterior of the centre-cropped image, its mean and standard deviation
(``exp(logvar / 2)``; a VQ first stage's pre-quantisation latents as the mean, no deviation), so training still
draws a fresh latent ``mean + std * eps`` every step, exactly as it does from pixels; with ``--text_encoder`` it also
holds the text encoder's output for each of the image's captions. Training then runs no autoencoder (and no text
encoder) in the step.

Record layout: ``MAGIC``, a little-endian uint32 header length, a UTF-8 JSON header (key, captions, label, original
size, crop offset, attributes, and each array's name, dtype and shape in order), then the arrays' raw bytes. No
pickle. ``dataset_info.json`` beside the shards says what made them (the first stage and text encoder, with a
fingerprint of their weights that training checks), the image size, the latent shape and the storage dtype.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import struct

import numpy as np

from ldm_jax.data import records, shards
from ldm_jax.data.sources import SourceError

MAGIC = b"LDML1"
KIND = "latent_cache"
STORAGE_DTYPES = ("float32", "float16", "bfloat16")
POSTERIORS = ("gaussian", "deterministic")  # KL first stages / VQ first stages (pre-quantisation latents)


def _np_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def fingerprint(tree) -> str:
    """sha256 of a weight tree's leaves (paths, dtypes, shapes, bytes): which weights made a cache."""
    import jax

    h = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(tree), key=lambda p: jax.tree_util.keystr(p[0])):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(jax.tree_util.keystr(path).encode())
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def encode_record(key: str, captions, label: int, original_size, crop_offset, attributes: dict, arrays: dict) -> bytes:
    """``arrays``: name -> numpy array, stored in the order given."""
    layout = [[name, str(a.dtype), list(a.shape)] for name, a in arrays.items()]
    header = json.dumps(
        {
            "key": key,
            "captions": list(captions),
            "label": int(label),
            "original_size": [int(s) for s in original_size],
            "crop_offset": [int(s) for s in crop_offset],
            "attributes": {k: int(v) for k, v in attributes.items()},
            "arrays": layout,
        }
    ).encode("utf-8")
    body = b"".join(np.ascontiguousarray(a).tobytes() for a in arrays.values())
    return MAGIC + struct.pack("<I", len(header)) + header + body


def decode_record(data: bytes) -> dict:
    """The header's fields plus ``arrays`` (name -> numpy array); ValueError for bytes not in this format."""
    n = len(MAGIC)
    if data[:n] != MAGIC or len(data) < n + 4:
        raise ValueError("not a latent-cache record")
    (length,) = struct.unpack("<I", data[n : n + 4])
    header = json.loads(data[n + 4 : n + 4 + length].decode("utf-8"))
    offset = n + 4 + length
    arrays = {}
    for name, dtype, shape in header.pop("arrays"):
        dt = _np_dtype(dtype)
        size = int(np.prod(shape)) * dt.itemsize
        arrays[name] = np.frombuffer(data, dt, int(np.prod(shape)), offset).reshape(shape)
        offset += size
    if offset != len(data):
        raise ValueError("latent-cache record of the wrong length")
    header["arrays"] = arrays
    return header


def folder_of(spec: str) -> str:
    kind, _, rest = spec.partition(":")
    if kind != "latents" or not rest:
        raise SourceError(f"data.source={spec!r}: a latent cache is named 'latents:DIR'")
    return rest


def read_info(spec: str) -> dict:
    """The cache's ``dataset_info.json``; SourceError naming the source when it is not a complete latent cache."""
    folder = folder_of(spec)
    path = os.path.join(folder, records.INFO_FILE)
    if not glob.glob(os.path.join(folder, "*.array_record")) or not os.path.isfile(path):
        raise SourceError(
            f"data.source={spec!r}: no complete latent cache in {folder!r} (needs *.array_record shards and "
            f"{records.INFO_FILE}; write one with python -m ldm_jax.cache_latents)"
        )
    with open(path) as f:
        info = json.load(f)
    if info.get("kind") != KIND:
        raise SourceError(
            f"data.source={spec!r}: {path} describes {info.get('kind', 'prepared images')!r}, not a latent cache "
            "(prepared images train with 'arrayrecord:DIR')"
        )
    return info


def embedded_source(name: str, config: str, split: str) -> str:
    """How a cache records the embedded dataset it was made from (``cache_latents --dataset=NAME
    --dataset_config=CONFIG --split=SPLIT``) as its "source": "NAME/CONFIG:SPLIT" (``embedded_origin`` reads it)."""
    return f"{name}/{config}:{split}"


def embedded_origin(info: dict):
    """(name, config) of the embedded dataset a cache was made from (its source as ``embedded_source`` writes it),
    or None for a cache of the user's images.

    Previews and evaluation of a run trained from such a cache read that dataset's other splits: it is a pure
    function of (seed, split, index), so its held-out images are the ones the cached split was drawn beside."""
    source = info.get("source", "")
    dataset, sep, _split = source.rpartition(":")
    name, slash, config = dataset.partition("/")
    if not sep or not slash or not name.isidentifier() or not config.isalnum():
        return None  # folder:/..., webdataset:..., tfds:..., arrayrecord:...: the user's data
    return name, config


class LatentExamples:
    """Random access to training examples of a latent cache: "latent_mean" [h, w, c] (float32), "latent_std"
    (gaussian posteriors), "context" [L, D] of the chosen caption (when text embeddings are cached), "caption",
    "label", the shapes attributes of an embedded dataset, "original_size", "crop_offset", "_bad".

    The caption is chosen as ``preprocess.ExampleSource`` chooses it for a centre crop without flip (the first draw
    of ``default_rng([seed, position])``), so a run from the cache sees the captions a run from the pixels would.
    A record without what ``needs`` asks ("caption", "label") is replaced by the next one that has it and counted.
    """

    def __init__(self, spec: str, seed: int, needs: tuple[str, ...] = ()):
        import grain.python as grain

        self.info = read_info(spec)
        folder = folder_of(spec)
        # The shards the info names: a folder re-cached from a source that grew also holds the old count's.
        self.source = grain.ArrayRecordDataSource(shards.listed_paths(folder, self.info, spec))
        self.seed, self.needs = seed, needs
        self.class_names = list(self.info.get("class_names", []))
        self.has_context = self.info["text_encoder"] is not None
        self.description = f"latent cache {folder} ({len(self.source)} records)"

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict:
        return self.get(i, i)

    def _reason(self, rec: dict) -> str:
        if "caption" in self.needs and not rec["captions"]:
            return "missing_caption"
        if "label" in self.needs and rec["label"] < 0:
            return "missing_label"
        return ""

    def get(self, index: int, position: int) -> dict:
        from ldm_jax.data.preprocess import BAD_REASONS, MAX_CONSECUTIVE_BAD

        rng = np.random.default_rng([self.seed, position])
        first_reason = ""
        for attempt in range(MAX_CONSECUTIVE_BAD):
            try:
                rec = decode_record(self.source[(index + attempt) % len(self.source)])
                why = self._reason(rec)
            except (ValueError, KeyError):
                why = "bad_record"
            if why:
                first_reason = first_reason or why
                continue
            arrays, captions = rec["arrays"], rec["captions"]
            choice = int(rng.integers(len(captions))) if captions else 0
            out = {
                "latent_mean": arrays["mean"].astype(np.float32),
                "caption": captions[choice] if captions else "",
                "label": np.int32(rec["label"]),
                "original_size": np.asarray(rec["original_size"], np.int32),
                "crop_offset": np.asarray(rec["crop_offset"], np.int32),
                "_bad": np.int32(BAD_REASONS.index(first_reason) + 1 if first_reason else 0),
            }
            if "std" in arrays:
                out["latent_std"] = arrays["std"].astype(np.float32)
            if self.has_context:
                # Caption-less records carry one row of the null context, so every batch has the same shape.
                out["context"] = arrays["context"][choice].astype(np.float32)
            out.update({k: np.int32(v) for k, v in rec["attributes"].items()})
            return out
        raise ValueError(
            f"{self.description}: {MAX_CONSECUTIVE_BAD} records in a row from record {index} are bad (the first: "
            f"{first_reason})"
        )

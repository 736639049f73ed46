"""The record format of prepared shards (``ldm_jax.prepare_data`` writes, ``arrayrecord:`` sources read).

One record: ``MAGIC``, a little-endian uint32 header length, a UTF-8 JSON header (key, captions, label, the original
image size) and the encoded image (PNG, lossless, at the prepared size). No pickle: a shard can be read safely
whoever wrote it.
"""

from __future__ import annotations

import json
import struct

MAGIC = b"LDMR1"
INFO_FILE = "dataset_info.json"


def encode(key: str, image: bytes, captions: list[str], label: int = -1, original_size=(0, 0)) -> bytes:
    header = json.dumps(
        {"key": key, "captions": list(captions), "label": int(label), "original_size": [int(s) for s in original_size]}
    ).encode("utf-8")
    return MAGIC + struct.pack("<I", len(header)) + header + image


def decode(data: bytes) -> dict:
    """A raw record (see ``data/sources.py``); a record that is not in this format gets ``error="bad_record"``."""
    n = len(MAGIC)
    if data[:n] != MAGIC or len(data) < n + 4:
        return _bad()
    (length,) = struct.unpack("<I", data[n : n + 4])
    try:
        header = json.loads(data[n + 4 : n + 4 + length].decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return _bad()
    return {
        "key": header["key"],
        "image": data[n + 4 + length :],
        "captions": header["captions"],
        "label": header["label"],
        "error": "",
        "original_size": tuple(header["original_size"]),
    }


def _bad() -> dict:
    return {"key": "", "image": None, "captions": [], "label": -1, "error": "bad_record", "original_size": None}

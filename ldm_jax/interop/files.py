"""The files of a converted or imported model: a diffusers / transformers component folder's weights (single or
sharded), and atomic writes of weights and configs.

Single weight files are read by :func:`ldm_jax.interop.weight_files.read_state_dict`, the one reader every importer
uses; it is imported here for :func:`read_component` and is what the converter calls as ``files.read_state_dict``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping

import numpy as np

from ldm_jax import storage
from ldm_jax.interop.weight_files import SAFETENSORS_SUFFIX, WeightFileNotFound, read_state_dict


def write_safetensors(path: str, state_dict: Mapping[str, np.ndarray], metadata: dict | None = None) -> None:
    """Writes atomically: a crash leaves either the old file or none, never a truncated one."""
    from safetensors.numpy import save, save_file

    tensors = {k: np.ascontiguousarray(v) for k, v in state_dict.items()}
    if storage.is_url(path):  # one upload of the whole file
        storage.write_bytes(path, save(tensors, metadata=metadata))
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)


def write_json(path: str, obj) -> None:
    storage.write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing")
    with open(path) as f:
        return json.load(f)


def find_weight_file(folder: str, stem: str) -> str:
    """The weights of a diffusers / transformers component folder: ``<stem>.safetensors``, else a sharded
    ``<stem>.safetensors.index.json``, else the pickle ``<stem>.bin``; else the one precision variant the folder
    holds (the hub's ``variant=``: ``<stem>.fp16.safetensors``, ``<stem>.safetensors.index.fp16.json``).

    Safe formats come first so that a folder holding both never needs ``allow_pickle``; whether a pickle may be read
    is decided by the reader, which refuses it naming the file. Full precision comes before any variant, and a folder
    with several variants and no full-precision file is refused, naming them.
    """
    single, index, pickle = f"{stem}{SAFETENSORS_SUFFIX}", f"{stem}{SAFETENSORS_SUFFIX}.index.json", f"{stem}.bin"
    for name in (single, index, pickle):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    present = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    variant = re.compile(
        rf"{re.escape(stem)}\.(\w+){re.escape(SAFETENSORS_SUFFIX)}(\.index\.json)?"
        rf"|{re.escape(stem)}{re.escape(SAFETENSORS_SUFFIX)}\.index\.(\w+)\.json"
    )
    variants = [n for n in present if variant.fullmatch(n)]
    if len(variants) == 1:
        # The standard library's logger (absl's handler prints it in the CLIs): this module is also imported by
        # the PyTorch reference environment of the tests, which has no absl.
        logging.getLogger(__name__).warning(
            "%s: no full-precision weights; reading the variant %s", folder, variants[0]
        )
        return os.path.join(folder, variants[0])
    if variants:
        raise WeightFileNotFound(
            f"{folder}: no {single}, {index} or {pickle}, and several variants ({', '.join(variants)}); keep one"
        )
    raise WeightFileNotFound(f"{folder}: no {single}, sharded {index} or {pickle} found")


def read_component(folder: str, stem: str, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """Weights of a component folder (``find_weight_file``), following a sharded index to its shards."""
    path = find_weight_file(folder, stem)
    if path.endswith(".json"):  # <stem>.safetensors.index.json, or a variant's <stem>.safetensors.index.fp16.json
        index = read_json(path)
        out = {}
        # Shards are read without allow_pickle: a safetensors index naming a pickle is refused, not unpickled.
        for shard in sorted(set(index["weight_map"].values())):
            out.update(read_state_dict(os.path.join(folder, shard)))
        return out
    return read_state_dict(path, allow_pickle)

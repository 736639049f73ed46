"""Reading and writing PyTorch weight files without PyTorch (safetensors), and with it only when asked (pickles).

A pickle (``.ckpt``, ``.bin``, ``.pt``) can run code when it is loaded, so it is read only when the caller passes
``allow_pickle=True`` (the CLIs' ``--allow_pickle``), and then with ``torch.load(weights_only=True)``, which refuses
anything but tensors and plain containers.
"""

from __future__ import annotations

import json
import os
from typing import Mapping

import numpy as np

SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")


def read_state_dict(path: str, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """All tensors of a weight file as numpy arrays (bfloat16 becomes float32: numpy has no bfloat16)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such weight file")
    if path.endswith(SAFE_SUFFIXES):
        from safetensors.numpy import load_file

        try:
            return load_file(path)
        except TypeError:
            # safetensors.numpy cannot represent bfloat16; read through the raw header instead.
            return _read_safetensors_raw(path)
    if path.endswith(PICKLE_SUFFIXES):
        if not allow_pickle:
            raise PermissionError(
                f"{path}: a pickled checkpoint can run code when loaded; pass --allow_pickle to read it with "
                "torch.load(weights_only=True), or convert it to .safetensors first"
            )
        return _read_pickle(path)
    raise ValueError(f"{path}: unknown weight file type; expected one of {SAFE_SUFFIXES + PICKLE_SUFFIXES}")


def _read_safetensors_raw(path: str) -> dict[str, np.ndarray]:
    dtypes = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32}
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        start, end = info["data_offsets"]
        raw = data[start:end]
        if info["dtype"] == "BF16":
            bits = np.frombuffer(raw, np.uint16).astype(np.uint32) << 16
            arr = bits.view(np.float32)
        elif info["dtype"] in dtypes:
            arr = np.frombuffer(raw, dtypes[info["dtype"]])
        else:
            raise ValueError(f"{path}: tensor {key!r} has dtype {info['dtype']}, which this reader does not handle")
        out[key] = arr.reshape(info["shape"])
    return out


def _read_pickle(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"{path}: reading a pickled checkpoint needs PyTorch installed (pip install torch)") from e
    obj = torch.load(path, map_location="cpu", weights_only=True)
    # CompVis checkpoints wrap the weights: {"state_dict": {...}, "global_step": ...}.
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    out = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            continue
        value = value.detach()
        if value.dtype == torch.bfloat16:
            value = value.float()
        out[key] = value.numpy()
    return out


def write_safetensors(path: str, state_dict: Mapping[str, np.ndarray], metadata: dict | None = None) -> None:
    """Writes atomically: a crash leaves either the old file or none, never a truncated one."""
    from safetensors.numpy import save_file

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, tmp, metadata=metadata)
    os.replace(tmp, path)


def write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing")
    with open(path) as f:
        return json.load(f)


def find_weight_file(folder: str, stem: str, allow_pickle: bool = False) -> str:
    """The weights of a diffusers / transformers component folder: ``<stem>.safetensors``, else a pickle."""
    candidates = [f"{stem}.safetensors"] + [f"{stem}{s}" for s in (".bin",)]
    for name in candidates:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            if name.endswith(".safetensors") or allow_pickle:
                return path
            raise PermissionError(
                f"{path}: only a pickled weight file is present; pass --allow_pickle to read it with "
                "torch.load(weights_only=True)"
            )
    sharded = (
        [n for n in sorted(os.listdir(folder)) if n.endswith(".safetensors.index.json")]
        if os.path.isdir(folder)
        else []
    )
    if sharded:
        return os.path.join(folder, sharded[0])
    raise FileNotFoundError(f"{folder}: no {candidates[0]} (or {candidates[1]}) found")


def read_component(folder: str, stem: str, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """Weights of a component folder, following a sharded ``*.safetensors.index.json`` when there is one."""
    path = find_weight_file(folder, stem, allow_pickle)
    if path.endswith(".index.json"):
        index = read_json(path)
        out = {}
        for shard in sorted(set(index["weight_map"].values())):
            out.update(read_state_dict(os.path.join(folder, shard)))
        return out
    return read_state_dict(path, allow_pickle)

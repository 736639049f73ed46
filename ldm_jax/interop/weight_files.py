"""The one reader of weight files: ``.safetensors``, ``.npz`` and PyTorch pickles, as flat dicts of numpy arrays.

Every importer reads through :func:`read_state_dict`: the Stable Diffusion / diffusers / CompVis converter
(``interop.stable_diffusion`` via ``interop.files``), the LPIPS VGG16 trunk and heads (``interop.lpips_weights``) and
the FID Inception (``evaluation.fid``). What differs between them is policy, passed as arguments: whether a pickle
may be read at all (``allow_pickle``), which file types the caller takes (``suffixes``) and what the file is meant
to hold (``what``, for messages). Everything else is shared, so the same file gives the same arrays and the same
bad file the same error, whichever importer reads it:

- the arrays: keys as stored (a CompVis ``{"state_dict": {...}, "global_step": ...}`` pickle is unwrapped, and
  non-tensor entries of a pickle are skipped); dtypes as stored, except bfloat16, which becomes float32 (exactly:
  numpy has no bfloat16 of its own, and the importers cast to their models' float32 parameters anyway);
- the errors: all :class:`WeightFileError` (a ``ValueError``), each naming the path, what was wrong and what is
  allowed; the subclasses are also the built-in error a caller would catch for that case (``FileNotFoundError``,
  ``PermissionError``, ``ImportError``), as ``io.UnsupportedOperation`` is both an ``OSError`` and a ``ValueError``.

A pickle can run code when it is loaded, so it is read with ``torch.load(weights_only=True)``, which refuses
anything but tensors and plain containers. The converter also makes it opt-in (``allow_pickle=False`` by default,
the CLIs' ``--allow_pickle``): it reads third-party checkpoints from model hubs, and ``weights_only`` has had
bypasses in older torch. LPIPS and FID read the fixed published ``.pth`` files (torchvision's VGG16, lpips' heads,
pytorch-fid's Inception) the user names, so they pass ``allow_pickle=True``.

This module imports numpy only (safetensors and torch lazily), so the PyTorch reference environment of the tests can
run it too.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import numpy as np

SAFETENSORS_SUFFIX = ".safetensors"
NPZ_SUFFIX = ".npz"
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
ALL_SUFFIXES = (SAFETENSORS_SUFFIX, NPZ_SUFFIX) + PICKLE_SUFFIXES

# The .pth / .ckpt -> .safetensors conversion the errors print, for machines without torch (run it where torch and
# safetensors are installed: python -c "COMMAND" IN.pth OUT.safetensors). It unwraps a CompVis "state_dict" and
# keeps the tensors, as read_state_dict does.
TORCH_TO_SAFETENSORS_PY = (
    "import sys, torch, safetensors.torch as st; "
    "sd = torch.load(sys.argv[1], map_location='cpu', weights_only=True); sd = sd.get('state_dict', sd); "
    "st.save_file({k: v.contiguous() for k, v in sd.items() if isinstance(v, torch.Tensor)}, sys.argv[2])"
)


class WeightFileError(ValueError):
    """A weight file that cannot be read; the message names the path, what was wrong and what is allowed."""


class WeightFileNotFound(WeightFileError, FileNotFoundError):
    """No weight file at the path (or, for a model folder, none of the expected names)."""


class PickleNotAllowed(WeightFileError, PermissionError):
    """A pickle, and the caller did not pass ``allow_pickle=True``."""


class TorchUnavailable(WeightFileError, ImportError):
    """A pickle, and torch is not importable here."""


def convert_command(path: str) -> str:
    """The shell command that converts the pickle at ``path`` to ``<same name>.safetensors``."""
    return f'python -c "{TORCH_TO_SAFETENSORS_PY}" {path} {os.path.splitext(path)[0]}{SAFETENSORS_SUFFIX}'


def read_state_dict(
    path: str,
    allow_pickle: bool = False,
    *,
    suffixes: tuple[str, ...] = ALL_SUFFIXES,
    what: str = "weight file",
) -> dict[str, np.ndarray]:
    """All tensors of a weight file as numpy arrays (see the module docstring for keys and dtypes).

    Args:
      path: a ``.safetensors``, ``.npz`` (plain arrays; never unpickled) or pickled ``.ckpt`` / ``.bin`` / ``.pt`` /
        ``.pth`` file (read with ``torch.load(weights_only=True)``; needs torch). Suffixes match case-insensitively.
      allow_pickle: read pickles at all; without it one raises :class:`PickleNotAllowed`.
      suffixes: the file types this caller takes (a subset of :data:`ALL_SUFFIXES`); others are refused.
      what: what the file is meant to be, e.g. "FID Inception weight file", for the messages.
    Raises:
      WeightFileError (a ValueError), or its subclasses WeightFileNotFound, PickleNotAllowed, TorchUnavailable.
    """
    if not os.path.isfile(path):
        raise WeightFileNotFound(f"{path}: no such file (looking for the {what}; nothing is downloaded)")
    ext = os.path.splitext(path)[1].lower()
    if ext not in suffixes:
        raise WeightFileError(f"{path}: unknown {what} type (extension {ext!r}); expected one of {', '.join(suffixes)}")
    if ext in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise PickleNotAllowed(
                f"{path}: a pickled checkpoint can run code when loaded, so it is read only on request: pass "
                "allow_pickle=True (on the command line --allow_pickle) to read it with torch.load(weights_only=True), "
                f"or convert it to {SAFETENSORS_SUFFIX} first:\n  {convert_command(path)}"
            )
        try:
            import torch  # noqa: F401
        except ImportError as e:
            raise TorchUnavailable(
                f"{path}: a PyTorch pickle can only be read with torch, and torch is not importable here. Convert it "
                f"once to {SAFETENSORS_SUFFIX} where torch and safetensors are installed:\n  {convert_command(path)}\n"
                f"and pass the {SAFETENSORS_SUFFIX} file (or install torch here)."
            ) from e
        read, failure = _read_pickle, "torch.load(weights_only=True) could not read it"
    elif ext == NPZ_SUFFIX:
        read, failure = _read_npz, "not a readable .npz of plain arrays"
    else:
        read, failure = _read_safetensors, "safetensors could not read it"
    try:
        return read(path)
    except WeightFileError:
        raise
    except Exception as e:  # the libraries' own errors (unpickling, zip, header parsing) do not name the file
        raise WeightFileError(f"{path}: {failure} ({type(e).__name__}: {e})") from e


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        out = load_file(path)
    except TypeError:
        # safetensors.numpy cannot represent bfloat16 without ml_dtypes; read through the raw header instead.
        return _read_safetensors_raw(path)
    # With ml_dtypes, safetensors returns bfloat16 arrays: widen them as the raw reader and torch reader do.
    return {k: v.astype(np.float32) if v.dtype.name == "bfloat16" else v for k, v in out.items()}


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
            raise WeightFileError(
                f"{path}: tensor {key!r} has dtype {info['dtype']}; this reader handles BF16, {', '.join(dtypes)}"
            )
        out[key] = arr.reshape(info["shape"])
    return out


def _read_npz(path: str) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def _read_pickle(path: str) -> dict[str, np.ndarray]:
    import torch

    obj = torch.load(path, map_location="cpu", weights_only=True)
    # CompVis checkpoints wrap the weights: {"state_dict": {...}, "global_step": ...}.
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise WeightFileError(f"{path}: holds a {type(obj).__name__}; expected a state dict (name -> tensor)")
    out = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            continue
        value = value.detach()
        if value.dtype == torch.bfloat16:
            value = value.float()
        out[key] = value.numpy()
    return out

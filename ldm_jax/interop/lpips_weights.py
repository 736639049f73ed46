"""Weights of the LPIPS (VGG16, v0.1) perceptual distance: a torchvision VGG16 trunk and lpips' linear heads.

The parameter tree is the one ``ldm_jax.models.lpips.LPIPS`` initialises::

    {"net": {"features_0": {"kernel": [3, 3, 3, 64], "bias": [64]}, "features_2": ..., ..., "features_28": ...},
     "lin0": {"kernel": [1, 1, 64, 1]}, "lin1": ..., ..., "lin4": {"kernel": [1, 1, 512, 1]}}

``features_{i}`` is the convolution at index ``i`` of torchvision's ``vgg16().features`` (``features.{i}.weight``
[out, in, 3, 3] and ``features.{i}.bias``); ``lin{k}`` is lpips' ``lin{k}.model.1.weight`` [1, C, 1, 1]. Kernels are
HWIO where PyTorch stores OIHW. All arrays are float32 numpy: the tree can be ``jax.device_put`` and handed to a
jitted step as a frozen argument.

The published heads ship with the package (``models/assets/lpips_vgg_v0.1.npz``, BSD-2, see LPIPS_LICENSE.txt); the
ImageNet VGG16 trunk (528 MB with its classifier) does not, and is read from a file the caller names.

This module imports numpy only (torch lazily, for pickled files), so the PyTorch reference environment of the tests
can run it too.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import numpy as np

from ldm_jax.interop.state_dict import ConversionError
from ldm_jax.interop.weight_files import read_state_dict

# Kept in step with ldm_jax.models.lpips.VGG16_STAGES (not imported: that module needs jax, this one must not).
VGG16_STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
LPIPS_CHANNELS = tuple(stage[-1] for stage in VGG16_STAGES)  # (64, 128, 256, 512, 512)

SHIPPED_HEADS_PATH = os.path.join(os.path.dirname(os.path.dirname(__file__)), "models", "assets", "lpips_vgg_v0.1.npz")


def vgg16_conv_layout() -> list[tuple[int, int, int]]:
    """``(index, in_channels, out_channels)`` of each convolution in torchvision's ``vgg16().features``.

    Each conv is followed by a ReLU (two indices per conv) and each stage by a max-pool (one index), which gives the
    indices 0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28.
    """
    layout, index, cin = [], 0, 3
    for stage in VGG16_STAGES:
        for cout in stage:
            layout.append((index, cin, cout))
            index += 2
            cin = cout
        index += 1
    return layout


# lpips' own LPIPS.state_dict() holds the trunk as net.slice{1..5}.{i}, where i is still the torchvision index.
_LPIPS_TRUNK_KEY = re.compile(r"^net\.slice\d+\.(\d+\.(?:weight|bias))$")


def vgg16_params_from_state_dict(sd: Mapping[str, np.ndarray]) -> dict:
    """A torchvision VGG16 state dict -> the ``"net"`` subtree of the LPIPS params (float32 numpy).

    Reads ``features.{i}.weight`` [out, in, 3, 3] and ``features.{i}.bias`` [out] (lpips' ``net.slice{s}.{i}.*``
    keys are accepted too); ``classifier.*`` and every other key outside ``features`` are ignored. Raises
    ``ConversionError`` (a ``ValueError``) naming each missing, mis-shaped or unexpected ``features.*`` key, the
    last catching e.g. a ``vgg16_bn`` state dict, whose batch-norm layers shift the indices.
    """
    features = {}
    for key, value in sd.items():
        m = _LPIPS_TRUNK_KEY.match(key)
        if m:
            key = f"features.{m.group(1)}"
        if key.startswith("features."):
            features[key] = value
    out, problems, expected = {}, [], set()
    for index, cin, cout in vgg16_conv_layout():
        w_key, b_key = f"features.{index}.weight", f"features.{index}.bias"
        expected |= {w_key, b_key}
        w, b = features.get(w_key), features.get(b_key)
        for key, value, shape in ((w_key, w, (cout, cin, 3, 3)), (b_key, b, (cout,))):
            if value is None:
                problems.append(f"missing {key} (shape {shape})")
            elif tuple(np.shape(value)) != shape:
                problems.append(f"{key} has shape {tuple(np.shape(value))}, VGG16 needs {shape}")
        if w is None or b is None or problems:
            continue
        out[f"features_{index}"] = {
            "kernel": np.ascontiguousarray(np.asarray(w, np.float32).transpose(2, 3, 1, 0)),  # OIHW -> HWIO
            "bias": np.asarray(b, np.float32).copy(),
        }
    unexpected = sorted(set(features) - expected)
    if unexpected:
        problems.append(
            f"unexpected {', '.join(unexpected[:10])}{' ...' if len(unexpected) > 10 else ''} (not a plain VGG16 "
            "`features` layout: convolutions must sit at torchvision indices "
            f"{[i for i, _, _ in vgg16_conv_layout()]})"
        )
    if problems:
        raise ConversionError("VGG16 state dict does not fit the LPIPS trunk: " + "; ".join(problems))
    return out


def lpips_heads_from_state_dict(sd: Mapping[str, np.ndarray]) -> dict:
    """lpips' linear heads -> ``{"lin0": {"kernel": [1, 1, 64, 1]}, ..., "lin4": {"kernel": [1, 1, 512, 1]}}``.

    Accepts lpips' layout (``lin{k}.model.1.weight`` [1, C, 1, 1]; ``lin{k}.model.0.weight`` when it was built
    without dropout) and the shipped file's (``lin{k}`` [C]). Other keys are ignored. Raises ``ConversionError``
    naming each missing or mis-shaped head.
    """
    out, problems = {}, []
    for k, channels in enumerate(LPIPS_CHANNELS):
        candidates = (f"lin{k}.model.1.weight", f"lin{k}.model.0.weight", f"lin{k}")
        key = next((c for c in candidates if c in sd), None)
        if key is None:
            problems.append(f"missing lin{k} (one of {', '.join(candidates)}; {channels} channels)")
            continue
        value = np.asarray(sd[key], np.float32)
        allowed = ((channels,), (1, channels, 1, 1))
        if value.shape not in allowed:
            problems.append(f"{key} has shape {value.shape}, expected one of {allowed}")
            continue
        out[f"lin{k}"] = {"kernel": value.reshape(1, 1, channels, 1).copy()}
    if problems:
        raise ConversionError("LPIPS heads do not fit the VGG16 variant: " + "; ".join(problems))
    return out


def load_lpips_params(vgg_path: str, heads_path: str = "") -> dict:
    """The full LPIPS parameter tree (see the module docstring) from weight files.

    Args:
      vgg_path: the VGG16 trunk: a torchvision state dict (e.g. ``vgg16-397923af.pth``, classifier included or not),
        or the same tensors as ``.safetensors`` / ``.npz``; also an lpips ``LPIPS.state_dict()`` file.
      heads_path: lpips' heads file (``weights/v0.1/vgg.pth`` or a conversion of it); "" reads the shipped heads.
    Returns:
      ``{"net": {...}, "lin0": {...}, ..., "lin4": {...}}`` of float32 numpy arrays.
    Raises:
      ``weight_files.WeightFileError`` (a ``ValueError``) for a file that cannot be read (absent, unknown type, a
      pickle without torch, corrupt), ``ConversionError`` for one that does not hold the trunk / heads.
    """
    if not vgg_path:
        raise ValueError(
            "vgg_path is empty: LPIPS needs the ImageNet VGG16 trunk, which is not shipped (torchvision's "
            "vgg16-397923af.pth, or a .safetensors / .npz of its features.* tensors)"
        )
    heads_path = heads_path or SHIPPED_HEADS_PATH
    out = {}
    for what, path, convert in (
        ("VGG16 trunk", vgg_path, vgg16_params_from_state_dict),
        ("LPIPS heads", heads_path, lpips_heads_from_state_dict),
    ):
        # allow_pickle: the published trunk and heads are .pth files (torchvision's, lpips'), which the user names.
        sd = read_state_dict(path, allow_pickle=True, what="LPIPS weight file")
        try:
            tree = convert(sd)
        except ConversionError as e:
            raise ConversionError(f"{path} ({what}): {e}") from e
        out.update({"net": tree} if convert is vgg16_params_from_state_dict else tree)
    return out

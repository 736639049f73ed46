"""Flax parameter trees <-> PyTorch-layout state dicts (diffusers / transformers key names), strictly.

Our modules use the diffusers / transformers submodule names with ``_`` where PyTorch has ``.`` (``down_blocks_0_
resnets_1`` for ``down_blocks.0.resnets.1``), so a key is a rewrite of the parameter's path. Layouts differ only in
two ways: a Flax convolution kernel is HWIO where PyTorch stores OIHW, and a Flax dense kernel is [in, out] where
PyTorch stores [out, in]. Nothing here imports torch: state dicts are ``dict[str, np.ndarray]``.

Conversion is strict: a missing, unexpected or mis-shaped tensor raises ``ConversionError`` listing the keys.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping

import numpy as np

MODEL_KINDS = ("unet", "vae", "vq", "clip")

# Path rewrites per model kind, applied in order to the "/"-joined parameter path (leaf name excluded).
_BLOCK = (r"(down_blocks|up_blocks)_(\d+)_(resnets|attentions|downsamplers|upsamplers)_(\d+)", r"\1.\2.\3.\4")
_MID = (r"mid_block_(resnets|attentions)_(\d+)", r"mid_block.\1.\2")
_RULES: dict[str, list[tuple[str, str]]] = {
    "unet": [
        _BLOCK,
        _MID,
        (r"transformer_blocks_(\d+)", r"transformer_blocks.\1"),
        (r"to_out_0", "to_out.0"),
        (r"/ff/proj_in$", "/ff.net.0.proj"),
        (r"/ff/proj_out$", "/ff.net.2"),
    ],
    "vae": [_BLOCK, _MID, (r"/attn/", "/"), (r"/attn$", ""), (r"to_out_0", "to_out.0")],
    "clip": [
        (r"^token_embedding$", "text_model.embeddings.token_embedding"),
        (r"^layers_(\d+)/(q_proj|k_proj|v_proj|out_proj)$", r"text_model.encoder.layers.\1.self_attn.\2"),
        (r"^layers_(\d+)/(fc1|fc2)$", r"text_model.encoder.layers.\1.mlp.\2"),
        (r"^layers_(\d+)/", r"text_model.encoder.layers.\1."),
        (r"^final_layer_norm$", "text_model.final_layer_norm"),
    ],
}
_RULES["vq"] = _RULES["vae"]
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
# Parameters that are not a module's kernel/scale/bias: their full key.
_SPECIAL = {
    ("clip", "position_embedding"): "text_model.embeddings.position_embedding.weight",
    ("vq", "quantize/embedding"): "quantize.embedding.weight",
    ("unet", "add_embedding/pool/positional_embedding"): "add_embedding.pool.positional_embedding",
}


class ConversionError(ValueError):
    """A state dict does not fit the model it is converted into."""


def _listing(keys, limit: int = 20) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else f" ({len(keys)})")


def flatten(tree: Mapping, prefix: tuple = ()) -> dict[tuple, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def unflatten(flat: Mapping[tuple, Any]) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return tree


def torch_key(kind: str, path: tuple) -> str:
    """The PyTorch state-dict key of the parameter at ``path`` in a model of ``kind``."""
    if kind not in MODEL_KINDS:
        raise ValueError(f"kind={kind!r}: must be one of {MODEL_KINDS}")
    joined = "/".join(path)
    if (kind, joined) in _SPECIAL:
        return _SPECIAL[(kind, joined)]
    module, leaf = "/".join(path[:-1]), path[-1]
    for pattern, repl in _RULES[kind]:
        module = re.sub(pattern, repl, module)
    if leaf not in _LEAF_NAMES:
        raise ValueError(f"parameter {joined!r}: no PyTorch name for a leaf called {leaf!r}")
    return f"{module.replace('/', '.')}.{_LEAF_NAMES[leaf]}"


def _to_torch(path: tuple, value: np.ndarray) -> np.ndarray:
    if path[-1] == "kernel" and value.ndim == 4:
        return np.ascontiguousarray(value.transpose(3, 2, 0, 1))  # HWIO -> OIHW
    if path[-1] == "kernel" and value.ndim == 2:
        return np.ascontiguousarray(value.T)  # [in, out] -> [out, in]
    return value


def _from_torch(path: tuple, value: np.ndarray) -> np.ndarray:
    if path[-1] == "kernel" and value.ndim == 4:
        return value.transpose(2, 3, 1, 0)
    if path[-1] == "kernel" and value.ndim == 2:
        return value.T
    return value


def params_to_state_dict(kind: str, params: Mapping) -> dict[str, np.ndarray]:
    """A Flax parameter tree -> a PyTorch-layout state dict of numpy arrays (same dtypes)."""
    out = {}
    for path, value in flatten(params).items():
        out[torch_key(kind, path)] = _to_torch(path, np.asarray(value))
    return out


def params_from_state_dict(
    kind: str,
    state_dict: Mapping[str, np.ndarray],
    abstract_params: Mapping,
    what: str,
    ignore: Callable[[str], bool] = lambda key: False,
    consume: bool = False,
) -> dict:
    """A PyTorch-layout state dict -> a Flax parameter tree shaped like ``abstract_params``.

    ``abstract_params`` is the tree of the target model (arrays or ``jax.ShapeDtypeStruct``); values are cast to its
    dtypes. ``what`` names the source in errors. Keys for which ``ignore(key)`` is true may be left over.
    ``consume=True`` removes each tensor from ``state_dict`` once converted, so that a multi-GB checkpoint is not
    held twice (only when the conversion succeeds as a whole does the caller get the result, either way).
    """
    expected = {torch_key(kind, path): path for path in flatten(abstract_params)}
    missing = set(expected) - set(state_dict)
    unexpected = {k for k in set(state_dict) - set(expected) if not ignore(k)}
    problems = []
    if missing:
        problems.append(f"missing {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected {_listing(unexpected)}")
    flat_abstract = flatten(abstract_params)
    out = {}
    bad_shapes = []
    for key, path in expected.items():
        if key in missing:
            continue
        target = flat_abstract[path]
        source = state_dict.pop(key) if consume and not problems else state_dict[key]
        value = _from_torch(path, np.asarray(source))
        if tuple(value.shape) != tuple(target.shape):
            bad_shapes.append(f"{key}: checkpoint {tuple(np.shape(source))}, model needs {_torch_shape(path, target)}")
            continue
        out[path] = np.ascontiguousarray(value, dtype=target.dtype)
    if bad_shapes:
        problems.append("mis-shaped " + "; ".join(bad_shapes[:20]) + (f" ({len(bad_shapes)} in all)"))
    if problems:
        raise ConversionError(f"{what} does not fit the {kind} model: " + " | ".join(problems))
    return unflatten(out)


def _torch_shape(path: tuple, target) -> tuple:
    shape = tuple(target.shape)
    if path[-1] == "kernel" and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if path[-1] == "kernel" and len(shape) == 2:
        return (shape[1], shape[0])
    return shape


# ---- normalising the key layouts that checkpoints in the wild use -----------------------------------------------
_OLD_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def normalize_vae_keys(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """diffusers < 0.14 named the VAE mid-block attention ``query/key/value/proj_attn``; some conversions stored
    those projections as 1x1 convolutions [C, C, 1, 1]. Both become today's ``to_q ... to_out.0`` Linear layout."""
    out = {}
    for key, value in state_dict.items():
        m = re.match(r"^(.*mid_block\.attentions\.0)\.(query|key|value|proj_attn)\.(weight|bias)$", key)
        if m:
            key = f"{m.group(1)}.{_OLD_VAE_ATTENTION[m.group(2)]}.{m.group(3)}"
        if re.match(r"^.*mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$", key) and value.ndim == 4:
            value = value[:, :, 0, 0]
        out[key] = value
    return out


def normalize_clip_keys(state_dict: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    """transformers 5.x saves ``CLIPTextModel`` without the ``text_model.`` prefix; older checkpoints (SD's
    ``text_encoder/``) have it. Returns the prefixed layout and the non-weight buffers dropped (``position_ids``)."""
    out, dropped = {}, []
    for key, value in state_dict.items():
        full = key if key.startswith("text_model.") else f"text_model.{key}"
        if full == "text_model.embeddings.position_ids":
            dropped.append(key)
            continue
        out[full] = value
    return out, dropped

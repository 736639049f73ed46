"""CLIP weights -> ``ldm_jax.models.clip.CLIP`` params, from a transformers ``CLIPModel`` folder or an OpenCLIP file.

Two layouts, one network (see ``models/clip.py``):

- **transformers** ``CLIPModel`` folder: ``config.json`` (``text_config`` / ``vision_config`` / ``projection_dim``)
  and ``model.safetensors`` (or a sharded ``model.safetensors.index.json``, or the pickle ``pytorch_model.bin``,
  read only with ``allow_pickle=True``); ``preprocessor_config.json``, when present, gives the pixel mean / std,
  and the tokenizer files, when present, the pad convention. Keys ``vision_model.embeddings.patch_embedding.weight``,
  ``vision_model.encoder.layers.N.self_attn.q_proj.weight``, ``visual_projection.weight`` [embed, width] ...
- **OpenCLIP** checkpoint file (``.safetensors``, or a pickle ``.bin`` / ``.pt`` / ``.pth`` read with
  ``torch.load(weights_only=True)``; keys possibly prefixed ``module.``, a pickle possibly nested under
  ``state_dict``): ``visual.conv1.weight``, ``visual.class_embedding``, ``visual.positional_embedding``,
  ``visual.ln_pre.*``, ``visual.transformer.resblocks.N.{ln_1, attn.in_proj_weight / in_proj_bias (q, k, v
  stacked), attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}``, ``visual.ln_post.*``, ``visual.proj`` [width, embed]
  (used as ``x @ proj``); text ``token_embedding.weight``, ``positional_embedding``, ``transformer.resblocks...``,
  ``ln_final.*``, ``text_projection`` [width, embed]. OpenAI's own (non-TorchScript) state dicts use these names too.

  A file holds no configuration, so the architecture is inferred from tensor shapes (widths, layer counts, patch
  and image size, vocabulary, context length, embedding size). Two things shapes cannot tell:

  * heads: OpenCLIP's text configs use 64-wide heads and its ViTs ``head_width`` (64 unless a config says
    otherwise); shapes equal to a variant of ``CLIP_VARIANTS`` take its heads (so ViT-H-14's 80-wide vision heads
    come out right), other shapes get ``width // 64``. ``arch`` (a variant name) overrides both.
  * the activation: OpenCLIP trains its own models with exact ``gelu`` and runs OpenAI's weights with
    ``quick_gelu`` (its ``*-quickgelu`` model names and ``openai`` pretrained tags); the file does not say which.
    **The default is "gelu"**; pass ``activation="quick_gelu"`` for OpenAI weights (or ``arch`` naming an OpenAI
    variant, whose activation it sets). A wrong activation gives wrong embeddings, not an error.

  Text from OpenCLIP files pads with 0 (``pad_token="zero"``), as OpenCLIP's tokenizer does.

Everything is read through ``ldm_jax.interop.weight_files.read_state_dict``. Conversion is strict: missing,
unexpected or mis-shaped tensors raise ``ConversionError`` (a ValueError) naming the file and the keys; only
``logit_scale``, the ``position_ids`` buffers and OpenAI's ``input_resolution`` / ``context_length`` /
``vocab_size`` entries are dropped.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping

import numpy as np

from ldm_jax.interop import files as wfiles
from ldm_jax.interop.state_dict import ConversionError
from ldm_jax.interop.weight_files import SAFETENSORS_SUFFIX, WeightFileNotFound, read_state_dict
from ldm_jax.models.clip import (
    ACTIVATIONS,
    CLIP,
    CLIP_VARIANTS,
    LAYER_NORM_EPS,
    OPENAI_MEAN,
    OPENAI_STD,
    build_clip,
    validate_fields,
)

# The file types an OpenCLIP checkpoint comes as. A pickle named by the user is read (torch.load with
# weights_only=True), as the FID / LPIPS loaders read the published files the user names.
OPENCLIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# Keys that are not weights of the network.
_DROPPED = re.compile(
    r"^(logit_scale|(text_model|vision_model)\.embeddings\.position_ids|input_resolution|context_length|vocab_size)$"
)

Params = dict
# One tensor of a layout: (our param path, its key there, its shape there, source array -> our array).
_Entry = tuple[tuple[str, ...], str, tuple[int, ...], Callable[[np.ndarray], np.ndarray]]


def _same(a):
    return a


def _transpose(a):
    return a.T


def _conv(a):
    return a.transpose(2, 3, 1, 0)  # OIHW -> HWIO


def _rows(i: int, width: int, transpose: bool):
    def take(a):
        part = a[i * width : (i + 1) * width]
        return part.T if transpose else part

    return take


# ------------------------------------------------------------------------------------------------- layouts


def _layer(prefix: tuple, key: str, width: int, layout: str) -> list[_Entry]:
    """One pre-LN encoder layer (``CLIPEncoderLayer`` at ``prefix``) stored under ``key`` in ``layout``."""
    w, f = width, 4 * width
    dense = lambda name, src, n_out, n_in: [  # noqa: E731
        (prefix + (name, "kernel"), f"{key}.{src}.weight", (n_out, n_in), _transpose),
        (prefix + (name, "bias"), f"{key}.{src}.bias", (n_out,), _same),
    ]
    norm = lambda name, src: [  # noqa: E731
        (prefix + (name, "scale"), f"{key}.{src}.weight", (w,), _same),
        (prefix + (name, "bias"), f"{key}.{src}.bias", (w,), _same),
    ]
    if layout == "hf":
        return [
            *norm("layer_norm1", "layer_norm1"),
            *dense("q_proj", "self_attn.q_proj", w, w),
            *dense("k_proj", "self_attn.k_proj", w, w),
            *dense("v_proj", "self_attn.v_proj", w, w),
            *dense("out_proj", "self_attn.out_proj", w, w),
            *norm("layer_norm2", "layer_norm2"),
            *dense("fc1", "mlp.fc1", f, w),
            *dense("fc2", "mlp.fc2", w, f),
        ]
    qkv = []
    for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
        qkv.append((prefix + (name, "kernel"), f"{key}.attn.in_proj_weight", (3 * w, w), _rows(i, w, True)))
        qkv.append((prefix + (name, "bias"), f"{key}.attn.in_proj_bias", (3 * w,), _rows(i, w, False)))
    return [
        *norm("layer_norm1", "ln_1"),
        *qkv,
        *dense("out_proj", "attn.out_proj", w, w),
        *norm("layer_norm2", "ln_2"),
        *dense("fc1", "mlp.c_fc", f, w),
        *dense("fc2", "mlp.c_proj", w, f),
    ]


def state_dict_entries(fields: Mapping, layout: str) -> list[_Entry]:
    """Every tensor of a CLIP with ``fields`` in ``layout`` ("hf": transformers ``CLIPModel``; "openclip"):
    (our param path, source key, source shape, conversion)."""
    if layout not in ("hf", "openclip"):
        raise ValueError(f"layout={layout!r}: must be 'hf' or 'openclip'")
    hf = layout == "hf"
    vw, tw, e, p = fields["vision_width"], fields["text_width"], fields["embed_dim"], fields["patch_size"]
    n_pos = (fields["image_size"] // p) ** 2 + 1
    vis, txt = ("vision_model",), ("text_model",)

    def norm(path, key, w):
        return [(path + ("scale",), f"{key}.weight", (w,), _same), (path + ("bias",), f"{key}.bias", (w,), _same)]

    v = "vision_model" if hf else "visual"
    out: list[_Entry] = [
        (
            vis + ("patch_embedding", "kernel"),
            f"{v}.embeddings.patch_embedding.weight" if hf else "visual.conv1.weight",
            (vw, 3, p, p),
            _conv,
        ),
        (
            vis + ("class_embedding",),
            f"{v}.embeddings.class_embedding" if hf else "visual.class_embedding",
            (vw,),
            _same,
        ),
        (
            vis + ("position_embedding",),
            f"{v}.embeddings.position_embedding.weight" if hf else "visual.positional_embedding",
            (n_pos, vw),
            _same,
        ),
        *norm(vis + ("pre_layrnorm",), f"{v}.pre_layrnorm" if hf else "visual.ln_pre", vw),
        *norm(vis + ("post_layernorm",), f"{v}.post_layernorm" if hf else "visual.ln_post", vw),
        (vis + ("visual_projection", "kernel"), "visual_projection.weight", (e, vw), _transpose)
        if hf
        else (vis + ("visual_projection", "kernel"), "visual.proj", (vw, e), _same),
        (
            txt + ("token_embedding", "embedding"),
            "text_model.embeddings.token_embedding.weight" if hf else "token_embedding.weight",
            (fields["vocab_size"], tw),
            _same,
        ),
        (
            txt + ("position_embedding",),
            "text_model.embeddings.position_embedding.weight" if hf else "positional_embedding",
            (fields["context_length"], tw),
            _same,
        ),
        *norm(txt + ("final_layer_norm",), "text_model.final_layer_norm" if hf else "ln_final", tw),
        (("text_projection", "kernel"), "text_projection.weight", (e, tw), _transpose)
        if hf
        else (("text_projection", "kernel"), "text_projection", (tw, e), _same),
    ]
    for i in range(fields["vision_layers"]):
        key = f"vision_model.encoder.layers.{i}" if hf else f"visual.transformer.resblocks.{i}"
        out += _layer(vis + (f"layers_{i}",), key, vw, layout)
    for i in range(fields["text_layers"]):
        key = f"text_model.encoder.layers.{i}" if hf else f"transformer.resblocks.{i}"
        out += _layer(txt + (f"layers_{i}",), key, tw, layout)
    return out


def expected_shapes(fields: Mapping, layout: str) -> dict[str, tuple[int, ...]]:
    """Source key -> source shape of every tensor a CLIP with ``fields`` has in ``layout``."""
    return {key: shape for _, key, shape, _ in state_dict_entries(fields, layout)}


def _listing(keys, limit: int = 12) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def params_from_state_dict(state_dict: Mapping[str, np.ndarray], fields: Mapping, layout: str, what: str) -> Params:
    """A state dict in ``layout`` -> our params tree (float32 numpy), strictly: raises ConversionError naming
    ``what`` (the file) and every missing, unexpected or mis-shaped key."""
    entries = state_dict_entries(fields, layout)
    expected = {key: shape for _, key, shape, _ in entries}
    given = {k: v for k, v in state_dict.items() if not _DROPPED.match(k)}
    problems = []
    missing = set(expected) - set(given)
    if missing:
        problems.append(f"missing {_listing(missing)}")
    unexpected = set(given) - set(expected)
    if unexpected:
        problems.append(f"unexpected {_listing(unexpected)}")
    bad = [
        f"{k}: {tuple(given[k].shape)} (expected {shape})"
        for k, shape in sorted(expected.items())
        if k in given and tuple(given[k].shape) != shape
    ]
    if bad:
        problems.append(f"mis-shaped {'; '.join(bad[:12])}" + (f" ({len(bad)} in all)" if len(bad) > 12 else ""))
    if problems:
        raise ConversionError(f"{what}: does not fit the CLIP {_describe(fields)}: " + " | ".join(problems))
    params: Params = {}
    for path, key, _, convert in entries:
        node = params
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = np.ascontiguousarray(convert(np.asarray(given[key])), dtype=np.float32)
    return params


def _describe(fields: Mapping) -> str:
    return (
        f"(vision {fields['vision_width']} wide x {fields['vision_layers']} layers, patch {fields['patch_size']}, "
        f"image {fields['image_size']}; text {fields['text_width']} wide x {fields['text_layers']} layers; "
        f"embed {fields['embed_dim']})"
    )


# ------------------------------------------------------------------------------------------ architectures


def _variant(arch: str | None) -> dict | None:
    if arch is None:
        return None
    if arch not in CLIP_VARIANTS:
        raise ValueError(f"arch={arch!r}: not a CLIP variant; known: {sorted(CLIP_VARIANTS)}")
    return CLIP_VARIANTS[arch]


def fields_from_hf_config(cfg: Mapping, what: str) -> dict:
    """A transformers ``CLIPModel`` config.json -> CLIP fields (defaults as transformers' CLIPTextConfig /
    CLIPVisionConfig for keys the file leaves out)."""
    if cfg.get("model_type", "clip") != "clip" or "vision_config" not in cfg or "text_config" not in cfg:
        raise ValueError(
            f"{what}: model_type={cfg.get('model_type')!r} with keys {sorted(cfg)[:12]}; expected a CLIPModel config "
            "(model_type 'clip' with text_config and vision_config)"
        )
    t, v = cfg["text_config"] or {}, cfg["vision_config"] or {}
    out = {}
    for tower, sub, defaults in (
        ("text", t, dict(hidden_size=512, num_hidden_layers=12, num_attention_heads=8)),
        ("vision", v, dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12)),
    ):
        sub = {**defaults, **{k: x for k, x in sub.items() if x is not None}}
        width = int(sub["hidden_size"])
        inter = sub.get("intermediate_size") or 4 * width
        if int(inter) != 4 * width:
            raise ValueError(
                f"{what}: {tower}_config.intermediate_size={inter}; ldm_jax's CLIP layers are 4 x hidden_size "
                f"({4 * width})"
            )
        eps = sub.get("layer_norm_eps", LAYER_NORM_EPS)
        if eps != LAYER_NORM_EPS:
            raise ValueError(f"{what}: {tower}_config.layer_norm_eps={eps}; ldm_jax's CLIP uses {LAYER_NORM_EPS}")
        out.update(
            {
                f"{tower}_width": width,
                f"{tower}_layers": int(sub["num_hidden_layers"]),
                f"{tower}_heads": int(sub["num_attention_heads"]),
            }
        )
    acts = {sub.get("hidden_act") or "quick_gelu" for sub in (t, v)}
    if len(acts) != 1 or not acts <= set(ACTIVATIONS):
        raise ValueError(
            f"{what}: hidden_act text={t.get('hidden_act')!r}, vision={v.get('hidden_act')!r}; ldm_jax's CLIP "
            f"needs one activation for both towers, one of {ACTIVATIONS}"
        )
    if int(v.get("num_channels") or 3) != 3:
        raise ValueError(f"{what}: vision_config.num_channels={v['num_channels']}; CLIP here takes RGB (3)")
    eos = t.get("eos_token_id", 49407)
    if eos not in (2, 49407, None):
        # transformers pools at argmax(ids) for the legacy 2 and at the first eos_token_id otherwise; with the CLIP
        # vocabulary both are the first <|endoftext|> (49407), which is where we pool.
        raise ValueError(f"{what}: text_config.eos_token_id={eos}; supported: 49407 (<|endoftext|>) or the legacy 2")
    out.update(
        image_size=int(v.get("image_size") or 224),
        patch_size=int(v.get("patch_size") or 32),
        vocab_size=int(t.get("vocab_size") or 49408),
        context_length=int(t.get("max_position_embeddings") or 77),
        embed_dim=int(cfg.get("projection_dim") or 512),
        activation=acts.pop(),
        layer_norm_eps=LAYER_NORM_EPS,
    )
    return out


def _count_layers(shapes: Mapping, prefix: str) -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    found = {int(m.group(1)) for k in shapes if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def fields_from_openclip_shapes(
    shapes: Mapping[str, tuple], what: str, arch: str | None = None, activation: str | None = None
) -> dict:
    """OpenCLIP state-dict key -> shape (no ``module.`` prefix) -> CLIP fields; see the module docstring for heads
    and the activation. ``arch``: a ``CLIP_VARIANTS`` name whose heads and activation to use (its other fields must
    equal the inferred ones); ``activation`` overrides both ("quick_gelu" for OpenAI weights)."""
    variant = _variant(arch)

    def shape(key: str, rank: int, why: str) -> tuple:
        if key not in shapes:
            raise ConversionError(
                f"{what}: not an OpenCLIP ViT CLIP checkpoint: key {key!r} is missing (needed for the {why})"
            )
        if len(shapes[key]) != rank:
            raise ConversionError(f"{what}: {key} has shape {tuple(shapes[key])}; expected {rank} dimensions")
        return tuple(int(s) for s in shapes[key])

    vw, channels, p, _ = shape("visual.conv1.weight", 4, "vision width and patch size")
    if channels != 3:
        raise ConversionError(f"{what}: visual.conv1.weight has {channels} input channels; CLIP here takes RGB (3)")
    n_pos, _ = shape("visual.positional_embedding", 2, "image size")
    grid = math.isqrt(n_pos - 1)
    if grid * grid != n_pos - 1:
        raise ConversionError(
            f"{what}: visual.positional_embedding has {n_pos} rows; expected a square grid of patches plus one"
        )
    _, e = shape("visual.proj", 2, "embedding size")
    vocab, tw = shape("token_embedding.weight", 2, "vocabulary and text width")
    ctx, _ = shape("positional_embedding", 2, "context length")
    fields = dict(
        image_size=grid * p,
        patch_size=p,
        vision_width=vw,
        vision_layers=_count_layers(shapes, "visual.transformer.resblocks"),
        text_width=tw,
        text_layers=_count_layers(shapes, "transformer.resblocks"),
        vocab_size=vocab,
        context_length=ctx,
        embed_dim=e,
    )
    for tower in ("vision", "text"):
        if not fields[f"{tower}_layers"]:
            prefix = "visual.transformer.resblocks" if tower == "vision" else "transformer.resblocks"
            raise ConversionError(f"{what}: no {prefix}.N.* keys; not an OpenCLIP ViT CLIP checkpoint")
    if variant is not None:
        differ = {k: (fields[k], variant[k]) for k in fields if fields[k] != variant[k]}
        if differ:
            raise ConversionError(
                f"{what}: arch={arch!r} does not match the checkpoint: "
                + ", ".join(f"{k}: file {a}, {arch} {b}" for k, (a, b) in sorted(differ.items()))
            )
        heads = (variant["vision_heads"], variant["text_heads"])
        default_act = variant["activation"]
    else:
        same = [v for v in CLIP_VARIANTS.values() if all(v[k] == fields[k] for k in fields)]
        heads = (same[0]["vision_heads"], same[0]["text_heads"]) if same else (vw // 64, tw // 64)
        default_act = "gelu"
    act = activation or default_act
    if act not in ACTIVATIONS:
        raise ValueError(f"activation={act!r}: must be one of {ACTIVATIONS}")
    fields.update(
        vision_heads=heads[0],
        text_heads=heads[1],
        activation=act,
        layer_norm_eps=LAYER_NORM_EPS,
        pad_token="zero",
        mean=OPENAI_MEAN,
        std=OPENAI_STD,
    )
    validate_fields(fields, what)
    return fields


# -------------------------------------------------------------------------------------------------- loading


def _read_hf_weights(folder: str, allow_pickle: bool) -> tuple[dict, str]:
    safe = os.path.join(folder, f"model{SAFETENSORS_SUFFIX}")
    index = os.path.join(folder, f"model{SAFETENSORS_SUFFIX}.index.json")
    pickle = os.path.join(folder, "pytorch_model.bin")
    if os.path.isfile(safe) or os.path.isfile(index):
        return wfiles.read_component(folder, "model"), safe if os.path.isfile(safe) else index
    if os.path.isfile(pickle):
        what = "transformers CLIPModel weight file"
        return read_state_dict(pickle, allow_pickle, suffixes=(".bin",), what=what), pickle
    raise WeightFileNotFound(
        f"{folder}: no model{SAFETENSORS_SUFFIX}, model{SAFETENSORS_SUFFIX}.index.json or pytorch_model.bin found "
        "(looking for a transformers CLIPModel; nothing is downloaded)"
    )


def _hf_preprocessing(folder: str, fields: dict) -> None:
    from ldm_jax.data.tokenizer import CLIPTokenizer

    fields.update(mean=OPENAI_MEAN, std=OPENAI_STD, pad_token="eot")
    pre = os.path.join(folder, "preprocessor_config.json")
    if os.path.isfile(pre):
        cfg = wfiles.read_json(pre)
        for ours, theirs in (("mean", "image_mean"), ("std", "image_std")):
            value = cfg.get(theirs)
            if value is not None:
                if len(value) != 3:
                    raise ValueError(f"{pre}: {theirs}={value}; expected 3 values (RGB)")
                fields[ours] = tuple(float(x) for x in value)
    if any(os.path.isfile(os.path.join(folder, n)) for n in ("vocab.json", "tokenizer.json")):
        fields["pad_token"] = CLIPTokenizer(max_length=2).check_hf_files(folder)


def load_clip_fields_and_params(
    path: str, arch: str | None = None, activation: str | None = None, allow_pickle: bool = False
) -> tuple[dict, Params]:
    """:func:`load_clip` returning the full fields dict (model fields plus ``pad_token``, ``mean``, ``std``,
    ``layer_norm_eps``, as a ``CLIP_VARIANTS`` entry) instead of the module."""
    if os.path.isdir(path):
        if arch is not None or activation is not None:
            raise ValueError(
                f"{path}: a transformers CLIPModel folder defines its architecture in config.json; arch={arch!r} / "
                f"activation={activation!r} are for OpenCLIP files only"
            )
        cfg_path = os.path.join(path, "config.json")
        fields = fields_from_hf_config(wfiles.read_json(cfg_path), cfg_path)
        validate_fields(fields, cfg_path)
        _hf_preprocessing(path, fields)
        sd, source = _read_hf_weights(path, allow_pickle)
        return fields, params_from_state_dict(sd, fields, "hf", source)
    if not os.path.exists(path):
        raise WeightFileNotFound(f"{path}: no such file or folder (looking for CLIP weights; nothing is downloaded)")
    sd = read_state_dict(path, allow_pickle=True, suffixes=OPENCLIP_SUFFIXES, what="OpenCLIP checkpoint")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    if any(k.startswith(("text_model.", "vision_model.")) for k in sd):
        raise ConversionError(
            f"{path}: holds a transformers CLIPModel state dict (text_model.* / vision_model.* keys); pass the "
            "model's folder (with its config.json) instead of the weight file"
        )
    fields = fields_from_openclip_shapes({k: tuple(v.shape) for k, v in sd.items()}, path, arch, activation)
    return fields, params_from_state_dict(sd, fields, "openclip", path)


def load_clip(
    path: str, arch: str | None = None, activation: str | None = None, allow_pickle: bool = False
) -> tuple[CLIP, Params, dict]:
    """Reads CLIP weights -> ``(model, params, settings)``.

    Args:
      path: a transformers ``CLIPModel`` folder, or an OpenCLIP checkpoint file (module docstring).
      arch: OpenCLIP files only: a ``CLIP_VARIANTS`` name ("vit_h14", "vit_l14" ...) giving the heads and the
        activation; the file's shapes must match it.
      activation: OpenCLIP files only: "gelu" (the default: OpenCLIP's own models) or "quick_gelu" (OpenAI's).
      allow_pickle: read a folder's ``pytorch_model.bin`` (an OpenCLIP pickle named as ``path`` is always read,
        with ``torch.load(weights_only=True)``).
    Returns:
      model: a ``CLIP`` module (float32); params: its params tree (numpy float32, on the host; place or shard it as
      the caller needs); settings: ``{"pad_token", "context_length", "image_size", "mean", "std"}``, what the
      tokenizer and the preprocessing need.
    Raises:
      ``weight_files.WeightFileError`` for an unreadable file, ``ConversionError`` (a ValueError) naming the file
      and keys for tensors that do not fit, ValueError for unsupported configurations.
    """
    fields, params = load_clip_fields_and_params(path, arch, activation, allow_pickle)
    settings = {k: fields[k] for k in ("pad_token", "context_length", "image_size", "mean", "std")}
    return build_clip(fields), params, settings

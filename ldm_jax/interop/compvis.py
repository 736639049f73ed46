"""Original CompVis / Stable Diffusion single-file checkpoints <-> Hugging Face diffusers / transformers layouts.

Pure Python + numpy (no jax, torch or flax, not even lazily), so it runs anywhere a checkpoint can be read.
State dicts are ``dict[str, np.ndarray]``. Every converter only renames keys; the arrays themselves are passed
through untouched (same object, same dtype) except where the two layouts really differ in shape:

* VAE mid-block attention ``q/k/v/proj_out``: CompVis 1x1 conv ``[C, C, 1, 1]`` <-> diffusers Linear ``[C, C]``
  (a reshape, which is a view for contiguous arrays);
* OpenCLIP ``attn.in_proj_weight/bias`` <-> CLIP ``q_proj/k_proj/v_proj`` (row slices are views; joining them back
  is the one place that allocates).

All converters are strict: an input key that no rule consumes raises ``ValueError`` naming the keys (the first 20
and a count). Conversions are exact inverses of each other (checked, together with agreement with diffusers' own
single-file converters, by ``tests/reference/check_compvis_mapping.py``).

Key layouts
-----------
CompVis keys are given with the component prefix stripped (``split_single_file`` does that); a converter handed
keys that still carry their prefix (``model.diffusion_model.``, ``first_stage_model.``, ``cond_stage_model.``)
strips it. diffusers-side CLIP keys are produced as ``text_model.*`` (the long-standing ``text_encoder/`` layout);
the flattened layout transformers >= 5.6 saves (``embeddings.*``, ``encoder.*``, ``final_layer_norm.*``) is
accepted on input.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

__all__ = [
    "PREFIXES",
    "clip_from_diffusers",
    "clip_to_diffusers",
    "open_clip_from_diffusers",
    "open_clip_to_diffusers",
    "split_single_file",
    "unet_from_diffusers",
    "unet_to_diffusers",
    "vae_from_diffusers",
    "vae_to_diffusers",
]

StateDict = dict  # dict[str, np.ndarray]

#: component name -> key prefix in an original single-file checkpoint
PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text": "cond_stage_model.",
}

# Keys of an original checkpoint that are not weights of the three components (training-time buffers and the
# schedule, EMA copies, the autoencoder's training loss/discriminator, CLIP's ``position_ids`` buffer).
_IGNORED_EXACT = frozenset(
    {
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "log_one_minus_alphas_cumprod",
        "logvar",
        "lvlb_weights",
        "scale_factor",
        "cond_stage_model.transformer.text_model.embeddings.position_ids",
        "cond_stage_model.transformer.embeddings.position_ids",
        "cond_stage_model.model.attn_mask",
    }
)
_IGNORED_PATTERNS = (
    re.compile(r"^model_ema\."),
    re.compile(r"^sqrt_"),
    re.compile(r"^posterior_"),
    re.compile(r"^first_stage_model\.loss\."),
)

_MAX_LISTED = 20


def _fail(what: str, message: str, keys: Iterable[str]) -> None:
    keys = sorted(keys)
    shown = ", ".join(keys[:_MAX_LISTED])
    more = f" ... and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else ""
    raise ValueError(f"{what}: {len(keys)} {message}: {shown}{more}")


def _check_consumed(what: str, sd: Mapping[str, Any], consumed: set) -> None:
    left = [k for k in sd if k not in consumed]
    if left:
        _fail(what, "key(s) not converted (unknown to the mapping)", left)


def _put(out: dict, key: str, value: Any, what: str) -> None:
    if key in out:
        raise ValueError(f"{what}: two input keys map to {key!r}")
    out[key] = value


def _strip_prefix(sd: Mapping[str, Any], prefix: str) -> dict:
    """Accepts a component's keys with or without its single-file prefix."""
    return {(k.removeprefix(prefix)): v for k, v in sd.items()}


def _is_ignored(key: str) -> bool:
    return key in _IGNORED_EXACT or any(p.match(key) for p in _IGNORED_PATTERNS)


# ---------------------------------------------------------------------------------------------------------------
# single file
# ---------------------------------------------------------------------------------------------------------------


def split_single_file(sd: Mapping[str, np.ndarray]) -> tuple[dict[str, StateDict], list[str]]:
    """Splits an original SD single-file state dict into its components.

    Returns ``(components, ignored)``:

    * ``components``: ``{"unet": {...}, "vae": {...}, "text": {...}}`` with the prefixes of ``PREFIXES``
      (``model.diffusion_model.``, ``first_stage_model.``, ``cond_stage_model.``) stripped; always all three
      names, a component the file lacks is an empty dict. The arrays are the input's (no copies).
    * ``ignored``: sorted list of the full keys recognised as non-weights and dropped (``model_ema.*``, the noise
      schedule ``betas`` / ``alphas_cumprod*`` / ``sqrt_*`` / ``posterior_*`` / ``log_one_minus_alphas_cumprod``,
      ``logvar``, ``lvlb_weights``, ``scale_factor``, ``first_stage_model.loss.*``, CLIP ``position_ids``,
      OpenCLIP ``attn_mask``), so callers can report them.

    Any other key outside the three prefixes raises ``ValueError`` listing (the first 20 of) them; SDXL-style files
    (``conditioner.*``) are among those.
    """
    comps: dict[str, StateDict] = {name: {} for name in PREFIXES}
    ignored, unknown = [], []
    for key, value in sd.items():
        if _is_ignored(key):
            ignored.append(key)
            continue
        for name, prefix in PREFIXES.items():
            if key.startswith(prefix):
                comps[name][key[len(prefix) :]] = value
                break
        else:
            unknown.append(key)
    if unknown:
        _fail(
            "split_single_file",
            "key(s) outside model.diffusion_model. / first_stage_model. / cond_stage_model. that are not known "
            "non-weights (SD 1.x / 2.x single files only)",
            unknown,
        )
    return comps, sorted(ignored)


# ---------------------------------------------------------------------------------------------------------------
# UNet
# ---------------------------------------------------------------------------------------------------------------

_UNET_RESNET = {  # CompVis ResBlock -> diffusers ResnetBlock2D
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_UNET_RESNET_BACK = {v: k for k, v in _UNET_RESNET.items()}

_UNET_FIXED = {  # CompVis module -> diffusers module (each with .weight and .bias)
    "input_blocks.0.0": "conv_in",
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}


def _unet_fixed(config: Mapping[str, Any]) -> dict[str, str]:
    fixed = dict(_UNET_FIXED)
    if config.get("addition_embed_type") == "text_time":
        fixed.update({"label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2"})
    elif config.get("class_embed_type") in ("timestep", "projection"):
        fixed.update({"label_emb.0.0": "class_embedding.linear_1", "label_emb.0.2": "class_embedding.linear_2"})
    return fixed


def _unet_layout(config: Mapping[str, Any]):
    """Index tables between CompVis ``input_blocks.N`` / ``output_blocks.N`` and diffusers blocks.

    Returns (down, down_sample, up, num_up): ``down[N] = (i, j)`` resnet/attention j of down block i;
    ``down_sample[N] = i`` the downsampler of block i; ``up[N] = (i, j)``.
    """
    types = config.get("down_block_types")
    n = len(types) if types else len(config["block_out_channels"])
    lpb = config["layers_per_block"]
    lpb = [int(lpb)] * n if isinstance(lpb, (int, np.integer)) else [int(x) for x in lpb]
    if len(lpb) != n:
        raise ValueError(f"unet config: layers_per_block {lpb} does not match {n} blocks")
    down, down_sample, up = {}, {}, {}
    idx = 1
    for i in range(n):
        for j in range(lpb[i]):
            down[idx] = (i, j)
            idx += 1
        if i < n - 1:
            down_sample[idx] = i
            idx += 1
    idx = 0
    for i, layers in enumerate(reversed(lpb)):
        for j in range(layers + 1):
            up[idx] = (i, j)
            idx += 1
    return down, down_sample, up, n


def _resnet_to(rest: str, table: Mapping[str, str]) -> str | None:
    for src, dst in table.items():
        if rest.startswith(src + "."):
            return dst + rest[len(src) :]
    return None


_BLOCK = re.compile(r"^(input_blocks|output_blocks|middle_block)\.(\d+)\.(\d+)\.(.+)$")
_MIDDLE = re.compile(r"^middle_block\.(\d+)\.(.+)$")


def unet_to_diffusers(sd: Mapping[str, np.ndarray], config: Mapping[str, Any]) -> StateDict:
    """CompVis ``model.diffusion_model.*`` (prefix stripped) -> diffusers ``UNet2DConditionModel`` state dict.

    ``config`` is the diffusers UNet config (``block_out_channels``, ``layers_per_block`` (int or per-block list),
    ``down_block_types``; ``addition_embed_type`` / ``class_embed_type`` select what ``label_emb`` maps to).
    Transformer blocks keep their names; linear (SD-2) and 1x1-conv (SD-1) ``proj_in/proj_out`` keep their shapes.
    """
    what = "unet_to_diffusers"
    sd = _strip_prefix(sd, PREFIXES["unet"])
    down, down_sample, up, num_up = _unet_layout(config)
    last_up = {}
    for i, j in up.values():
        last_up[i] = max(last_up.get(i, -1), j)
    fixed = _unet_fixed(config)
    out: StateDict = {}
    consumed = set()
    for key, value in sd.items():
        new = None
        module, _, leaf = key.rpartition(".")
        if module in fixed:
            new = f"{fixed[module]}.{leaf}"
        elif key in ("label_emb.weight",) and config.get("num_class_embeds") is not None:
            new = "class_embedding.weight"
        elif m := _MIDDLE.match(key):
            k, rest = int(m.group(1)), m.group(2)
            if k % 2 == 0:
                r = _resnet_to(rest, _UNET_RESNET)
                new = r and f"mid_block.resnets.{k // 2}.{r}"
            else:
                new = f"mid_block.attentions.{k // 2}.{rest}"
        elif (m := _BLOCK.match(key)) and m.group(1) != "middle_block":
            kind, n, sub, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
            if kind == "input_blocks":
                if n in down_sample:
                    if sub == 0 and rest in ("op.weight", "op.bias"):
                        new = f"down_blocks.{down_sample[n]}.downsamplers.0.conv.{rest[3:]}"
                elif n in down:
                    i, j = down[n]
                    if sub == 0:
                        r = _resnet_to(rest, _UNET_RESNET)
                        new = r and f"down_blocks.{i}.resnets.{j}.{r}"
                    elif sub == 1:
                        new = f"down_blocks.{i}.attentions.{j}.{rest}"
            elif n in up:
                i, j = up[n]
                if sub == 0:
                    r = _resnet_to(rest, _UNET_RESNET)
                    new = r and f"up_blocks.{i}.resnets.{j}.{r}"
                elif sub in (1, 2) and rest in ("conv.weight", "conv.bias"):
                    if j == last_up[i] and i < num_up - 1:
                        new = f"up_blocks.{i}.upsamplers.0.{rest}"
                elif sub == 1:
                    new = f"up_blocks.{i}.attentions.{j}.{rest}"
        if new:
            _put(out, new, value, what)
            consumed.add(key)
    _check_consumed(what, sd, consumed)
    return out


_D_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)$")
_D_MID = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.+)$")


def unet_from_diffusers(sd: Mapping[str, np.ndarray], config: Mapping[str, Any]) -> StateDict:
    """diffusers ``UNet2DConditionModel`` state dict -> CompVis ``model.diffusion_model.*`` keys (prefix not added).

    Inverse of ``unet_to_diffusers``; same ``config``. An up block's upsampler goes to ``output_blocks.N.2.conv``
    when that layer has an attention and ``output_blocks.N.1.conv`` otherwise, as in CompVis.
    """
    what = "unet_from_diffusers"
    down, down_sample, up, num_up = _unet_layout(config)
    down_back = {v: k for k, v in down.items()}
    sample_back = {v: k for k, v in down_sample.items()}
    up_back = {v: k for k, v in up.items()}
    last_up = {}
    for i, j in up.values():
        last_up[i] = max(last_up.get(i, -1), j)
    fixed_back = {v: k for k, v in _unet_fixed(config).items()}
    up_attn = set()
    for key in sd:
        m = _D_BLOCK.match(key)
        if m and m.group(1) == "up_blocks" and m.group(3) == "attentions":
            up_attn.add((int(m.group(2)), int(m.group(4))))
    out: StateDict = {}
    consumed = set()
    for key, value in sd.items():
        new = None
        module, _, leaf = key.rpartition(".")
        if module in fixed_back:
            new = f"{fixed_back[module]}.{leaf}"
        elif key == "class_embedding.weight" and config.get("num_class_embeds") is not None:
            new = "label_emb.weight"
        elif m := _D_MID.match(key):
            kind, k, rest = m.group(1), int(m.group(2)), m.group(3)
            if kind == "resnets":
                r = _resnet_to(rest, _UNET_RESNET_BACK)
                new = r and f"middle_block.{2 * k}.{r}"
            else:
                new = f"middle_block.{2 * k + 1}.{rest}"
        elif m := _D_BLOCK.match(key):
            blocks, i, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
            if blocks == "down_blocks":
                if kind == "resnets" and (i, j) in down_back:
                    r = _resnet_to(rest, _UNET_RESNET_BACK)
                    new = r and f"input_blocks.{down_back[(i, j)]}.0.{r}"
                elif kind == "attentions" and (i, j) in down_back:
                    new = f"input_blocks.{down_back[(i, j)]}.1.{rest}"
                elif kind == "downsamplers" and j == 0 and i in sample_back and rest in ("conv.weight", "conv.bias"):
                    new = f"input_blocks.{sample_back[i]}.0.op.{rest[5:]}"
            else:
                if kind == "resnets" and (i, j) in up_back:
                    r = _resnet_to(rest, _UNET_RESNET_BACK)
                    new = r and f"output_blocks.{up_back[(i, j)]}.0.{r}"
                elif kind == "attentions" and (i, j) in up_back:
                    new = f"output_blocks.{up_back[(i, j)]}.1.{rest}"
                elif kind == "upsamplers" and j == 0 and i < num_up - 1 and rest in ("conv.weight", "conv.bias"):
                    jl = last_up[i]
                    sub = 2 if (i, jl) in up_attn else 1
                    new = f"output_blocks.{up_back[(i, jl)]}.{sub}.{rest}"
        if new:
            _put(out, new, value, what)
            consumed.add(key)
    _check_consumed(what, sd, consumed)
    return out


# ---------------------------------------------------------------------------------------------------------------
# VAE (AutoencoderKL / VQModel)
# ---------------------------------------------------------------------------------------------------------------

_VAE_FIXED = {  # CompVis module -> diffusers module
    "encoder.conv_in": "encoder.conv_in",
    "encoder.conv_out": "encoder.conv_out",
    "encoder.norm_out": "encoder.conv_norm_out",
    "decoder.conv_in": "decoder.conv_in",
    "decoder.conv_out": "decoder.conv_out",
    "decoder.norm_out": "decoder.conv_norm_out",
    "quant_conv": "quant_conv",
    "post_quant_conv": "post_quant_conv",
}
_VAE_FIXED_BACK = {v: k for k, v in _VAE_FIXED.items()}
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
_VAE_RESNET_BACK = {v: k for k, v in _VAE_RESNET.items()}
_VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_VAE_ATTN_BACK = {v: k for k, v in _VAE_ATTN.items()}
_VAE_MID_RESNET = {"block_1": "resnets.0", "block_2": "resnets.1"}
_VAE_MID_RESNET_BACK = {v: k for k, v in _VAE_MID_RESNET.items()}


def _vae_layout(config: Mapping[str, Any]) -> tuple[int, int]:
    cls = config.get("_class_name", "AutoencoderKL")
    if cls not in ("AutoencoderKL", "VQModel"):
        raise ValueError(f"vae config: _class_name {cls!r} is not AutoencoderKL or VQModel")
    types = config.get("down_block_types")
    n = len(types) if types else len(config["block_out_channels"])
    return n, int(config.get("layers_per_block", 1))


def _attn_to_linear(value: np.ndarray, key: str) -> np.ndarray:
    if value.ndim == 4:
        if value.shape[2:] != (1, 1):
            raise ValueError(f"{key}: expected a 1x1 convolution weight, got shape {value.shape}")
        return value.reshape(value.shape[:2])
    if value.ndim == 2:  # already Linear (some re-saved checkpoints)
        return value
    raise ValueError(f"{key}: unexpected attention weight shape {value.shape}")


def _attn_to_conv(value: np.ndarray, key: str) -> np.ndarray:
    if value.ndim == 2:
        return value.reshape(value.shape + (1, 1))
    if value.ndim == 4 and value.shape[2:] == (1, 1):
        return value
    raise ValueError(f"{key}: unexpected attention weight shape {value.shape}")


_C_VAE_BLOCK = re.compile(r"^(encoder\.down|decoder\.up)\.(\d+)\.(block\.(\d+)|downsample|upsample)\.(.+)$")
_C_VAE_MID = re.compile(r"^(encoder|decoder)\.mid\.(block_1|block_2|attn_1)\.(.+)$")


def vae_to_diffusers(sd: Mapping[str, np.ndarray], config: Mapping[str, Any]) -> StateDict:
    """CompVis first stage (``first_stage_model.*``, prefix stripped) -> diffusers ``AutoencoderKL`` / ``VQModel``.

    ``config`` is the diffusers VAE config (``block_out_channels`` or ``down_block_types`` give the number of
    levels, ``layers_per_block``, ``_class_name``). CompVis ``decoder.up.K`` is diffusers ``decoder.up_blocks.
    (levels-1-K)``. Mid-block attention 1x1 convs become Linear weights; VQ ``quantize.embedding.weight`` is kept.
    """
    what = "vae_to_diffusers"
    sd = _strip_prefix(sd, PREFIXES["vae"])
    n, layers = _vae_layout(config)
    vq = config.get("_class_name") == "VQModel"
    out: StateDict = {}
    consumed = set()
    for key, value in sd.items():
        new = None
        module, _, leaf = key.rpartition(".")
        if module in _VAE_FIXED:
            new = f"{_VAE_FIXED[module]}.{leaf}"
        elif vq and key == "quantize.embedding.weight":
            new = key
        elif m := _C_VAE_MID.match(key):
            part, blk, rest = m.group(1), m.group(2), m.group(3)
            sub, _, leaf = rest.rpartition(".")
            if blk == "attn_1":
                if sub in _VAE_ATTN:
                    new = f"{part}.mid_block.attentions.0.{_VAE_ATTN[sub]}.{leaf}"
                    if leaf == "weight" and sub != "norm":
                        value = _attn_to_linear(value, key)
            elif sub in _VAE_RESNET:
                new = f"{part}.mid_block.{_VAE_MID_RESNET[blk]}.{_VAE_RESNET[sub]}.{leaf}"
        elif m := _C_VAE_BLOCK.match(key):
            part, k, kind, rest = m.group(1), int(m.group(2)), m.group(3), m.group(5)
            if k < n:
                enc = part == "encoder.down"
                i = k if enc else n - 1 - k
                blocks = "encoder.down_blocks" if enc else "decoder.up_blocks"
                if kind.startswith("block."):
                    j = int(m.group(4))
                    sub, _, leaf = rest.rpartition(".")
                    if j < layers + (0 if enc else 1) and sub in _VAE_RESNET:
                        new = f"{blocks}.{i}.resnets.{j}.{_VAE_RESNET[sub]}.{leaf}"
                elif (
                    kind == ("downsample" if enc else "upsample") and rest in ("conv.weight", "conv.bias") and i < n - 1
                ):
                    new = f"{blocks}.{i}.{kind}rs.0.{rest}"  # all levels but the last (encoder) / first (decoder)
        if new:
            _put(out, new, value, what)
            consumed.add(key)
    _check_consumed(what, sd, consumed)
    return out


_D_VAE_BLOCK = re.compile(
    r"^(encoder\.down_blocks|decoder\.up_blocks)\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)$"
)
_D_VAE_MID = re.compile(r"^(encoder|decoder)\.mid_block\.(resnets\.0|resnets\.1|attentions\.0)\.(.+)$")


def vae_from_diffusers(sd: Mapping[str, np.ndarray], config: Mapping[str, Any]) -> StateDict:
    """diffusers ``AutoencoderKL`` / ``VQModel`` state dict -> CompVis first-stage keys (prefix not added).

    Inverse of ``vae_to_diffusers``; Linear attention weights become ``[C, C, 1, 1]`` (views, no copies).
    diffusers < 0.14 attention names (``query/key/value/proj_attn``) are not accepted: normalise them first.
    """
    what = "vae_from_diffusers"
    n, layers = _vae_layout(config)
    vq = config.get("_class_name") == "VQModel"
    out: StateDict = {}
    consumed = set()
    for key, value in sd.items():
        new = None
        module, _, leaf = key.rpartition(".")
        if module in _VAE_FIXED_BACK:
            new = f"{_VAE_FIXED_BACK[module]}.{leaf}"
        elif vq and key == "quantize.embedding.weight":
            new = key
        elif m := _D_VAE_MID.match(key):
            part, blk, rest = m.group(1), m.group(2), m.group(3)
            sub, _, leaf = rest.rpartition(".")
            if blk == "attentions.0":
                if sub in _VAE_ATTN_BACK:
                    new = f"{part}.mid.attn_1.{_VAE_ATTN_BACK[sub]}.{leaf}"
                    if leaf == "weight" and sub != "group_norm":
                        value = _attn_to_conv(value, key)
            elif sub in _VAE_RESNET_BACK:
                new = f"{part}.mid.{_VAE_MID_RESNET_BACK[blk]}.{_VAE_RESNET_BACK[sub]}.{leaf}"
        elif m := _D_VAE_BLOCK.match(key):
            part, i, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
            if i < n:
                enc = part == "encoder.down_blocks"
                k = i if enc else n - 1 - i
                blocks = "encoder.down" if enc else "decoder.up"
                if kind == "resnets":
                    sub, _, leaf = rest.rpartition(".")
                    if j < layers + (0 if enc else 1) and sub in _VAE_RESNET_BACK:
                        new = f"{blocks}.{k}.block.{j}.{_VAE_RESNET_BACK[sub]}.{leaf}"
                elif kind == ("downsamplers" if enc else "upsamplers") and j == 0 and i < n - 1:
                    new = f"{blocks}.{k}.{kind[:-2]}.{rest}" if rest in ("conv.weight", "conv.bias") else None
        if new:
            _put(out, new, value, what)
            consumed.add(key)
    _check_consumed(what, sd, consumed)
    return out


# ---------------------------------------------------------------------------------------------------------------
# SD-1 text encoder (transformers CLIPTextModel inside CompVis FrozenCLIPEmbedder)
# ---------------------------------------------------------------------------------------------------------------

_CLIP_TOP = ("embeddings.", "encoder.", "final_layer_norm.")
_CLIP_BUFFERS = ("embeddings.position_ids",)


def _clip_inner(key: str) -> str | None:
    """``text_model.X`` or flattened ``X`` -> ``X`` when X is a CLIPTextTransformer key."""
    inner = key.removeprefix("text_model.")
    return inner if inner.startswith(_CLIP_TOP) else None


def clip_to_diffusers(sd: Mapping[str, np.ndarray]) -> StateDict:
    """SD-1 CompVis ``cond_stage_model.*`` (prefix stripped: ``transformer.text_model.*``) -> transformers
    ``CLIPTextModel`` keys ``text_model.*``.

    Old files without the inner ``text_model.`` (``transformer.embeddings.*``) are accepted too. The
    ``embeddings.position_ids`` buffer (not a weight; an arange) is dropped.
    """
    what = "clip_to_diffusers"
    sd = _strip_prefix(sd, PREFIXES["text"])
    out: StateDict = {}
    consumed = set()
    for key, value in sd.items():
        if not key.startswith("transformer."):
            continue
        inner = _clip_inner(key[len("transformer.") :])
        if inner is None:
            continue
        consumed.add(key)
        if inner in _CLIP_BUFFERS:
            continue
        _put(out, f"text_model.{inner}", value, what)
    _check_consumed(what, sd, consumed)
    return out


def clip_from_diffusers(sd: Mapping[str, np.ndarray]) -> StateDict:
    """transformers ``CLIPTextModel`` state dict (``text_model.*`` or the flattened transformers >= 5.6 layout)
    -> CompVis ``transformer.text_model.*`` keys (``cond_stage_model.`` not added). ``position_ids`` is dropped."""
    what = "clip_from_diffusers"
    out: StateDict = {}
    consumed = set()
    for key, value in sd.items():
        inner = _clip_inner(key)
        if inner is None:
            continue
        consumed.add(key)
        if inner in _CLIP_BUFFERS:
            continue
        _put(out, f"transformer.text_model.{inner}", value, what)
    _check_consumed(what, sd, consumed)
    return out


# ---------------------------------------------------------------------------------------------------------------
# SD-2 text encoder (OpenCLIP ViT-H/14 text tower inside CompVis FrozenOpenCLIPEmbedder)
# ---------------------------------------------------------------------------------------------------------------

_OC_FIXED = {  # OpenCLIP (after "model.") -> CLIPTextTransformer (after "text_model.")
    "token_embedding.weight": "embeddings.token_embedding.weight",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_final.weight": "final_layer_norm.weight",
    "ln_final.bias": "final_layer_norm.bias",
}
_OC_FIXED_BACK = {v: k for k, v in _OC_FIXED.items()}
_OC_LAYER = {  # inside resblocks.i / encoder.layers.i, without in_proj
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_OC_LAYER_BACK = {v: k for k, v in _OC_LAYER.items()}
_OC_DROP = ("text_projection", "logit_scale", "attn_mask")  # not used by SD-2's conditioning
_OC_RES = re.compile(r"^model\.transformer\.resblocks\.(\d+)\.(.+)$")
_D_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.(.+)$")


def _layers_to_keep(config: Mapping[str, Any] | None, count: int) -> int:
    if config is None or config.get("num_hidden_layers") is None:
        return count - 1  # SD-2 convention: the penultimate layer's output is the conditioning
    keep = int(config["num_hidden_layers"])
    if keep > count:
        raise ValueError(f"open_clip: config asks for {keep} layers but the checkpoint has {count} resblocks")
    return keep


def open_clip_to_diffusers(
    sd: Mapping[str, np.ndarray], config: Mapping[str, Any] | None
) -> tuple[StateDict, StateDict]:
    """SD-2 CompVis ``cond_stage_model.*`` (prefix stripped: ``model.*`` OpenCLIP layout) -> transformers
    ``CLIPTextModel`` keys ``text_model.*``.

    Returns ``(converted, dropped)``. ``dropped`` maps the input keys (``model.*``, no ``cond_stage_model.``) that
    were deliberately left out to their arrays: the resblocks at index >= ``config["num_hidden_layers"]`` (SD-2
    conditions on the penultimate layer, so its diffusers text encoder has one layer fewer than the OpenCLIP tower;
    ``config=None`` keeps resblocks - 1), ``model.text_projection``, ``model.logit_scale``, ``model.attn_mask``
    and the image tower ``model.visual.*`` if present. Pass ``dropped`` back to ``open_clip_from_diffusers`` to
    rebuild the exact original. ``attn.in_proj_weight/bias`` are split into q/k/v (views).
    """
    what = "open_clip_to_diffusers"
    sd = _strip_prefix(sd, PREFIXES["text"])
    count = len({int(m.group(1)) for k in sd if (m := _OC_RES.match(k))})
    keep = _layers_to_keep(config, count)
    out: StateDict = {}
    dropped: StateDict = {}
    consumed = set()
    for key, value in sd.items():
        if not key.startswith("model."):
            continue
        inner = key[len("model.") :]
        if inner in _OC_FIXED:
            _put(out, f"text_model.{_OC_FIXED[inner]}", value, what)
        elif inner in _OC_DROP or inner.startswith("visual."):
            dropped[key] = value
        elif m := _OC_RES.match(key):
            i, rest = int(m.group(1)), m.group(2)
            if i >= keep:
                if rest.startswith(("attn.in_proj_", "ln_", "attn.out_proj.", "mlp.c_fc.", "mlp.c_proj.")):
                    dropped[key] = value
                    consumed.add(key)
                continue
            base = f"text_model.encoder.layers.{i}"
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                if value.shape[0] % 3:
                    raise ValueError(f"{what}: {key} has shape {value.shape}, not 3 stacked projections")
                w = value.shape[0] // 3
                leaf = rest[len("attn.in_proj_") :]
                for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
                    _put(out, f"{base}.self_attn.{name}.{leaf}", value[j * w : (j + 1) * w], what)
            else:
                module, _, leaf = rest.rpartition(".")
                if module not in _OC_LAYER:
                    continue
                _put(out, f"{base}.{_OC_LAYER[module]}.{leaf}", value, what)
        else:
            continue
        consumed.add(key)
    _check_consumed(what, sd, consumed)
    for i in range(keep):
        if f"text_model.encoder.layers.{i}.self_attn.q_proj.weight" not in out:
            raise ValueError(f"{what}: resblock {i} (of {keep} kept) has no attn.in_proj_weight")
    return out, dropped


def open_clip_from_diffusers(
    sd: Mapping[str, np.ndarray],
    config: Mapping[str, Any] | None,
    dropped: Mapping[str, np.ndarray] | None = None,
    pad_last_layer: bool = True,
) -> StateDict:
    """transformers ``CLIPTextModel`` state dict (``text_model.*`` or flattened) -> SD-2 CompVis ``model.*`` keys
    (``cond_stage_model.`` not added).

    ``q/k/v`` projections are concatenated into ``attn.in_proj_weight/bias`` (the one copy this module makes).
    ``config["num_hidden_layers"]``, if given, must equal the number of layers in ``sd``.

    The last OpenCLIP resblock (index ``num_hidden_layers``) is never run by SD-2 (``layer="penultimate"``) and is
    not in diffusers' text encoder. What fills it:

    * ``dropped`` (the second value of ``open_clip_to_diffusers``): its arrays are put back verbatim (keys
      ``model.*``, with or without ``cond_stage_model.``), giving back the original file's text encoder exactly,
      ``text_projection`` and ``logit_scale`` included;
    * otherwise, with ``pad_last_layer`` (default), a dummy resblock of zeros shaped like the last real one is
      added, so that CompVis' FrozenOpenCLIPEmbedder, which skips the *last* resblock, runs exactly the real
      layers. (All-zero weights make the block an identity, too.) diffusers' reference converter
      (``convert_open_clip_checkpoint``) drops ``resblocks.23`` by name, i.e. exactly this dummy for SD-2's 24-layer
      tower; for other depths it converts the dummy into one extra ``encoder.layers.N`` that
      ``CLIPTextModel`` loading ignores as unexpected. ``text_projection`` / ``logit_scale`` are not invented
      (SD-2 does not use them; the reference converter ignores ``text_projection``).
    """
    what = "open_clip_from_diffusers"
    out: StateDict = {}
    consumed = set()
    inproj: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    layers = set()
    for key, value in sd.items():
        inner = _clip_inner(key)
        if inner is None:
            continue
        if inner in _CLIP_BUFFERS:
            consumed.add(key)
            continue
        new = None
        if inner in _OC_FIXED_BACK:
            new = f"model.{_OC_FIXED_BACK[inner]}"
        elif m := _D_LAYER.match(inner):
            i, rest = int(m.group(1)), m.group(2)
            module, _, leaf = rest.rpartition(".")
            qkv = re.match(r"^self_attn\.(q|k|v)_proj$", module)
            if qkv and leaf in ("weight", "bias"):
                layers.add(i)
                slot = inproj.setdefault((i, leaf), {})
                if qkv.group(1) in slot:
                    raise ValueError(f"{what}: two input keys map to layer {i} {qkv.group(1)}_proj.{leaf}")
                slot[qkv.group(1)] = value
                consumed.add(key)
                continue
            if module in _OC_LAYER_BACK:
                layers.add(i)
                new = f"model.transformer.resblocks.{i}.{_OC_LAYER_BACK[module]}.{leaf}"
        if new:
            _put(out, new, value, what)
            consumed.add(key)
    _check_consumed(what, sd, consumed)
    for (i, leaf), parts in sorted(inproj.items()):
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"{what}: layer {i} has only {sorted(parts)} of the q/k/v {leaf}s")
        _put(
            out,
            f"model.transformer.resblocks.{i}.attn.in_proj_{leaf}",
            np.concatenate([parts["q"], parts["k"], parts["v"]], axis=0),
            what,
        )
    count = len(layers)
    if layers != set(range(count)):
        raise ValueError(f"{what}: layer indices are not 0..{count - 1}: {sorted(layers)}")
    if config is not None and config.get("num_hidden_layers") is not None and int(config["num_hidden_layers"]) != count:
        raise ValueError(f"{what}: config num_hidden_layers={config['num_hidden_layers']} but sd has {count} layers")
    if dropped is not None:
        for key, value in dropped.items():
            key = key.removeprefix(PREFIXES["text"])
            if not key.startswith("model."):
                raise ValueError(f"{what}: dropped key {key!r} is not an OpenCLIP model.* key")
            _put(out, key, value, what)
    elif pad_last_layer and count:
        src = f"model.transformer.resblocks.{count - 1}."
        dst = f"model.transformer.resblocks.{count}."
        for key in [k for k in out if k.startswith(src)]:
            out[dst + key[len(src) :]] = np.zeros_like(out[key])
    return out

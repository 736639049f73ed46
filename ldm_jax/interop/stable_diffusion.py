"""Stable Diffusion checkpoints <-> ldm_jax workdirs.

Import reads a diffusers pipeline folder (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``) or
an original single-file checkpoint (``model.diffusion_model.*`` ...), converts every tensor strictly and writes two
workdirs that ``ldm_jax.sample`` and ``ldm_jax.train`` (as ``init_from``) read: ``<out>/first_stage`` (the
autoencoder) and ``<out>`` (the text encoder and UNet, whose config names the first stage). Export does the reverse
into a folder that ``diffusers.StableDiffusionPipeline.from_pretrained`` loads.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import ml_collections

from ldm_jax import config_lib, storage
from ldm_jax.data.tokenizer import CLIPTokenizer
from ldm_jax.diffusion.samplers import SamplerOptions
from ldm_jax.interop import diffusers_config
from ldm_jax.interop import files as wfiles
from ldm_jax.interop.state_dict import (
    ConversionError,
    normalize_clip_keys,
    normalize_vae_keys,
    params_from_state_dict,
    params_to_state_dict,
)
from ldm_jax.models import lora
from ldm_jax.models.text_encoders import CLIPTextTransformer
from ldm_jax.models.unet import UNet
from ldm_jax.models.first_stage import build_autoencoder, latent_channels

UNET_FIELDS = (
    "in_channels",
    "out_channels",
    "block_out_channels",
    "layers_per_block",
    "attention_levels",
    "num_heads",
    "head_dim",
    "transformer_depth",
    "context_dim",
    "norm_groups",
    "use_linear_projection",
    "addition_embed_type",
    "addition_embed_type_num_heads",
)
# The tasks whose runs a diffusers Stable Diffusion pipeline can hold (text-to-image and its inpainting models).
EXPORTABLE_TASKS = ("txt2img", "inpainting")
TEXT_FIELDS = ("vocab_size", "max_length", "width", "layers", "heads", "activation", "output_layer")


# ---- building our modules from fields ---------------------------------------------------------------------------
def build_unet(fields: dict) -> UNet:
    return UNet(**{k: fields[k] for k in UNET_FIELDS})


def build_first_stage(fields: dict):
    # The pipeline's fields carry the diffusers config's scaling factor and sample size beside the model's.
    return build_autoencoder({k: v for k, v in fields.items() if k not in ("scaling_factor", "sample_size")})


def build_text_encoder(fields: dict) -> CLIPTextTransformer:
    return CLIPTextTransformer(**{k: fields[k] for k in TEXT_FIELDS})


def abstract_params(module, *inputs) -> Any:
    """Parameter shapes of ``module`` without allocating them."""
    return jax.eval_shape(lambda: module.init(jax.random.key(0), *inputs))["params"]


def unet_abstract(fields: dict):
    side = 2 ** (len(fields["block_out_channels"]) - 1)
    x = jnp.zeros((1, side, side, fields["in_channels"]))
    return abstract_params(build_unet(fields), x, jnp.zeros((1,), jnp.int32), jnp.zeros((1, 1, fields["context_dim"])))


def first_stage_abstract(fields: dict):
    side = 2 ** (len(fields["block_out_channels"]) - 1)
    return abstract_params(
        build_first_stage(fields),
        jnp.zeros((1, side, side, 3)),
        *(() if fields["kind"] == "vq" else (jax.random.key(0),)),
    )


def text_abstract(fields: dict):
    return abstract_params(build_text_encoder(fields), jnp.zeros((1, fields["max_length"]), jnp.int32))


# ---- a converted pipeline in memory -----------------------------------------------------------------------------
@dataclasses.dataclass
class Pipeline:
    unet: dict  # UNet fields (+ sample_size)
    first_stage: dict  # autoencoder model fields (+ scaling_factor, sample_size)
    text: dict  # text encoder fields (+ pad_token)
    scheduler: (
        dict  # {"diffusion": schedule fields, "sample": sampler fields} (diffusers_config.scheduler_from_diffusers)
    )
    params: dict  # {"unet", "first_stage", "text"} numpy trees
    ignored: list  # source keys deliberately not converted (buffers, unused towers), for the record


def _convert_unet(sd, fields, what):
    return params_from_state_dict("unet", sd, unet_abstract(fields), what, consume=True)


def _convert_first_stage(sd, fields, what):
    kind = "vq" if fields["kind"] == "vq" else "vae"
    return params_from_state_dict(kind, normalize_vae_keys(sd), first_stage_abstract(fields), what, consume=True)


def _convert_text(sd, fields, what):
    sd, dropped = normalize_clip_keys(sd)
    return params_from_state_dict("clip", sd, text_abstract(fields), what, consume=True), dropped


def _text_fields(cfg: dict, pad_token: str, what: str) -> dict:
    fields = diffusers_config.clip_from_transformers(cfg, what)
    fields.update(output_layer=-1, pad_token=pad_token)
    return fields


def load_diffusers_folder(folder: str, allow_pickle: bool = False) -> Pipeline:
    """Reads and converts a diffusers Stable Diffusion pipeline folder."""
    index_path = os.path.join(folder, "model_index.json")
    index = wfiles.read_json(index_path)
    missing = [c for c in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if not index.get(c)]
    if missing:
        raise ValueError(f"{index_path}: components {missing} are missing; a Stable Diffusion pipeline needs them")
    sub = lambda name: os.path.join(folder, name)  # noqa: E731
    unet = diffusers_config.unet_from_diffusers(wfiles.read_json(sub("unet/config.json")), f"{folder}/unet/config.json")
    first = diffusers_config.vae_from_diffusers(wfiles.read_json(sub("vae/config.json")), f"{folder}/vae/config.json")
    pad = CLIPTokenizer().check_hf_files(sub("tokenizer"))
    text = _text_fields(wfiles.read_json(sub("text_encoder/config.json")), pad, f"{folder}/text_encoder/config.json")
    sched_path = sub("scheduler/scheduler_config.json")
    scheduler = diffusers_config.scheduler_from_diffusers(wfiles.read_json(sched_path), sched_path)
    params = {
        "unet": _convert_unet(
            wfiles.read_component(sub("unet"), "diffusion_pytorch_model", allow_pickle), unet, f"{folder}/unet"
        ),
        "first_stage": _convert_first_stage(
            wfiles.read_component(sub("vae"), "diffusion_pytorch_model", allow_pickle), first, f"{folder}/vae"
        ),
    }
    params["text"], ignored = _convert_text(
        wfiles.read_component(sub("text_encoder"), "model", allow_pickle), text, f"{folder}/text_encoder"
    )
    return Pipeline(unet, first, text, scheduler, params, [f"text_encoder/{k}" for k in ignored])


def load_component_folder(folder: str, allow_pickle: bool = False) -> tuple[str, dict, dict, list]:
    """One diffusers / transformers model folder -> (kind, fields, params, ignored keys).

    kind is "unet", "first_stage" or "text" (from ``_class_name`` / ``architectures`` in its config.json)."""
    cfg = wfiles.read_json(os.path.join(folder, "config.json"))
    cls = cfg.get("_class_name") or (cfg.get("architectures") or [""])[0]
    what = os.path.join(folder, "config.json")
    if cls == "UNet2DConditionModel":
        fields = diffusers_config.unet_from_diffusers(cfg, what)
        sd = wfiles.read_component(folder, "diffusion_pytorch_model", allow_pickle)
        return "unet", fields, _convert_unet(sd, fields, folder), []
    if cls in ("AutoencoderKL", "VQModel"):
        fields = diffusers_config.vae_from_diffusers(cfg, what)
        sd = wfiles.read_component(folder, "diffusion_pytorch_model", allow_pickle)
        return "first_stage", fields, _convert_first_stage(sd, fields, folder), []
    if cls == "CLIPTextModel" or cfg.get("model_type") == "clip_text_model":
        fields = _text_fields(cfg, "eot", what)
        params, ignored = _convert_text(wfiles.read_component(folder, "model", allow_pickle), fields, folder)
        return "text", fields, params, ignored
    raise ValueError(
        f"{what}: model class {cls!r} is not one ldm_jax converts (UNet2DConditionModel, AutoencoderKL, "
        "VQModel, CLIPTextModel)"
    )


def load_single_file(
    path: str, config_dir: str = "", allow_pickle: bool = False, prediction_type: str = ""
) -> Pipeline:
    """Reads an original (CompVis-layout) Stable Diffusion checkpoint.

    The architecture comes from ``config_dir`` (a diffusers pipeline folder whose config.json files describe it,
    like diffusers' ``from_single_file(config=...)``); without one it is inferred from tensor shapes for the
    standard SD 1.x / 2.x layouts.
    """
    from ldm_jax.interop import compvis

    sd = wfiles.read_state_dict(path, allow_pickle)
    parts, ignored = compvis.split_single_file(sd)
    del sd
    for need in ("unet", "vae", "text"):
        if not parts.get(need):
            raise ConversionError(f"{path}: no {need} weights found (expected keys under {compvis.PREFIXES[need]!r})")
    open_clip = any(k.startswith("model.") for k in parts["text"])
    if config_dir:
        ref = load_configs_only(config_dir)
        unet_cfg, vae_cfg, text_cfg, sched_cfg = ref
    else:
        unet_cfg, vae_cfg, text_cfg, sched_cfg = infer_single_file_configs(parts, open_clip)
    if prediction_type:
        sched_cfg = dict(sched_cfg, prediction_type=prediction_type)
    unet = diffusers_config.unet_from_diffusers(unet_cfg, f"{path} (unet)")
    first = diffusers_config.vae_from_diffusers(vae_cfg, f"{path} (vae)")
    text = _text_fields(text_cfg, "zero" if open_clip else "eot", f"{path} (text encoder)")
    scheduler = diffusers_config.scheduler_from_diffusers(sched_cfg, f"{path} (scheduler)")
    unet_sd = compvis.unet_to_diffusers(parts.pop("unet"), unet_cfg)
    vae_sd = compvis.vae_to_diffusers(parts.pop("vae"), vae_cfg)
    if open_clip:
        text_sd, dropped = compvis.open_clip_to_diffusers(parts.pop("text"), text_cfg)
        ignored = list(ignored) + [f"cond_stage_model.{k}" for k in dropped]
    else:
        text_sd = compvis.clip_to_diffusers(parts.pop("text"))
    params = {
        "unet": _convert_unet(unet_sd, unet, f"{path} (model.diffusion_model)"),
        "first_stage": _convert_first_stage(vae_sd, first, f"{path} (first_stage_model)"),
    }
    params["text"], dropped = _convert_text(text_sd, text, f"{path} (cond_stage_model)")
    return Pipeline(unet, first, text, scheduler, params, list(ignored) + list(dropped))


def load_configs_only(folder: str) -> tuple[dict, dict, dict, dict]:
    read = lambda p: wfiles.read_json(os.path.join(folder, p))  # noqa: E731
    return (
        read("unet/config.json"),
        read("vae/config.json"),
        read("text_encoder/config.json"),
        read("scheduler/scheduler_config.json"),
    )


def infer_single_file_configs(parts: dict, open_clip: bool) -> tuple[dict, dict, dict, dict]:
    """diffusers-style configs of a standard SD 1.x / 2.x single-file checkpoint, from its tensor shapes."""
    u = parts["unet"]
    c0 = u["input_blocks.0.0.weight"].shape[0]
    in_ch = u["input_blocks.0.0.weight"].shape[1]
    levels, chans, attn = 0, [], []
    # input_blocks: 0 = conv_in, then per level `layers` resnets (+ attentions) and a downsampler.
    idx = sorted({int(k.split(".")[1]) for k in u if k.startswith("input_blocks.")})
    blocks = [i for i in idx if i > 0]
    down = [i for i in blocks if f"input_blocks.{i}.0.op.weight" in u]
    layers = (down[0] - 1) if down else len(blocks)
    levels = len(down) + 1
    for lev in range(levels):
        first = 1 + lev * (layers + 1)
        chans.append(int(u[f"input_blocks.{first}.0.out_layers.3.weight"].shape[0]))
        attn.append(f"input_blocks.{first}.1.proj_in.weight" in u)
    linear = u[next(k for k in u if k.endswith("proj_in.weight"))].ndim == 2
    ctx = int(u[next(k for k in u if k.endswith("attn2.to_k.weight"))].shape[1])
    # SD 1.x uses 8 heads everywhere; SD 2.x 64-wide heads (how diffusers' own single-file loader infers them).
    heads = [c // 64 for c in chans] if linear else 8
    unet_cfg = dict(
        block_out_channels=chans,
        layers_per_block=layers,
        in_channels=int(in_ch),
        out_channels=int(u["out.2.weight"].shape[0]),
        cross_attention_dim=ctx,
        attention_head_dim=heads,
        use_linear_projection=linear,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        norm_num_groups=32,
        sample_size=96 if linear else 64,
    )
    assert c0 == chans[0]
    v = parts["vae"]
    vidx = sorted({int(k.split(".")[2]) for k in v if k.startswith("encoder.down.")})
    vchans = [int(v[f"encoder.down.{i}.block.0.conv2.weight"].shape[0]) for i in vidx]
    vlayers = len({k.split(".")[4] for k in v if k.startswith("encoder.down.0.block.")})
    vae_cfg = dict(
        _class_name="VQModel" if "quantize.embedding.weight" in v else "AutoencoderKL",
        block_out_channels=vchans,
        layers_per_block=vlayers,
        latent_channels=int(v["post_quant_conv.weight"].shape[1]),
        norm_num_groups=32,
        scaling_factor=0.18215,
    )
    t = parts["text"]
    if open_clip:
        width = int(t["model.token_embedding.weight"].shape[1])
        n = len({k.split(".")[3] for k in t if k.startswith("model.transformer.resblocks.")})
        text_cfg = dict(
            hidden_size=width,
            num_hidden_layers=n - 1,
            num_attention_heads=width // 64,
            intermediate_size=4 * width,
            hidden_act="gelu",
            max_position_embeddings=int(t["model.positional_embedding"].shape[0]),
            vocab_size=int(t["model.token_embedding.weight"].shape[0]),
        )
    else:
        # Old SD-1 files lack the inner "text_model." (transformer.embeddings.*), as compvis.clip_to_diffusers accepts.
        p = (
            "transformer.text_model."
            if "transformer.text_model.embeddings.token_embedding.weight" in t
            else "transformer."
        )
        width = int(t[p + "embeddings.token_embedding.weight"].shape[1])
        n = len({k[len(p) :].split(".")[2] for k in t if k.startswith(p + "encoder.layers.")})
        text_cfg = dict(
            hidden_size=width,
            num_hidden_layers=n,
            num_attention_heads=width // 64,
            intermediate_size=4 * width,
            hidden_act="quick_gelu",
            max_position_embeddings=int(t[p + "embeddings.position_embedding.weight"].shape[0]),
            vocab_size=int(t[p + "embeddings.token_embedding.weight"].shape[0]),
        )
    # Stable Diffusion's training schedule, sampled with DDIM as the original scripts did.
    sched_cfg = dict(
        _class_name="DDIMScheduler",
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        num_train_timesteps=1000,
        prediction_type="epsilon",
        steps_offset=1,
        timestep_spacing="leading",
        clip_sample=False,
        set_alpha_to_one=False,
    )
    return unet_cfg, vae_cfg, text_cfg, sched_cfg


# ---- writing workdirs ------------------------------------------------------------------------------------------
def _save_weights(workdir: str, params, meta: dict) -> None:
    """One checkpoint (step 0) holding ``params`` only, saved from host memory (no device copy of 4 GB trees)."""
    from ldm_jax.training.checkpoint import Checkpointer

    ckpt = Checkpointer(workdir, max_to_keep=1, async_save=False)
    # No checksums: the tree is in host memory, and a converted checkpoint is read, never resumed from.
    ckpt.save(0, {"params": params}, meta, force=True, checksum=False)
    ckpt.wait()
    ckpt.close()


def first_stage_config(fields: dict, image_size: int):
    from configs import autoencoder_kl

    c = autoencoder_kl.get_config("kl_f8")
    c.preset = "converted"
    model = {k: v for k, v in fields.items() if k not in ("scaling_factor", "sample_size")}
    c.model = ml_collections.ConfigDict(model)
    c.data.image_size = image_size
    c.data.source = ""  # a converted model has no training data of its own: set one to train it further
    return c


def pipeline_task(pipe: Pipeline) -> str:
    """ "inpainting" for a UNet that takes mask + masked-image latents after its latents (9 channels for SD), else
    "txt2img"; anything else is refused by ``check_compatible``."""
    z = latent_channels(pipe.first_stage)
    return "inpainting" if pipe.unet["in_channels"] == 2 * z + 1 else "txt2img"


def workdir_config(pipe: Pipeline, first_stage_workdir: str):
    """The workdir config of an imported pipeline: a txt2img run, or an inpainting run for inpainting UNets."""
    from configs import inpainting, txt2img

    c = (inpainting if pipeline_task(pipe) == "inpainting" else txt2img).get_config("sd")
    c.preset = "converted"
    c.first_stage.workdir = first_stage_workdir
    c.first_stage.weights = "ema"
    c.latent_scale = float(pipe.first_stage["scaling_factor"])
    for k in ("vocab_size", "width", "layers", "heads", "max_length", "activation", "output_layer", "pad_token"):
        c.text_encoder[k] = pipe.text[k]
    c.text_encoder.trainable = True
    for k in UNET_FIELDS:
        if k not in ("in_channels", "out_channels", "context_dim"):  # the task derives these from its components
            c.unet[k] = pipe.unet[k]
    c.diffusion.update(pipe.scheduler["diffusion"])
    c.sample.update(pipe.scheduler["sample"])
    c.sample.guidance_scale = 7.5
    f = 2 ** (len(pipe.first_stage["block_out_channels"]) - 1)
    c.data.image_size = pipe.unet["sample_size"] * f
    c.data.source = ""  # a converted model has no training data of its own: set one to fine-tune it
    return c


def check_compatible(pipe: Pipeline) -> None:
    z = latent_channels(pipe.first_stage)
    if pipe.unet["in_channels"] not in (z, 2 * z + 1) or pipe.unet["out_channels"] != z:
        raise ValueError(
            f"unet in_channels={pipe.unet['in_channels']}, out_channels={pipe.unet['out_channels']}: ldm_jax imports "
            f"text-to-image UNets (in_channels = the first stage's {z} latent channels) and inpainting UNets "
            f"(in_channels = {2 * z + 1}: latents, mask, masked-image latents); out_channels must be {z}"
        )
    if pipe.unet["context_dim"] != pipe.text["width"]:
        raise ValueError(
            f"unet cross_attention_dim={pipe.unet['context_dim']} != text encoder hidden_size={pipe.text['width']}"
        )


def write_workdirs(pipe: Pipeline, out: str, source: str, overwrite: bool = False) -> dict:
    """Writes ``out`` (txt2img or inpainting) and ``out/first_stage`` whole: a reader never finds a part of them
    that looks like a workdir."""
    check_compatible(pipe)
    storage.check(out, "--out")
    out = storage.absolute(out)
    if storage.listdir(out) and not overwrite:
        raise FileExistsError(f"--out={out}: exists and is not empty; choose a new folder or pass --overwrite")
    # Written beside ``out``, then moved there. Locally the move is one atomic rename. A bucket has none: the files
    # are copied with the two config.json files last, so that a crash mid-copy leaves a folder no reader takes for a
    # workdir (and a rerun needs --overwrite). The checkpoints are written in the bucket, not uploaded: Orbax takes a
    # checkpoint there as finished only with the commit marker its own save writes.
    tmp = f"{out}.tmp-{os.getpid()}"
    storage.rmtree(tmp)
    record = _write_converted(pipe, tmp, out, source)
    storage.replace_folder(tmp, out, last=("first_stage/config.json", "config.json"))
    return record


def _write_converted(pipe: Pipeline, tmp: str, out: str, source: str) -> dict:
    """The workdirs of ``write_workdirs`` in ``tmp``, their configs naming the place they will have, ``out``."""
    f = 2 ** (len(pipe.first_stage["block_out_channels"]) - 1)
    image_size = pipe.unet["sample_size"] * f
    fs_cfg = first_stage_config(pipe.first_stage, image_size)
    config_lib.save_config(fs_cfg, storage.join(tmp, "first_stage", "config.json"))
    scale = float(pipe.first_stage["scaling_factor"])
    _save_weights(storage.join(tmp, "first_stage"), pipe.params["first_stage"], {"source": source})
    cfg = workdir_config(pipe, storage.join(out, "first_stage"))
    config_lib.save_config(cfg, storage.join(tmp, "config.json"))
    _save_weights(
        tmp, {"unet": pipe.params["unet"], "text": pipe.params["text"]}, {"latent_scale": scale, "source": source}
    )
    record = {
        "source": source,
        "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "tensors": {k: len(jax.tree.leaves(v)) for k, v in pipe.params.items()},
        "parameters": {k: int(sum(np.size(x) for x in jax.tree.leaves(v))) for k, v in pipe.params.items()},
        "ignored_source_keys": sorted(pipe.ignored),
    }
    wfiles.write_json(storage.join(tmp, "conversion.json"), record)
    return record


# ---- export ---------------------------------------------------------------------------------------------------
def merged_lora_params(cfg, adapters, meta: dict, lora_cfg) -> dict:
    """A LoRA run's model weights ({"unet", "text"}): its adapters merged into the base named by its checkpoint."""
    from ldm_jax.training.checkpoint import load_trained_params

    pointer = meta.get("lora_base") or {"workdir": cfg.init_from, "step": None}
    base, _, base_step = load_trained_params(pointer["workdir"], "ema")
    if pointer["step"] is not None and int(pointer["step"]) != base_step:
        raise ValueError(
            f"{pointer['workdir']}: its latest checkpoint is step {base_step}, but the adapters were trained on step "
            f"{pointer['step']}"
        )
    base = {k: v for k, v in jax.device_get(base).items() if k in ("unet", "text")}
    return jax.device_get(lora.merge(base, adapters, lora_cfg.scale))


def _check_diffusers_unet(cfg, workdir: str) -> None:
    """Refuses, before anything is written, a run whose UNet diffusers' UNet2DConditionModel cannot express."""
    if cfg.unet.position_embedding != "none":
        raise ValueError(
            f"--workdir={workdir}: unet.position_embedding={cfg.unet.position_embedding!r}; diffusers' "
            "UNet2DConditionModel has no position embedding, so it would compute another function: only runs with "
            "'none' export"
        )


def export_lora(workdir: str, out: str, weights: str = "ema", overwrite: bool = False) -> dict:
    """A LoRA run's adapters -> one .safetensors in the diffusers/PEFT layout that
    ``StableDiffusionPipeline.load_lora_weights`` reads (the run's alpha / rank folded into lora_B)."""
    from ldm_jax.training.checkpoint import load_trained_params

    cfg = config_lib.load_config(storage.join(workdir, "config.json"))
    lora_cfg = lora.from_run_config(cfg)
    if not lora_cfg.enabled:
        raise ValueError(f"--workdir={workdir}: not a LoRA run (lora.rank=0); export it whole without --lora_only")
    if not out.endswith(".safetensors"):
        raise ValueError(f"--out={out}: --lora_only writes one file; name it *.safetensors")
    _check_diffusers_unet(cfg, workdir)  # adapters for a UNet diffusers cannot build are of no use to it
    storage.check(out, "--out")
    if storage.exists(out) and not overwrite:
        raise FileExistsError(f"--out={out}: exists; choose another name or pass --overwrite")
    adapters, meta, step = load_trained_params(workdir, weights)
    state_dict = lora.adapter_state_dict(jax.device_get(adapters), lora_cfg.scale)
    base = (meta.get("lora_base") or {}).get("workdir", cfg.init_from)
    metadata = {
        "format": "pt",
        "ldm_jax_base": str(base),
        "ldm_jax_step": str(step),
        "ldm_jax_rank": str(lora_cfg.rank),
    }
    wfiles.write_safetensors(out, state_dict, metadata=metadata)
    return {
        "workdir": workdir,
        "step": step,
        "weights": weights,
        "out": storage.absolute(out),
        "rank": lora_cfg.rank,
        "modules": len(state_dict) // 2,
        "parameters": int(sum(v.size for v in state_dict.values())),
    }


def export_workdir(workdir: str, out: str, weights: str = "ema", overwrite: bool = False) -> dict:
    """A txt2img or inpainting workdir (and its first stage) -> a diffusers StableDiffusionPipeline or
    StableDiffusionInpaintPipeline folder."""
    from ldm_jax.training.checkpoint import load_trained_params

    cfg = config_lib.load_config(storage.join(workdir, "config.json"))
    if cfg.task not in EXPORTABLE_TASKS:
        raise ValueError(f"--workdir={workdir}: holds a {cfg.task!r} run; export needs a txt2img or inpainting run")
    fs_cfg = config_lib.load_config(storage.join(cfg.first_stage.workdir, "config.json"))
    fs_fields = fs_cfg.model.to_dict()
    # The exported pipeline's scheduler is the run's sampler, with every setting spelled out.
    sample = SamplerOptions.from_config(cfg.sample, cfg.diffusion.prediction_type).to_config()
    if fs_fields["kind"] != "kl":
        raise ValueError("StableDiffusionPipeline needs a KL first stage (AutoencoderKL); this run's is VQ")
    _check_diffusers_unet(cfg, workdir)
    storage.check(out, "--out")
    out = storage.absolute(out)
    if storage.listdir(out) and not overwrite:
        raise FileExistsError(f"--out={out}: exists and is not empty; choose a new folder or pass --overwrite")
    params, meta, step = load_trained_params(workdir, weights)
    fs_params, _, _ = load_trained_params(cfg.first_stage.workdir, cfg.first_stage.weights)
    lora_cfg = lora.from_run_config(cfg)
    if lora_cfg.enabled:  # a LoRA run: its adapters merged into the base they were trained on
        params = merged_lora_params(cfg, params, meta, lora_cfg)
    if "text" not in params:
        if not cfg.init_from:
            raise ValueError(f"{workdir}: the checkpoint has no text encoder and config.init_from is empty")
        params = dict(params, text=load_trained_params(cfg.init_from, "ema")[0]["text"])
    params, fs_params = jax.device_get((params, fs_params))
    scale = float(meta.get("latent_scale", cfg.latent_scale))
    f = 2 ** (len(fs_fields["block_out_channels"]) - 1)
    latent = fs_fields["latent_channels"]
    inpaint = cfg.task == "inpainting"
    in_channels = 2 * latent + 1 if inpaint else latent  # inpainting: latents, mask, masked-image latents
    te = cfg.text_encoder.to_dict()
    text_params = params["text"]
    if te["output_layer"] != -1:
        # Layers after the one whose output is used never run; a CLIPTextModel without them computes our output.
        keep = te["layers"] + 1 + te["output_layer"]
        text_params = {k: v for k, v in text_params.items() if not (k.startswith("layers_") and int(k[7:]) >= keep)}
    tokenizer = CLIPTokenizer(te["max_length"], te["pad_token"])
    # Written into a local folder first (renamed into place when complete; uploaded to a bucket file by file,
    # model_index.json last, which diffusers reads first).
    tmp = tempfile.mkdtemp(prefix="ldm_jax_export-") if storage.is_url(out) else f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    j = lambda *p: os.path.join(tmp, *p)  # noqa: E731
    wfiles.write_json(
        j("unet", "config.json"),
        diffusers_config.unet_to_diffusers(
            cfg.unet.to_dict(), in_channels, latent, te["width"], cfg.data.image_size // f
        ),
    )
    wfiles.write_safetensors(
        j("unet", "diffusion_pytorch_model.safetensors"), params_to_state_dict("unet", params["unet"])
    )
    wfiles.write_json(j("vae", "config.json"), diffusers_config.vae_to_diffusers(fs_fields, scale, cfg.data.image_size))
    wfiles.write_safetensors(j("vae", "diffusion_pytorch_model.safetensors"), params_to_state_dict("vae", fs_params))
    wfiles.write_json(j("text_encoder", "config.json"), diffusers_config.clip_to_transformers(te, tokenizer.pad_id))
    wfiles.write_safetensors(
        j("text_encoder", "model.safetensors"), params_to_state_dict("clip", text_params), metadata={"format": "pt"}
    )
    tokenizer.save_hf_files(j("tokenizer"))
    wfiles.write_json(
        j("scheduler", "scheduler_config.json"),
        diffusers_config.scheduler_to_diffusers(cfg.diffusion.to_dict(), sample),
    )
    wfiles.write_json(
        j("model_index.json"),
        {
            "_class_name": "StableDiffusionInpaintPipeline" if inpaint else "StableDiffusionPipeline",
            "_diffusers_version": diffusers_config.DIFFUSERS_VERSION,
            "feature_extractor": [None, None],
            "image_encoder": [None, None],
            "requires_safety_checker": False,
            "safety_checker": [None, None],
            "scheduler": ["diffusers", diffusers_config.SCHEDULER_CLASSES[sample["sampler"]]],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        },
    )
    if storage.is_url(out):
        storage.rmtree(out)
        storage.upload_tree(tmp, out, last=("model_index.json",))
        shutil.rmtree(tmp)
    else:
        storage.replace_folder(tmp, out)
    return {"workdir": workdir, "step": step, "weights": weights, "out": out, "latent_scale": scale}

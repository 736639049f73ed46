"""diffusers / transformers ``config.json`` <-> ldm_jax model fields.

Import validates every architectural option we do not implement and fails naming it, rather than building a model
that silently computes something else. Export writes configs that the PyTorch classes load as they are.
"""

from __future__ import annotations

import logging
from typing import Any

DIFFUSERS_VERSION = "0.42.1"

# Options of UNet2DConditionModel that change the computation, with the values ldm_jax implements
# (None in a config.json means the library default, which is listed first).
_UNET_FIXED = {
    "act_fn": ("silu",),
    "center_input_sample": (False,),
    "downsample_padding": (1,),
    "flip_sin_to_cos": (True,),
    "freq_shift": (0,),
    "mid_block_scale_factor": (1, 1.0),
    "norm_eps": (1e-5,),
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "class_embed_type": (None,),
    "addition_embed_type": (None, "text"),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "time_embedding_type": ("positional",),
    "dual_cross_attention": (False,),
    "only_cross_attention": (False,),
    "resnet_time_scale_shift": ("default",),
    "num_class_embeds": (None,),
    "time_cond_proj_dim": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "projection_class_embeddings_input_dim": (None,),
    "timestep_post_act": (None,),
    "attention_type": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1, 1.0),
    "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,),
    "cross_attention_norm": (None,),
    "addition_time_embed_dim": (None,),
    "class_embeddings_concat": (False,),
    "reverse_transformer_layers_per_block": (None,),
}
_VAE_FIXED = {
    "act_fn": ("silu",),
    "in_channels": (3,),
    "out_channels": (3,),
    "shift_factor": (None,),
    "latents_mean": (None,),
    "latents_std": (None,),
    "use_quant_conv": (True,),
    "use_post_quant_conv": (True,),
    "norm_type": ("group",),
    "lookup_from_codebook": (False,),
}
_CLIP_FIXED = {"layer_norm_eps": (1e-5,), "hidden_act": ("quick_gelu", "gelu")}


def _check_fixed(cfg: dict, fixed: dict, what: str) -> None:
    for field, allowed in fixed.items():
        if field not in cfg or cfg[field] is None:
            continue
        value = cfg[field]
        if isinstance(value, list) and field == "only_cross_attention":
            value = any(value)
        if value not in allowed:
            raise ValueError(f"{what}: {field}={cfg[field]!r} is not supported; ldm_jax implements {allowed}")


def _per_level(value, n: int, field: str, what: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{what}: {field}={value!r} must have one entry per level ({n})")
        return list(value)
    return [value] * n


def unet_from_diffusers(cfg: dict, what: str = "unet/config.json") -> dict[str, Any]:
    """UNet2DConditionModel config -> ldm_jax ``UNet`` fields (``in_channels``, ``context_dim`` included)."""
    _check_fixed(cfg, _UNET_FIXED, what)
    chans = list(cfg.get("block_out_channels", (320, 640, 1280, 1280)))
    n = len(chans)
    down = list(cfg.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]))
    up = list(cfg.get("up_block_types", ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3))
    allowed_down = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
    allowed_up = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
    for field, types, allowed in (("down_block_types", down, allowed_down), ("up_block_types", up, allowed_up)):
        bad = [t for t in types if t not in allowed]
        if bad or len(types) != n:
            raise ValueError(f"{what}: {field}={types!r}: need {n} entries from {sorted(allowed)}")
    attention = [allowed_down[t] for t in down]
    if [allowed_up[t] for t in up] != attention[::-1]:
        raise ValueError(f"{what}: up_block_types={up!r} must mirror down_block_types={down!r}")
    layers = cfg.get("layers_per_block", 2)
    if not isinstance(layers, int):
        if len(set(layers)) != 1:
            raise ValueError(f"{what}: layers_per_block={layers!r}: only one value for every level is supported")
        layers = layers[0]
    depth = cfg.get("transformer_layers_per_block", 1)
    if not isinstance(depth, int):
        if len(set(depth)) != 1:
            raise ValueError(f"{what}: transformer_layers_per_block={depth!r}: one value for every level only")
        depth = depth[0]
    # diffusers' historical naming: SD configs give the head COUNT as attention_head_dim.
    heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
    heads = _per_level(heads, n, "attention_head_dim", what)
    for c, h in zip(chans, heads, strict=True):
        if c % h:
            raise ValueError(f"{what}: block_out_channels {c} is not divisible by {h} heads")
    in_ch, out_ch = cfg.get("in_channels", 4), cfg.get("out_channels", 4)
    cross = cfg.get("cross_attention_dim", 1280)
    if isinstance(cross, (list, tuple)):
        if len(set(cross)) != 1:
            raise ValueError(f"{what}: cross_attention_dim={cross!r}: one width for every block only")
        cross = cross[0]
    return dict(
        in_channels=in_ch,
        out_channels=out_ch,
        block_out_channels=tuple(chans),
        layers_per_block=int(layers),
        attention_levels=tuple(attention),
        num_heads=tuple(int(h) for h in heads),
        head_dim=0,
        transformer_depth=int(depth),
        context_dim=int(cross),
        norm_groups=int(cfg.get("norm_num_groups", 32)),
        use_linear_projection=bool(cfg.get("use_linear_projection", False)),
        addition_embed_type=cfg.get("addition_embed_type") or "none",
        addition_embed_type_num_heads=int(cfg.get("addition_embed_type_num_heads") or 64),
        sample_size=int(cfg.get("sample_size") or 64),
    )


def unet_to_diffusers(unet: dict, in_channels: int, out_channels: int, context_dim: int, sample_size: int) -> dict:
    """ldm_jax UNet fields -> a UNet2DConditionModel config."""
    chans = list(unet["block_out_channels"])
    if unet.get("head_dim", 0) > 0:
        heads = [c // unet["head_dim"] for c in chans]
    else:
        heads = list(unet["num_heads"])
    attn = list(unet["attention_levels"])
    return {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu",
        "attention_head_dim": heads,
        "block_out_channels": chans,
        "center_input_sample": False,
        "cross_attention_dim": int(context_dim),
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "downsample_padding": 1,
        "dual_cross_attention": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": int(in_channels),
        "layers_per_block": int(unet["layers_per_block"]),
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-5,
        "norm_num_groups": int(unet["norm_groups"]),
        "out_channels": int(out_channels),
        "sample_size": int(sample_size),
        "transformer_layers_per_block": int(unet["transformer_depth"]),
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "use_linear_projection": bool(unet["use_linear_projection"]),
        "upcast_attention": False,
        "addition_embed_type": None if unet.get("addition_embed_type", "none") == "none" else "text",
        "addition_embed_type_num_heads": int(unet.get("addition_embed_type_num_heads", 64)),
    }


def vae_from_diffusers(cfg: dict, what: str = "vae/config.json") -> dict[str, Any]:
    """AutoencoderKL / VQModel config -> ldm_jax autoencoder ``model`` fields (``kind`` is "kl" or "vq")."""
    cls = cfg.get("_class_name", "AutoencoderKL")
    if cls not in ("AutoencoderKL", "VQModel"):
        raise ValueError(f"{what}: _class_name={cls!r}; ldm_jax converts AutoencoderKL and VQModel")
    _check_fixed(cfg, _VAE_FIXED, what)
    chans = list(cfg.get("block_out_channels", (64,)))
    n = len(chans)
    for field, name in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = list(cfg.get(field, [name] * n))
        if types != [name] * n:
            raise ValueError(f"{what}: {field}={types!r}: need {n} x {name!r}")
    out = dict(
        kind="kl" if cls == "AutoencoderKL" else "vq",
        block_out_channels=tuple(chans),
        layers_per_block=int(cfg.get("layers_per_block", 1)),
        latent_channels=int(cfg.get("latent_channels", 4 if cls == "AutoencoderKL" else 3)),
        norm_groups=int(cfg.get("norm_num_groups", 32)),
        mid_attention=bool(cfg.get("mid_block_add_attention", True)),
        remat_policy="none",
        scaling_factor=float(cfg.get("scaling_factor", 0.18215)),
        sample_size=int(cfg.get("sample_size") or 32),
    )
    if cls == "VQModel":
        out["embed_dim"] = int(cfg.get("vq_embed_dim") or out["latent_channels"])
        out["num_codes"] = int(cfg.get("num_vq_embeddings", 256))
        out["l2_codes"] = False
    else:
        out["init_logvar"] = 0.0
    return out


def vae_to_diffusers(model: dict, scaling_factor: float, sample_size: int) -> dict:
    n = len(model["block_out_channels"])
    kind = model["kind"]
    out = {
        "_class_name": "AutoencoderKL" if kind == "kl" else "VQModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu",
        "block_out_channels": list(model["block_out_channels"]),
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "in_channels": 3,
        "latent_channels": int(model["latent_channels"]),
        "layers_per_block": int(model["layers_per_block"]),
        "mid_block_add_attention": bool(model["mid_attention"]),
        "norm_num_groups": int(model["norm_groups"]),
        "out_channels": 3,
        "sample_size": int(sample_size),
        "scaling_factor": float(scaling_factor),
        "up_block_types": ["UpDecoderBlock2D"] * n,
    }
    if kind == "vq":
        out.update(num_vq_embeddings=int(model["num_codes"]), vq_embed_dim=int(model["embed_dim"]), norm_type="group")
    else:
        out.update(force_upcast=True, use_quant_conv=True, use_post_quant_conv=True)
    return out


def clip_from_transformers(cfg: dict, what: str = "text_encoder/config.json") -> dict[str, Any]:
    """CLIPTextConfig -> ldm_jax ``text_encoder`` fields."""
    _check_fixed(cfg, _CLIP_FIXED, what)
    width = int(cfg.get("hidden_size", 512))
    if int(cfg.get("intermediate_size", 4 * width)) != 4 * width:
        raise ValueError(f"{what}: intermediate_size={cfg['intermediate_size']} must be 4 x hidden_size ({4 * width})")
    return dict(
        vocab_size=int(cfg.get("vocab_size", 49408)),
        width=width,
        layers=int(cfg.get("num_hidden_layers", 12)),
        heads=int(cfg.get("num_attention_heads", 8)),
        max_length=int(cfg.get("max_position_embeddings", 77)),
        activation=cfg.get("hidden_act", "quick_gelu"),
    )


def clip_to_transformers(te: dict, pad_id: int) -> dict:
    """ldm_jax text encoder fields -> a CLIPTextConfig. A penultimate-layer encoder is written without its last
    layer (as diffusers stores SD 2.x), so that ``last_hidden_state`` is what our model returns."""
    layers = int(te["layers"]) + 1 + int(te["output_layer"]) if te["output_layer"] != -1 else int(te["layers"])
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "attention_dropout": 0.0,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": int(pad_id),
        "hidden_act": te["activation"],
        "hidden_size": int(te["width"]),
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": 4 * int(te["width"]),
        "layer_norm_eps": 1e-5,
        "max_position_embeddings": int(te["max_length"]),
        "num_attention_heads": int(te["heads"]),
        "num_hidden_layers": layers,
        "projection_dim": int(te["width"]),
        "vocab_size": int(te["vocab_size"]),
        "torch_dtype": "float32",
    }


_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")

# Our sampler name <-> diffusers scheduler class, and the option fields each class carries (same names on both sides
# except where mapped below).
SCHEDULER_CLASSES = {
    "ddpm": "DDPMScheduler",
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_ancestral": "EulerAncestralDiscreteScheduler",
}
_SCHEDULER_FIELDS = {
    "ddpm": ("clip_sample", "clip_sample_range", "variance_type"),
    "ddim": ("clip_sample", "clip_sample_range", "set_alpha_to_one"),
    "pndm": ("skip_prk_steps", "set_alpha_to_one"),
    "dpmpp_2m": (
        "solver_order",
        "solver_type",
        "lower_order_final",
        "euler_at_final",
        "karras_sigmas",
        "final_sigmas_type",
    ),
    "euler": ("karras_sigmas", "final_sigmas_type"),
    "euler_ancestral": (),
}
_RENAMED = {"karras_sigmas": "use_karras_sigmas", "spacing": "timestep_spacing"}
# diffusers' own defaults for the fields above, per class: a config that omits a field means this value.
_CLASS_DEFAULTS = {
    "ddpm": dict(clip_sample=True, clip_sample_range=1.0, variance_type="fixed_small", spacing="leading"),
    "ddim": dict(clip_sample=True, clip_sample_range=1.0, set_alpha_to_one=True, spacing="leading"),
    "pndm": dict(skip_prk_steps=False, set_alpha_to_one=False, spacing="leading"),
    "dpmpp_2m": dict(
        solver_order=2,
        solver_type="midpoint",
        lower_order_final=True,
        euler_at_final=False,
        karras_sigmas=False,
        final_sigmas_type="zero",
        spacing="linspace",
    ),
    "euler": dict(karras_sigmas=False, final_sigmas_type="zero", spacing="linspace"),
    "euler_ancestral": dict(spacing="linspace"),
}


def scheduler_from_diffusers(cfg: dict, what: str = "scheduler/scheduler_config.json") -> dict[str, Any]:
    """Training-schedule fields (``diffusion``) and sampler fields (``sample``) of a diffusers scheduler config.

    The sampler defaults to the scheduler class the folder names, with its settings, when we implement it (else
    DDIM with the same spacing).
    """
    schedule = cfg.get("beta_schedule", "linear")
    if schedule not in _BETA_SCHEDULES:
        raise ValueError(f"{what}: beta_schedule={schedule!r}; supported: {_BETA_SCHEDULES}")
    if cfg.get("trained_betas"):
        raise ValueError(f"{what}: trained_betas is not supported; ldm_jax builds betas from beta_schedule")
    prediction = cfg.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(f"{what}: prediction_type={prediction!r}; supported: epsilon, v_prediction, sample")
    diffusion = dict(
        beta_schedule=schedule,
        num_train_timesteps=int(cfg.get("num_train_timesteps", 1000)),
        beta_start=float(cfg.get("beta_start", 0.0001)),
        beta_end=float(cfg.get("beta_end", 0.02)),
        prediction_type=prediction,
        rescale_betas_zero_snr=bool(cfg.get("rescale_betas_zero_snr", False)),
    )
    by_class = {v: k for k, v in SCHEDULER_CLASSES.items()}
    name = by_class.get(cfg.get("_class_name", ""), "ddim")
    if name == "dpmpp_2m" and (
        cfg.get("algorithm_type", "dpmsolver++") != "dpmsolver++" or cfg.get("solver_order", 2) not in (1, 2)
    ):
        name = "ddim"  # SDE / third-order variants are not implemented; DDIM is the safe default
    defaults = _CLASS_DEFAULTS[name]
    sample = dict(sampler=name, steps_offset=int(cfg.get("steps_offset", 0)))
    for field in ("spacing",) + _SCHEDULER_FIELDS[name]:
        value = cfg.get(_RENAMED.get(field, field))
        sample[field] = defaults[field] if value is None else value
    if sample["spacing"] not in ("leading", "trailing", "linspace"):
        raise ValueError(f"{what}: timestep_spacing={sample['spacing']!r}; supported: leading, trailing, linspace")
    ignored = unsupported_scheduler_options(cfg)
    if ignored:
        logging.getLogger(__name__).warning(
            "%s: options ldm_jax does not implement, so its %s samples differently from diffusers: %s",
            what, name, ", ".join(f"{k}={v!r}" for k, v in ignored.items()),
        )  # fmt: skip
    return dict(diffusion=diffusion, sample=sample)


# Scheduler options with a value that changes sampling, which ldm_jax does not implement: key -> its no-op values.
_UNSUPPORTED_SCHEDULER_OPTIONS = {
    "thresholding": (False, None),
    "lambda_min_clipped": (float("-inf"), None),
    "use_lu_lambdas": (False, None),
    "use_exponential_sigmas": (False, None),
    "use_beta_sigmas": (False, None),
    "timestep_type": ("discrete", None),
    "interpolation_type": ("linear", None),
}


def unsupported_scheduler_options(cfg: dict) -> dict:
    """The options of a diffusers scheduler config set to a value ldm_jax's samplers do not reproduce."""
    return {k: cfg[k] for k, off in _UNSUPPORTED_SCHEDULER_OPTIONS.items() if k in cfg and cfg[k] not in off}


def scheduler_to_diffusers(diffusion: dict, sample: dict) -> dict:
    """The diffusers scheduler config equivalent to our training schedule and sampler settings.

    ``sample`` holds ``sampler`` and the SamplerOptions fields (a ``config.sample`` block); every field the
    scheduler class reads is written, so diffusers' class defaults never leak in.
    """
    name = sample["sampler"]
    if name == "pndm" and diffusion.get("rescale_betas_zero_snr", False):
        # diffusers' PNDMScheduler takes no rescale_betas_zero_snr (it would ignore the key and sample the
        # unrescaled schedule, not the one the model was trained on); its DDIMScheduler does.
        logging.getLogger(__name__).warning(  # absl's handler prints it; no absl needed to import this module
            "sample.sampler='pndm' with diffusion.rescale_betas_zero_snr=True: written as DDIMScheduler, since "
            "diffusers' PNDMScheduler has no zero-terminal-SNR rescale"
        )
        name = "ddim"
    cfg = {
        "_class_name": SCHEDULER_CLASSES[name],
        "_diffusers_version": DIFFUSERS_VERSION,
        "beta_schedule": diffusion["beta_schedule"],
        "beta_start": float(diffusion["beta_start"]),
        "beta_end": float(diffusion["beta_end"]),
        "num_train_timesteps": int(diffusion["num_train_timesteps"]),
        "prediction_type": diffusion["prediction_type"],
        "rescale_betas_zero_snr": bool(diffusion.get("rescale_betas_zero_snr", False)),
        "timestep_spacing": sample["spacing"],
        "steps_offset": int(sample["steps_offset"]),
        "trained_betas": None,
    }
    if name == "dpmpp_2m":
        cfg["algorithm_type"] = "dpmsolver++"
    for field in _SCHEDULER_FIELDS[name]:
        cfg[_RENAMED.get(field, field)] = sample[field]
    return cfg

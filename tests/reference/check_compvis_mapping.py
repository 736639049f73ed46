"""Checks ldm_jax.interop.compvis against diffusers' own CompVis -> diffusers single-file converters.

  PYTHONPATH=<repo> <reference python> tests/reference/check_compvis_mapping.py

Runs in the reference environment (torch + diffusers + transformers, tests/reference/requirements.txt). For small
seeded random-weight models (SD-1 and SD-2 style UNets, AutoencoderKL, VQModel, CLIP and OpenCLIP-style text
encoders) it takes the diffusers / transformers state dict, maps it to the CompVis layout with
``compvis.*_from_diffusers`` and checks that

  (a) ``compvis.*_to_diffusers`` maps it back exactly (keys, shapes, dtypes, values);
  (b) diffusers' reference converter (``diffusers.loaders.single_file_utils.convert_ldm_*``), fed the CompVis
      dict with its single-file prefix, gives exactly the original state dict.

It also checks ``split_single_file``, the strictness of every converter, that conversion copies no arrays (except
the OpenCLIP q/k/v concatenation) and that the module imports no torch / jax. Prints one line per check; exits 1
on any mismatch.
"""

from __future__ import annotations

import sys
import time

T0 = time.time()

import numpy as np

from ldm_jax.interop import compvis

HEAVY = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "jax", "jaxlib", "flax"))

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel, VQModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from transformers import CLIPTextConfig, CLIPTextModel
from transformers.utils import logging as hf_logging

hf_logging.set_verbosity_error()
torch.set_grad_enabled(False)

FAILURES: list[str] = []


# ------------------------------------------------------------------------------------------------------- helpers


def random_init(model, seed):
    """Every parameter distinct and random, so that any swapped or misplaced tensor shows up."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.copy_(torch.randn(p.shape, generator=g))
    return model.eval()


def numpy_sd(model) -> dict:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def prefixed_clip(sd: dict) -> dict:
    """transformers >= 5.6 saves CLIPTextModel flattened; the text_encoder/ layout has ``text_model.``."""
    return {(k if k.startswith("text_model.") else f"text_model.{k}"): v for k, v in sd.items()}


def torch_sd(sd: dict, prefix: str = "") -> dict:
    return {prefix + k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}


def as_numpy(v):
    return v.detach().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)


def diff(name: str, want: dict, got: dict) -> float:
    """Exact comparison: same key set, shapes, dtypes and values. Returns the max abs difference."""
    problems = []
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {missing[:5]})")
    if extra:
        problems.append(f"{len(extra)} unexpected (e.g. {extra[:5]})")
    worst = 0.0
    for k in sorted(set(want) & set(got)):
        a, b = as_numpy(want[k]), as_numpy(got[k])
        if a.shape != b.shape or a.dtype != b.dtype:
            problems.append(f"{k}: {a.shape} {a.dtype} vs {b.shape} {b.dtype}")
            continue
        d = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0
        worst = max(worst, d)
        if not np.array_equal(a, b):
            problems.append(f"{k}: max abs diff {d:g}")
    if problems:
        FAILURES.append(f"{name}: " + "; ".join(problems[:8]))
        return float("inf") if (missing or extra) else worst
    return worst


def copies(out: dict, inputs: dict) -> int:
    """How many output arrays share no memory with any input array."""
    bases = {id(v) for v in inputs.values()}

    def root(a):
        while isinstance(a, np.ndarray) and a.base is not None:
            a = a.base
        return a

    roots = {id(root(v)) for v in inputs.values()} | bases
    return sum(1 for v in out.values() if id(v) not in bases and id(root(v)) not in roots)


def expect_error(name: str, fn, *args, **kwargs) -> None:
    try:
        fn(*args, **kwargs)
    except ValueError:
        return
    FAILURES.append(f"{name}: no ValueError")


def report(name: str, d_sd: dict, c_sd: dict, rt: float, ref: float, n_copies: int, note: str = "") -> None:
    ok = "OK" if not any(f.startswith(name) for f in FAILURES) else "FAIL"
    print(
        f"{name:<18} diffusers keys={len(d_sd):4d} compvis keys={len(c_sd):4d} "
        f"round-trip max|diff|={rt:g} reference max|diff|={ref:g} copies={n_copies} {ok}{note}"
    )


# ------------------------------------------------------------------------------------------------------- models

UNET_SD1 = dict(  # SD 1.x topology (4 levels, 2 layers: input/output_blocks 0..11), tiny widths
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 32, 64, 64),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=2,
    norm_num_groups=8,
)
UNET_SD2 = dict(  # SD 2.x style: linear proj_in/out, per-block head dims, 3 levels, 2 transformer layers
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=48,
    attention_head_dim=(2, 4, 8),
    use_linear_projection=True,
    transformer_layers_per_block=2,
    upcast_attention=True,
    norm_num_groups=8,
)
VAE_KL = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(32, 64, 64),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=32,
)
VAE_VQ = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(32, 64),
    layers_per_block=1,
    latent_channels=3,
    num_vq_embeddings=16,
    vq_embed_dim=3,
    norm_num_groups=8,
    sample_size=16,
)
CLIP = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=16,
    hidden_act="quick_gelu",
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)
# SD-2's OpenCLIP tower has 24 resblocks, diffusers keeps 23 (penultimate layer); 23 tiny layers keep the
# reference converter's hard-coded ``resblocks.23`` exclusion meaningful.
OPEN_CLIP = dict(CLIP, hidden_act="gelu", num_hidden_layers=23, hidden_size=32, num_attention_heads=2)
OPEN_CLIP_SHALLOW = dict(OPEN_CLIP, num_hidden_layers=2)


def diffusers_config(model) -> dict:
    cfg = dict(model.config)
    cfg["_class_name"] = type(model).__name__
    return cfg


# ------------------------------------------------------------------------------------------------------- checks


# The block structure of the real SD-1.x UNet (ldm openaimodel, num_res_blocks=2, attention at levels 0-2),
# written out: diffusers' converter accepts an upsampler at output_blocks.N.1.conv and .N.2.conv alike, so it
# cannot catch a wrong position there.
SD1_BLOCKS = (
    {"input_blocks.0.0", "middle_block.0", "middle_block.1", "middle_block.2"}
    | {f"input_blocks.{i}.{s}" for i in (1, 2, 4, 5, 7, 8) for s in (0, 1)}
    | {"input_blocks.3.0.op", "input_blocks.6.0.op", "input_blocks.9.0.op", "input_blocks.10.0", "input_blocks.11.0"}
    | {f"output_blocks.{i}.0" for i in range(12)}
    | {f"output_blocks.{i}.1" for i in range(3, 12)}
    | {"output_blocks.2.1.conv", "output_blocks.5.2.conv", "output_blocks.8.2.conv"}
)


def block_signature(key: str) -> str | None:
    parts = key.split(".")
    if parts[0] == "middle_block":
        return ".".join(parts[:2])
    if parts[0] in ("input_blocks", "output_blocks"):
        return ".".join(parts[:3] + (parts[3:4] if parts[3] in ("op", "conv") else []))
    return None


def check_unet(name, config, seed):
    model = random_init(UNet2DConditionModel(**config), seed)
    cfg = diffusers_config(model)
    d = numpy_sd(model)
    c = compvis.unet_from_diffusers(d, cfg)
    back = compvis.unet_to_diffusers(c, cfg)
    rt = diff(f"{name} round-trip", d, back)
    ref = diff(f"{name} reference", d, convert_ldm_unet_checkpoint(torch_sd(c, "model.diffusion_model."), cfg))
    # the converter also accepts the prefixed keys
    diff(f"{name} prefixed", d, compvis.unet_to_diffusers({f"model.diffusion_model.{k}": v for k, v in c.items()}, cfg))
    expect_error(
        f"{name} strict from",
        compvis.unet_from_diffusers,
        {**d, "down_blocks.0.resnets.0.foo.weight": d["conv_in.bias"]},
        cfg,
    )
    expect_error(
        f"{name} strict from",
        compvis.unet_from_diffusers,
        {**d, "up_blocks.9.resnets.0.conv1.weight": d["conv_in.bias"]},
        cfg,
    )
    expect_error(
        f"{name} strict to", compvis.unet_to_diffusers, {**c, "input_blocks.1.0.foo.weight": c["out.2.bias"]}, cfg
    )
    expect_error(f"{name} strict to", compvis.unet_to_diffusers, {**c, "label_emb.0.0.weight": c["out.2.bias"]}, cfg)
    note = ""
    if config is UNET_SD1:
        blocks = {b for k in c if (b := block_signature(k))}
        if blocks != SD1_BLOCKS:
            FAILURES.append(f"{name} layout: not SD-1's blocks: {sorted(blocks ^ SD1_BLOCKS)[:8]}")
        note = " (block layout = real SD-1.x)"
    report(name, d, c, rt, ref, copies(c, d) + copies(back, c), note)
    return c


def check_vae(name, cls, config, seed):
    model = random_init(cls(**config), seed)
    cfg = diffusers_config(model)
    d = numpy_sd(model)
    c = compvis.vae_from_diffusers(d, cfg)
    back = compvis.vae_to_diffusers(c, cfg)
    rt = diff(f"{name} round-trip", d, back)
    attn = [k for k in c if ".mid.attn_1." in k and k.endswith("weight") and not k.endswith("norm.weight")]
    if len(attn) != 8 or any(c[k].ndim != 4 for k in attn):
        FAILURES.append(f"{name}: CompVis mid attention weights are not 8 1x1 convs: {[c[k].shape for k in attn]}")
    got = convert_ldm_vae_checkpoint(torch_sd(c, "first_stage_model."), cfg)
    note = ""
    want = d
    if cls is VQModel:
        # diffusers has no CompVis VQ converter; convert_ldm_vae_checkpoint handles everything but the codebook.
        want = {k: v for k, v in d.items() if k != "quantize.embedding.weight"}
        if c.get("quantize.embedding.weight") is not d["quantize.embedding.weight"]:
            FAILURES.append(f"{name}: quantize.embedding.weight not passed through")
        note = " (reference checked without quantize.embedding.weight: it has no VQ path)"
    ref = diff(f"{name} reference", want, got)
    expect_error(
        f"{name} strict from",
        compvis.vae_from_diffusers,
        {**d, "encoder.mid_block.attentions.0.foo.weight": d["quant_conv.bias"]},
        cfg,
    )
    expect_error(
        f"{name} strict to",
        compvis.vae_to_diffusers,
        {**c, "decoder.up.0.upsample.conv.weight": c["quant_conv.bias"]},
        cfg,
    )
    expect_error(
        f"{name} strict to",
        compvis.vae_to_diffusers,
        {**c, "encoder.down.0.block.9.conv1.weight": c["quant_conv.bias"]},
        cfg,
    )
    report(name, d, c, rt, ref, copies(c, d) + copies(back, c), note)
    return c


def check_clip(name, seed):
    model = random_init(CLIPTextModel(CLIPTextConfig(**CLIP)), seed)
    raw = numpy_sd(model)  # flattened (transformers >= 5.6) or text_model.-prefixed, depending on the version
    d = prefixed_clip(raw)
    c = compvis.clip_from_diffusers(raw)
    c2 = compvis.clip_from_diffusers(d)
    diff(f"{name} both input layouts", c, c2)
    back = compvis.clip_to_diffusers(c)
    rt = diff(f"{name} round-trip", d, back)
    got = convert_ldm_clip_checkpoint(torch_sd(c, "cond_stage_model."))
    ref = diff(f"{name} reference", d, got)
    # what create_diffusers_clip_model_from_ldm then does: load (flattened if the model is) strictly
    fresh = CLIPTextModel(CLIPTextConfig(**CLIP))
    wrapped = hasattr(fresh, "text_model")
    fresh.load_state_dict({(k if wrapped else k.removeprefix("text_model.")): v for k, v in got.items()}, strict=True)
    with_ids = {**c, "transformer.text_model.embeddings.position_ids": np.arange(16)[None]}
    diff(f"{name} position_ids dropped", d, compvis.clip_to_diffusers(with_ids))
    expect_error(f"{name} strict to", compvis.clip_to_diffusers, {**c, "transformer.foo": c[next(iter(c))]})
    expect_error(f"{name} strict from", compvis.clip_from_diffusers, {**d, "text_projection.weight": d[next(iter(d))]})
    report(name, d, c, rt, ref, copies(c, raw) + copies(back, c))
    return c


def check_open_clip(name, config, seed):
    model = random_init(CLIPTextModel(CLIPTextConfig(**config)), seed)
    n = config["num_hidden_layers"]
    cfg = dict(config)
    raw = numpy_sd(model)
    d = prefixed_clip(raw)
    c = compvis.open_clip_from_diffusers(raw, cfg)  # pads a zero resblock n (SD-2 skips the last resblock)
    pad = {k for k in c if k.startswith(f"model.transformer.resblocks.{n}.")}
    if len(pad) != 12 or any(np.any(c[k]) for k in pad):
        FAILURES.append(f"{name}: expected 12 all-zero keys of a padding resblock {n}, got {len(pad)}")
    back, dropped = compvis.open_clip_to_diffusers(c, cfg)
    rt = diff(f"{name} round-trip", d, back)
    if set(dropped) != pad:
        FAILURES.append(f"{name}: dropped {sorted(dropped)[:5]}... is not the padding resblock")
    got = convert_open_clip_checkpoint(model, torch_sd(c, "cond_stage_model."), prefix="cond_stage_model.model.")
    note = ""
    if n == 23:
        ref = diff(f"{name} reference", d, got)
    else:
        # The reference drops resblocks.23 by name only: for other depths our padding layer comes out as one extra
        # encoder.layers.N, which loading into CLIPTextModel ignores (load_state_dict(strict=False) / meta loader).
        extra = {k for k in got if k.startswith(f"text_model.encoder.layers.{n}.")}
        ref = diff(f"{name} reference", d, {k: v for k, v in got.items() if k not in extra})
        fresh = CLIPTextModel(CLIPTextConfig(**config))
        flat = not hasattr(fresh, "text_model")
        res = fresh.load_state_dict(
            {(k.removeprefix("text_model.") if flat else k): v for k, v in got.items()}, strict=False
        )
        if res.missing_keys or len(res.unexpected_keys) != len(extra) or len(extra) != 16:
            FAILURES.append(
                f"{name}: reference output loads with missing={res.missing_keys[:3]} "
                f"unexpected={len(res.unexpected_keys)}"
            )
        note = f" (reference also emits the padding layer as {len(extra)} encoder.layers.{n}.* keys, ignored on load)"

    # CompVis side exactly: a 'real' file with its own last resblock, text_projection, logit_scale and a visual key.
    g = np.random.default_rng(seed)
    real = {k: (g.standard_normal(v.shape).astype(v.dtype) if k in pad else v) for k, v in c.items()}
    width = config["hidden_size"]
    real["model.text_projection"] = g.standard_normal((width, width)).astype(np.float32)
    real["model.logit_scale"] = np.array(np.log(1 / 0.07), np.float32)
    real["model.visual.proj"] = g.standard_normal((8, width)).astype(np.float32)
    conv, dropped = compvis.open_clip_to_diffusers(real, cfg)
    diff(f"{name} real-file to", d, conv)
    want_dropped = pad | {"model.text_projection", "model.logit_scale", "model.visual.proj"}
    if set(dropped) != want_dropped:
        FAILURES.append(f"{name}: dropped {sorted(dropped)} != {sorted(want_dropped)}")
    diff(f"{name} real-file exact", real, compvis.open_clip_from_diffusers(conv, cfg, dropped=dropped))
    if n == 23:
        got = convert_open_clip_checkpoint(model, torch_sd(real, "cond_stage_model."), prefix="cond_stage_model.model.")
        diff(f"{name} real-file reference", d, got)
    expect_error(
        f"{name} strict to",
        compvis.open_clip_to_diffusers,
        {**c, "model.transformer.resblocks.0.foo.weight": c["model.ln_final.bias"]},
        cfg,
    )
    expect_error(f"{name} strict to", compvis.open_clip_to_diffusers, {**c, "model.foo": c["model.ln_final.bias"]}, cfg)
    expect_error(
        f"{name} strict from",
        compvis.open_clip_from_diffusers,
        {**d, "text_model.encoder.layers.0.foo.weight": d["text_model.final_layer_norm.bias"]},
        cfg,
    )
    expect_error(f"{name} layer count", compvis.open_clip_from_diffusers, d, dict(cfg, num_hidden_layers=n + 1))
    # copies: only the q/k/v concatenations (2 per layer) and the padding layer are new arrays
    n_copies = copies(c, raw) + copies(back, c)
    if n_copies != 2 * n + len(pad):
        FAILURES.append(f"{name}: {n_copies} new arrays, expected {2 * n + len(pad)}")
    report(name, d, c, rt, ref, n_copies, note)
    return c


def check_split(unet_c, vae_c, clip_c):
    full = {f"model.diffusion_model.{k}": v for k, v in unet_c.items()}
    full.update({f"first_stage_model.{k}": v for k, v in vae_c.items()})
    full.update({f"cond_stage_model.{k}": v for k, v in clip_c.items()})
    junk = [
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "logvar",
        "model_ema.decay",
        "model_ema.num_updates",
        "model_ema.diffusion_modelinput_blocks00weight",
        "cond_stage_model.transformer.text_model.embeddings.position_ids",
        "first_stage_model.loss.logvar",
        "first_stage_model.loss.discriminator.main.0.weight",
    ]
    full.update({k: np.zeros(3, np.float32) for k in junk})
    parts, ignored = compvis.split_single_file(full)
    ok = (
        sorted(parts) == ["text", "unet", "vae"]
        and ignored == sorted(junk)
        and all(parts["unet"][k] is v for k, v in unet_c.items())
        and all(parts["vae"][k] is v for k, v in vae_c.items())
        and parts["text"].keys() == clip_c.keys()
    )
    if not ok:
        FAILURES.append(f"split_single_file: wrong split (ignored={ignored})")
    expect_error(
        "split_single_file unknown", compvis.split_single_file, {**full, "conditioner.embedders.0.x": np.zeros(1)}
    )
    state = "OK" if not any(f.startswith("split_single_file") for f in FAILURES) else "FAIL"
    print(
        f"{'split_single_file':<18} keys={len(full)} unet={len(parts['unet'])} vae={len(parts['vae'])} "
        f"text={len(parts['text'])} ignored={len(ignored)} {state}"
    )


def main() -> int:
    if HEAVY:
        FAILURES.append(f"import: ldm_jax.interop.compvis imported {HEAVY[:5]}")
    print(f"{'import':<18} compvis imports no torch/jax/flax: {'OK' if not HEAVY else 'FAIL ' + str(HEAVY[:5])}")
    unet1 = check_unet("unet_sd1", UNET_SD1, 0)
    check_unet("unet_sd2", UNET_SD2, 1)
    vae = check_vae("vae_kl", AutoencoderKL, VAE_KL, 2)
    check_vae("vae_vq", VQModel, VAE_VQ, 3)
    clip = check_clip("clip_sd1", 4)
    check_open_clip("open_clip_sd2", OPEN_CLIP, 5)
    check_open_clip("open_clip_2layers", OPEN_CLIP_SHALLOW, 6)
    check_split(unet1, vae, clip)
    print(f"{len(FAILURES)} failure(s) in {time.time() - T0:.1f}s")
    for f in FAILURES:
        print("FAIL", f)
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())

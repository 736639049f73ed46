"""PyTorch reference side of the parity tests: runs in the reference environment (torch + diffusers + transformers,
see tests/reference/requirements.txt), never imports jax.

  python tests/reference/oracle.py spec.json

``spec.json`` holds ``{"jobs": [...]}``; each job builds (seeded random weights) or loads a reference model, saves
it where asked, runs it on the arrays in ``inputs`` (an .npz, images and latents NHWC) and writes the outputs
(NHWC) to ``outputs``. The test process (jax) compares.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch

torch.set_grad_enabled(False)
torch.use_deterministic_algorithms(True)


def nchw(a):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(a, np.float32).transpose(0, 3, 1, 2)))


def nhwc(t):
    return t.detach().float().numpy().transpose(0, 2, 3, 1)


def _random_init(model, seed):
    """Every parameter random (diffusers zero-initialises nothing, but be explicit and reproducible)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.ndim == 1 and ("norm" in name):
            p.copy_(
                1.0 + 0.1 * torch.randn(p.shape, generator=g)
                if name.endswith("weight")
                else 0.1 * torch.randn(p.shape, generator=g)
            )
        else:
            fan_in = max(1, p[0].numel()) if p.ndim > 1 else p.numel()
            p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
    return model.eval()


def build(kind, config, seed):
    from diffusers import AutoencoderKL, UNet2DConditionModel, VQModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if kind == "unet":
        return _random_init(UNet2DConditionModel(**config), seed)
    if kind == "vae":
        return _random_init(AutoencoderKL(**config), seed)
    if kind == "vq":
        return _random_init(VQModel(**config), seed)
    if kind == "clip":
        return _random_init(CLIPTextModel(CLIPTextConfig(**config)), seed)
    raise ValueError(kind)


def run(kind, model, inputs):
    out = {}
    if kind == "unet":
        out["sample"] = nhwc(
            model(nchw(inputs["x"]), torch.from_numpy(inputs["t"]), torch.from_numpy(inputs["context"])).sample
        )
    elif kind == "vae":
        dist = model.encode(nchw(inputs["x"])).latent_dist
        out["mean"], out["logvar"] = nhwc(dist.mean), nhwc(dist.logvar)
        out["decoded"] = nhwc(model.decode(nchw(inputs["z"])).sample)
    elif kind == "vq":
        h = model.encode(nchw(inputs["x"])).latents
        out["h"] = nhwc(h)
        _, _, (_, _, idx) = model.quantize(h)
        out["indices"] = idx.numpy().reshape(h.shape[0], h.shape[2], h.shape[3])
        out["decoded"] = nhwc(model.decode(h).sample)
    elif kind == "clip":
        out["hidden"] = model(torch.from_numpy(inputs["ids"].astype(np.int64))).last_hidden_state.numpy()
    return out


def add_text_model_prefix(folder):
    """Rewrite a CLIPTextModel folder in the older key layout (``text_model.`` prefix, as SD's text_encoder/)."""
    from safetensors.torch import load_file, save_file

    path = os.path.join(folder, "model.safetensors")
    sd = load_file(path)
    save_file(
        {(k if k.startswith("text_model.") else f"text_model.{k}"): v for k, v in sd.items()},
        path,
        metadata={"format": "pt"},
    )


def build_pipeline(job, pipeline_class="StableDiffusionPipeline"):
    import diffusers
    from diffusers import DDIMScheduler
    from transformers import CLIPTokenizer

    cfg = job["config"]
    pipe = getattr(diffusers, pipeline_class)(
        unet=build("unet", cfg["unet"], job["seed"]),
        vae=build("vae", cfg["vae"], job["seed"] + 1),
        text_encoder=build("clip", cfg["text_encoder"], job["seed"] + 2),
        tokenizer=CLIPTokenizer.from_pretrained(job["tokenizer_dir"]),
        scheduler=DDIMScheduler(**cfg["scheduler"]),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(job["dir"])
    return pipe


def inpaint_inputs(pipe, inputs, out):
    """The inpainting pipeline's own mask processing (recorded in ``out``) and its call arguments, with the posterior
    mean as the masked-image latents so that no random draw has to be matched."""
    image, mask = nchw(inputs["image"]), nchw(inputs["mask"])
    h, w = image.shape[-2:]
    mask_condition = pipe.mask_processor.preprocess(mask, height=h, width=w)
    masked_image = image * (mask_condition < 0.5)
    latents_mean = pipe.vae.encode(masked_image).latent_dist.mean * pipe.vae.config.scaling_factor
    mask_latent, _ = pipe.prepare_mask_latents(
        mask_condition, latents_mean, image.shape[0], h, w, torch.float32, "cpu", None, False
    )
    out["masked_image"], out["mask_latent"], out["masked_latents"] = (
        nhwc(masked_image),
        nhwc(mask_latent),
        nhwc(latents_mean),
    )
    return dict(image=image, mask_image=mask, masked_image_latents=latents_mean, height=h, width=w, strength=1.0)


def run_pipeline(pipe, job, inputs, inpaint=False):
    out = {}
    prompts = list(job["prompts"])
    cond, uncond = pipe.encode_prompt(prompts, "cpu", 1, True, negative_prompt=[""] * len(prompts))
    out["cond"], out["uncond"] = cond.numpy(), uncond.numpy()
    out["ids"] = pipe.tokenizer(
        prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="np"
    ).input_ids
    latents = pipe(
        prompt_embeds=cond,
        negative_prompt_embeds=uncond,
        latents=nchw(inputs["x_T"]),
        num_inference_steps=job["num_steps"],
        guidance_scale=job["guidance_scale"],
        eta=0.0,
        output_type="latent",
        **(inpaint_inputs(pipe, inputs, out) if inpaint else {}),
    ).images
    out["latents"] = nhwc(latents)
    out["images"] = nhwc(pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample)
    return out


def run_lora(job, inputs):
    """A saved pipeline's text encoder and UNet outputs: as saved ("base"), with each LoRA file of ``files`` loaded
    by ``load_lora_weights`` (applied unmerged, as diffusers does), and of each pipeline folder in ``folders``."""
    from diffusers import StableDiffusionPipeline

    ids = torch.from_numpy(inputs["ids"].astype(np.int64))
    z, t = nchw(inputs["z"]), torch.from_numpy(inputs["t"].astype(np.int64))
    out = {}

    def record(name, pipe):
        context = pipe.text_encoder(ids)[0]
        out[f"{name}_context"] = context.float().numpy()
        out[f"{name}_unet"] = nhwc(pipe.unet(z, t, encoder_hidden_states=context).sample)

    record("base", StableDiffusionPipeline.from_pretrained(job["dir"]))
    for name, path in job["files"].items():
        pipe = StableDiffusionPipeline.from_pretrained(job["dir"])
        pipe.load_lora_weights(path)
        record(name, pipe)
    for name, folder in job.get("folders", {}).items():
        record(name, StableDiffusionPipeline.from_pretrained(folder))
    return out


def main(spec_path):
    with open(spec_path) as f:
        spec = json.load(f)
    for job in spec["jobs"]:
        inputs = dict(np.load(job["inputs"])) if job.get("inputs") else {}
        kind = job["kind"]
        if kind == "pipeline":
            out = run_pipeline(build_pipeline(job), job, inputs)
        elif kind == "inpaint_pipeline":
            out = run_pipeline(build_pipeline(job, "StableDiffusionInpaintPipeline"), job, inputs, inpaint=True)
        elif kind == "pickle":
            # Our reader of pickled checkpoints, run where torch exists: a CompVis-style {"state_dict": ...} file.
            from ldm_jax.interop.files import read_state_dict

            tensors = {k.replace("__", "."): torch.from_numpy(v) for k, v in inputs.items()}
            tensors["half.weight"] = tensors["model.w"].half()
            tensors["bf16.weight"] = tensors["model.w"].bfloat16()
            torch.save({"state_dict": tensors, "global_step": 7}, job["path"])
            out = {k.replace(".", "__"): v for k, v in read_state_dict(job["path"], allow_pickle=True).items()}
        elif kind == "lora":
            out = run_lora(job, inputs)
        elif kind == "load_pipeline":
            from diffusers import StableDiffusionPipeline

            pipe = StableDiffusionPipeline.from_pretrained(job["dir"])
            out = run_pipeline(pipe, job, inputs)
            # The UNet runs on latents ("z"), the autoencoder encodes images ("x").
            for name, module, arrays in (
                ("unet", pipe.unet, dict(inputs, x=inputs["z"])),
                ("vae", pipe.vae, inputs),
                ("clip", pipe.text_encoder, inputs),
            ):
                out.update({f"{name}_{k}": v for k, v in run(name, module, arrays).items()})
        else:
            model = build(kind, job["config"], job["seed"])
            model.save_pretrained(job["dir"])
            if job.get("text_model_prefix"):
                add_text_model_prefix(job["dir"])
            out = run(kind, model, inputs)
        np.savez(job["outputs"], **out)
        print(f"{job['name']}: ok", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])

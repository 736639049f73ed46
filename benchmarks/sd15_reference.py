"""PyTorch side of benchmarks/sd15_interop.sh (runs in the reference environment, tests/reference/requirements.txt).

python benchmarks/sd15_reference.py make OUT        # a random-weight SD-1.5-architecture pipeline, saved by diffusers
python benchmarks/sd15_reference.py sample OUT SIZE STEPS   # diffusers DDIM sampling time on this CPU (the peer)
"""

import json
import sys
import time

import torch


def make(out):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)  # SD 1.x layout
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    )
    text = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=768,
        )
    )
    sched = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text,
        tokenizer=CLIPTokenizer.from_pretrained(sys.argv[3]),
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    t0 = time.perf_counter()
    pipe.save_pretrained(out)
    n = sum(p.numel() for m in (unet, vae, text) for p in m.parameters())
    print(json.dumps({"parameters": n, "save_s": round(time.perf_counter() - t0, 1)}))


def sample(out, size, steps):
    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(torch.get_num_threads())
    pipe = StableDiffusionPipeline.from_pretrained(out)
    kw = dict(height=size, width=size, num_inference_steps=steps, guidance_scale=7.5, output_type="np")
    with torch.no_grad():
        pipe(["a photo of a cat"], num_inference_steps=1, height=size, width=size, output_type="np")  # warm-up
        t0 = time.perf_counter()
        pipe(["a photo of a cat"], **kw)
        dt = time.perf_counter() - t0
    print(json.dumps({"peer": "diffusers (PyTorch CPU)", "size": size, "steps": steps, "seconds": round(dt, 2)}))


if __name__ == "__main__":
    if sys.argv[1] == "make":
        make(sys.argv[2])
    else:
        sample(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))

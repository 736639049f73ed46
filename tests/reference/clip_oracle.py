"""PyTorch reference side of the CLIP parity tests: runs in the reference environment, never imports jax.

  python tests/reference/clip_oracle.py spec.json

``spec.json`` holds ``{"inputs", "outputs", "shapes", "hf_dir", "image_size", "openclip": [...]}``. ``inputs`` is
an .npz with uint8 RGB images ``image_0 ... image_K`` (different sizes) and token rows ``tokens_eot`` /
``tokens_zero`` [N, 77] (the two pad conventions, from ldm_jax's tokenizer). The oracle

1. preprocesses the images with transformers' ``CLIPImageProcessor`` (PIL backend) at ``image_size`` ->
   ``pixels`` [K+1, S, S, 3] (NHWC);
2. builds a tiny transformers ``CLIPModel`` (seeded random weights, LayerNorms away from 1 / 0), saves it with
   ``save_pretrained`` (safetensors) to ``hf_dir`` and writes ``hf_image`` (``get_image_features(pixels)``),
   ``hf_text_eot`` / ``hf_text_zero`` (``get_text_features``) and ``hf_score`` [images, captions]
   (``100 * max(cos, 0)`` of image i with caption j, torchmetrics' CLIPScore per pair);
3. builds tiny open_clip ``CLIP`` models (one per ``openclip`` entry: ``{"name", "quick_gelu", "path", "format"}``
   with format "safetensors", or "training_pt": ``torch.save({"epoch", "state_dict": {"module." + key: ...}})`` as
   OpenCLIP's training script writes, plus its conversion by ``convert_command`` to ``converted``) and writes
   ``oc_<name>_image`` / ``oc_<name>_text`` (``encode_image`` / ``encode_text``, ``normalize=False``);
4. writes to ``shapes`` (JSON) the state-dict shapes of the full-size architectures, built on the meta device (no
   memory, no weights): open_clip ViT-B-16, ViT-L-14, ViT-H-14 from its bundled configs, and transformers
   CLIPModel with OpenAI ViT-B/16 and ViT-L/14 configs (with the config dicts).
"""

from __future__ import annotations

import json
import subprocess
import sys
import types

import numpy as np
import torch

torch.set_grad_enabled(False)
torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)  # tiny models; OpenMP threads spin-waiting for the busy second core only slow it down

# Tiny sizes: vision 64 wide (4 heads of 16), text 48 wide (4 heads of 12), patch 8 on 32 x 32 images.
TINY = dict(
    image_size=32, patch=8, vision_width=64, vision_layers=2, vision_heads=4, text_width=48, text_layers=2, text_heads=4
)
TINY_EMBED = 32


def _random_init(model, seed):
    """Every tensor random and reproducible: LayerNorm weights 1 + 0.1 N(0, 1) and biases 0.1 N(0, 1), the rest
    N(0, 1) / sqrt(fan_in), so that no LayerNorm or bias is the identity a wrong mapping could hide behind."""
    g = torch.Generator().manual_seed(seed)
    norms = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.LayerNorm)}
    norms_b = {id(m.bias) for m in model.modules() if isinstance(m, torch.nn.LayerNorm)}
    for _, p in model.named_parameters():
        if id(p) in norms:
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
        elif id(p) in norms_b or p.ndim <= 1:
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
        else:
            fan_in = max(1, p[0].numel())
            p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
    return model.eval()


def _features(out):
    # transformers 5 returns a ModelOutput whose pooler_output holds the projected features; 4.x a tensor.
    return (out.pooler_output if hasattr(out, "pooler_output") else out).float().numpy()


def _score(image_emb, text_emb):
    a = torch.nn.functional.normalize(image_emb, dim=-1)
    b = torch.nn.functional.normalize(text_emb, dim=-1)
    s = 100 * (a * b).sum(-1)
    return torch.max(s, torch.zeros_like(s)).numpy()


def hf_tiny_config():
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=dict(
            hidden_size=TINY["text_width"],
            intermediate_size=4 * TINY["text_width"],
            num_hidden_layers=TINY["text_layers"],
            num_attention_heads=TINY["text_heads"],
            vocab_size=49408,
            max_position_embeddings=77,
        ),
        vision_config=dict(
            hidden_size=TINY["vision_width"],
            intermediate_size=4 * TINY["vision_width"],
            num_hidden_layers=TINY["vision_layers"],
            num_attention_heads=TINY["vision_heads"],
            image_size=TINY["image_size"],
            patch_size=TINY["patch"],
        ),
        projection_dim=TINY_EMBED,
    )


def hf_openai_config(name):
    from transformers import CLIPConfig

    text, vision, proj = {
        "vit_b16": ((512, 12, 8), (768, 12, 12, 16), 512),
        "vit_l14": ((768, 12, 12), (1024, 24, 16, 14), 768),
    }[name]
    return CLIPConfig(
        text_config=dict(
            hidden_size=text[0], intermediate_size=4 * text[0], num_hidden_layers=text[1], num_attention_heads=text[2]
        ),
        vision_config=dict(
            hidden_size=vision[0],
            intermediate_size=4 * vision[0],
            num_hidden_layers=vision[1],
            num_attention_heads=vision[2],
            patch_size=vision[3],
            image_size=224,
        ),
        projection_dim=proj,
    )


def install_torchvision_stand_in():
    """open_clip imports torchvision at module level, but only its image transforms (open_clip/transform.py) and a
    BatchNorm-freezing helper (open_clip/utils.py) use it; the model code does not. torchvision from PyPI is built
    against its own torch release and does not import beside this torch 2.13 CPU wheel, so open_clip is installed
    with --no-deps and these placeholders stand in for the names it imports; calling any of them fails loudly."""

    def placeholder(name):
        def fail(*args, **kwargs):
            raise RuntimeError(f"torchvision stand-in: {name} is not available in the reference env")

        return type(name, (), {"__init__": fail, "__call__": fail})

    tv = types.ModuleType("torchvision")
    transforms = types.ModuleType("torchvision.transforms")
    functional = types.ModuleType("torchvision.transforms.functional")
    ops = types.ModuleType("torchvision.ops")
    misc = types.ModuleType("torchvision.ops.misc")
    for name in (
        "Normalize",
        "Compose",
        "RandomResizedCrop",
        "ToTensor",
        "Resize",
        "CenterCrop",
        "ColorJitter",
        "Grayscale",
    ):
        setattr(transforms, name, placeholder(name))
    transforms.InterpolationMode = types.SimpleNamespace(BICUBIC="bicubic", BILINEAR="bilinear", NEAREST="nearest")
    functional.__getattr__ = lambda name: placeholder(f"functional.{name}")
    misc.FrozenBatchNorm2d = placeholder("FrozenBatchNorm2d")
    tv.transforms, transforms.functional, tv.ops, ops.misc = transforms, functional, ops, misc
    for module in (tv, transforms, functional, ops, misc):
        sys.modules[module.__name__] = module


def openclip_tiny(quick_gelu, seed):
    import open_clip

    vision_cfg = dict(
        image_size=TINY["image_size"],
        patch_size=TINY["patch"],
        width=TINY["vision_width"],
        layers=TINY["vision_layers"],
        head_width=TINY["vision_width"] // TINY["vision_heads"],
    )
    text_cfg = dict(
        context_length=77,
        vocab_size=49408,
        width=TINY["text_width"],
        heads=TINY["text_heads"],
        layers=TINY["text_layers"],
    )
    model = open_clip.model.CLIP(TINY_EMBED, vision_cfg, text_cfg, quick_gelu=quick_gelu)
    return _random_init(model, seed)


def shapes_of(model):
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def main(spec_path):
    with open(spec_path) as f:
        spec = json.load(f)
    inputs = np.load(spec["inputs"])
    n_images = len([k for k in inputs.files if k.startswith("image_")])
    images = [inputs[f"image_{i}"] for i in range(n_images)]
    tokens = {pad: torch.from_numpy(inputs[f"tokens_{pad}"].astype(np.int64)) for pad in ("eot", "zero")}
    out = {}

    # transformers first: with the torchvision stand-in in sys.modules it would think torchvision is installed.
    from transformers import CLIPImageProcessorPil, CLIPModel

    size = spec["image_size"]
    processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    pixels = np.concatenate([processor(images=im, return_tensors="np")["pixel_values"] for im in images])
    out["pixels"] = pixels.transpose(0, 2, 3, 1)
    pixels_t = torch.from_numpy(np.ascontiguousarray(pixels, np.float32))

    torch.manual_seed(0)
    hf = _random_init(CLIPModel(hf_tiny_config()), seed=1)
    hf.save_pretrained(spec["hf_dir"])
    hf_image = hf.get_image_features(pixel_values=pixels_t)
    out["hf_image"] = _features(hf_image)
    for pad, ids in tokens.items():
        out[f"hf_text_{pad}"] = _features(hf.get_text_features(input_ids=ids))
    # Every (image, caption) pair, rows = images: with random weights about half the cosines are negative.
    image_emb, text_emb = torch.from_numpy(out["hf_image"]), torch.from_numpy(out["hf_text_eot"])
    out["hf_score"] = _score(
        image_emb[:, None].expand(-1, len(text_emb), -1), text_emb[None].expand(len(image_emb), -1, -1)
    )

    shapes = {}
    for name in ("vit_b16", "vit_l14"):
        config = hf_openai_config(name)
        with torch.device("meta"):
            shapes[f"hf:{name}"] = {"config": config.to_dict(), "shapes": shapes_of(CLIPModel(config))}

    install_torchvision_stand_in()
    import open_clip

    for i, case in enumerate(spec["openclip"]):
        model = openclip_tiny(case["quick_gelu"], seed=10 + i)
        sd = {k: v.contiguous() for k, v in model.state_dict().items()}
        if case["format"] == "safetensors":
            from safetensors.torch import save_file

            save_file(sd, case["path"])
        else:
            torch.save(
                {"epoch": 3, "name": "tiny", "state_dict": {f"module.{k}": v for k, v in sd.items()}}, case["path"]
            )
            subprocess.run([sys.executable, "-c", spec["convert_command"], case["path"], case["converted"]], check=True)
        out[f"oc_{case['name']}_image"] = model.encode_image(pixels_t, normalize=False).numpy()
        out[f"oc_{case['name']}_text"] = model.encode_text(tokens["zero"], normalize=False).numpy()
        out[f"oc_{case['name']}_text_eot"] = model.encode_text(tokens["eot"], normalize=False).numpy()

    for name in ("ViT-B-16", "ViT-L-14", "ViT-H-14"):
        cfg = open_clip.get_model_config(name)
        with torch.device("meta"):
            model = open_clip.model.CLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"])
        shapes[f"openclip:{name}"] = {"config": cfg, "shapes": shapes_of(model)}

    np.savez(spec["outputs"], **out)
    with open(spec["shapes"], "w") as f:
        json.dump(shapes, f)


if __name__ == "__main__":
    main(sys.argv[1])

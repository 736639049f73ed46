"""PyTorch reference side of the LPIPS tests: runs in the reference environment (torch, no torchvision / lpips, see
tests/reference/requirements.txt), never imports jax.

  python tests/reference/lpips_oracle.py spec.json
  python tests/reference/lpips_oracle.py export-heads LPIPS_VGG_PTH OUT.npz

With a spec, it rebuilds lpips' VGG16 distance from plain torch layers in NCHW (a Conv2d / ReLU / MaxPool2d stack at
torchvision's ``vgg16().features`` indices, lpips' ScalingLayer, normalize_tensor and 1x1 heads), loads the trunk
from the state dict in ``spec["vgg"]`` (.npz, torchvision keys) and the heads from ``spec["heads"]`` (the shipped
.npz, lin{k} [C]) or from lpips' own ``vgg.pth``, and writes to ``spec["outputs"]``:

  dist_{name} [B]            distances of each pair in ``spec["inputs"]`` (x0_{name}, x1_{name}, NHWC)
  orig_lin{k} [C]            lpips' heads, when ``spec["original_heads"]`` names its vgg.pth (or the lpips wheel)
  pth__{path} / full__{path} digests (see ``digest``) of each array our ``load_lpips_params`` gives here from a
                             torch-saved torchvision state dict (``spec["pth"]``) and from an lpips-style
                             ``LPIPS.state_dict()`` file (``spec["full_pth"]``); digests keep 60 MB trees off disk
  bad_pth_error              the error ``load_lpips_params`` raises on a corrupt ``spec["bad_pth"]``

``export-heads`` is how ldm_jax/models/assets/lpips_vgg_v0.1.npz was made from lpips 0.1.4's weights/v0.1/vgg.pth.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
import zipfile

import numpy as np
import torch
from torch import nn

torch.set_grad_enabled(False)

# torchvision's vgg16 "D" configuration: conv widths, "M" a 2x2 max-pool.
VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
CHANNELS = (64, 128, 256, 512, 512)


def vgg16_features() -> nn.Sequential:
    layers, cin = [], 3
    for v in VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(cin, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            cin = v
    return nn.Sequential(*layers)


def load_original_heads(path: str) -> dict[str, torch.Tensor]:
    """lpips' weights/v0.1/vgg.pth, given directly or inside the lpips wheel."""
    if path.endswith(".whl"):
        with zipfile.ZipFile(path) as z:
            data = z.read("lpips/weights/v0.1/vgg.pth")
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    return torch.load(path, map_location="cpu", weights_only=True)


class ReferenceLPIPS(nn.Module):
    def __init__(self, vgg_sd: dict[str, torch.Tensor], heads: list[torch.Tensor]):
        super().__init__()
        self.features = vgg16_features()
        trunk = {k[len("features.") :]: v for k, v in vgg_sd.items() if k.startswith("features.")}
        self.features.load_state_dict(trunk, strict=True)
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in CHANNELS)
        for head, w in zip(self.heads, heads, strict=True):
            head.weight.copy_(w.reshape(1, -1, 1, 1))
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])
        self.eval()

    def taps(self, x):
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in TAPS:
                out.append(x)
            if i == TAPS[-1]:
                return out

    def forward(self, x0, x1):
        f0 = self.taps((x0 - self.shift) / self.scale)
        f1 = self.taps((x1 - self.shift) / self.scale)
        total = 0
        for a, b, head in zip(f0, f1, self.heads, strict=True):
            a = a / (torch.sqrt(torch.sum(a**2, dim=1, keepdim=True)) + 1e-10)
            b = b / (torch.sqrt(torch.sum(b**2, dim=1, keepdim=True)) + 1e-10)
            total = total + head((a - b) ** 2).mean([2, 3], keepdim=True)
        return total[:, 0, 0, 0]


def nchw(a):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(a, np.float32).transpose(0, 3, 1, 2)))


def digest(a) -> str:
    """sha256 of an array's dtype, shape and bytes: equal digests mean bit-identical arrays."""
    a = np.ascontiguousarray(a)
    return hashlib.sha256(f"{a.dtype.str}{a.shape}".encode() + a.tobytes()).hexdigest()


def digests(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(digests(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = np.array(digest(v))
    return out


def main(spec_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    vgg_sd = {k: torch.from_numpy(v) for k, v in np.load(spec["vgg"]).items()}
    with np.load(spec["heads"]) as f:
        heads = [torch.from_numpy(f[f"lin{k}"]) for k in range(len(CHANNELS))]
    out = {}
    if spec.get("original_heads"):
        original = load_original_heads(spec["original_heads"])
        for k in range(len(CHANNELS)):
            out[f"orig_lin{k}"] = original[f"lin{k}.model.1.weight"].numpy().reshape(-1)
    model = ReferenceLPIPS(vgg_sd, heads)
    with np.load(spec["inputs"]) as inputs:
        names = [k[len("x0_") :] for k in inputs.files if k.startswith("x0_")]
        for name in names:
            out[f"dist_{name}"] = model(nchw(inputs[f"x0_{name}"]), nchw(inputs[f"x1_{name}"])).numpy()

    # Our loader on files written by torch.save itself: a torchvision-style state dict (classifier included) and
    # lpips' LPIPS.state_dict() layout (trunk under net.slice{s}.{i}, heads as lin{k}.model.1.weight, buffers).
    from ldm_jax.interop.lpips_weights import load_lpips_params

    if spec.get("pth"):
        torch.save(vgg_sd, spec["pth"])
        out.update({f"pth__{k}": v for k, v in digests(load_lpips_params(spec["pth"], spec["heads"])).items()})
    if spec.get("full_pth"):
        slices = {1: range(0, 4), 2: range(4, 9), 3: range(9, 16), 4: range(16, 23), 5: range(23, 30)}
        full = {"scaling_layer.shift": model.shift.clone(), "scaling_layer.scale": model.scale.clone()}
        for s, indices in slices.items():
            for i in indices:
                for leaf in ("weight", "bias"):
                    if f"features.{i}.{leaf}" in vgg_sd:
                        full[f"net.slice{s}.{i}.{leaf}"] = vgg_sd[f"features.{i}.{leaf}"]
        for k, w in enumerate(heads):
            full[f"lin{k}.model.1.weight"] = w.reshape(1, -1, 1, 1).clone()
        torch.save(full, spec["full_pth"])
        params = load_lpips_params(spec["full_pth"], spec["full_pth"])
        out.update({f"full__{k}": v for k, v in digests(params).items()})
    if spec.get("bad_pth"):
        with open(spec["bad_pth"], "wb") as f:
            f.write(b"not a pickle")
        try:
            load_lpips_params(spec["bad_pth"])
        except ValueError as e:
            out["bad_pth_error"] = np.array(str(e))
    np.savez(spec["outputs"], **out)
    print("lpips oracle: ok", flush=True)


def export_heads(vgg_pth: str, out_path: str) -> None:
    """lpips' heads as float32 [C] arrays lin0..lin4 (lpips stores them as 1x1 conv weights [1, C, 1, 1])."""
    sd = load_original_heads(vgg_pth)
    arrays = {}
    for k, channels in enumerate(CHANNELS):
        w = sd[f"lin{k}.model.1.weight"]
        assert tuple(w.shape) == (1, channels, 1, 1) and w.dtype == torch.float32, (k, w.shape, w.dtype)
        arrays[f"lin{k}"] = w.numpy().reshape(channels).copy()
    np.savez(out_path, **arrays)


if __name__ == "__main__":
    if sys.argv[1] == "export-heads":
        export_heads(sys.argv[2], sys.argv[3])
    else:
        main(sys.argv[1])

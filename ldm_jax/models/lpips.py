"""LPIPS perceptual distance (Zhang et al. 2018), VGG16 trunk, version 0.1: what ``lpips.LPIPS(net="vgg")`` computes
and what the CompVis / taming first-stage losses train against.

For images in [-1, 1], each channel is shifted and scaled to ImageNet statistics, both images go through the VGG16
``features`` trunk, and at relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3 the feature maps are unit-normalised over
channels, their squared difference is weighted per channel by a learned non-negative head (a bias-free 1x1 conv to
one channel) and averaged over space. The distance is the sum over the five layers.

All tensors are NHWC. Convolutions are named ``features_{i}`` after their index in torchvision's
``vgg16().features`` and the heads ``lin{k}`` as in lpips, so ``ldm_jax.interop.lpips_weights`` maps weight files
one to one. Weights: ``ldm_jax.interop.lpips_weights.load_lpips_params``.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# Output channels of each conv, stage by stage; every stage ends in the ReLU whose output LPIPS compares.
VGG16_STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
LPIPS_CHANNELS = tuple(stage[-1] for stage in VGG16_STAGES)
# lpips' ScalingLayer: [-1, 1] images to the ImageNet-normalised range the trunk was trained on.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10
# Four 2x2 max-pools precede the last stage; it needs at least one pixel.
MIN_SIZE = 2 ** (len(VGG16_STAGES) - 1)


class VGG16Features(nn.Module):
    """The VGG16 ``features`` trunk up to relu5_3 (no final pool).

    ``__call__``: x [B, H, W, 3] (already scaled) -> the five feature maps [B, H / 2^s, W / 2^s, C_s] after
    relu1_2 ... relu5_3, with C_s = 64, 128, 256, 512, 512 and floor division, as PyTorch's MaxPool2d(2, 2).
    """

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Optional[jax.lax.Precision] = None

    @nn.compact
    def __call__(self, x: jax.Array) -> list[jax.Array]:
        outputs, index, pre_relu = [], 0, x
        for s, stage in enumerate(VGG16_STAGES):
            if s:
                # max-pool(relu(y)) == relu(max-pool(y)) exactly; this order also sidesteps an XLA:CPU
                # miscompilation (jaxlib 0.12) of bfloat16 relu -> max-pool -> conv fusions, which yields NaN.
                x = nn.relu(nn.max_pool(pre_relu, (2, 2), strides=(2, 2), padding="VALID"))
                index += 1
            for channels in stage:
                pre_relu = nn.Conv(
                    channels,
                    (3, 3),
                    padding=((1, 1), (1, 1)),
                    dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    precision=self.precision,
                    name=f"features_{index}",
                )(x)
                x = nn.relu(pre_relu)
                index += 2  # the conv and its ReLU
            outputs.append(x)
        return outputs


def normalize_channels(x: jax.Array, eps: float = EPS) -> jax.Array:
    """x / (||x||_2 over the last axis + eps), as lpips' normalize_tensor.

    sqrt has an infinite derivative at 0, and a pixel where every channel is zero after the ReLU is common enough
    (small images, saturated inputs); the double ``where`` keeps the value and gives that pixel the true gradient
    I / eps instead of NaN.
    """
    sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
    positive = sq > 0
    norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
    return x / (norm + eps)


class LinearHead(nn.Module):
    """lpips' NetLinLayer: a bias-free 1x1 conv from C channels to one, kept as a conv kernel [1, 1, C, 1].

    ``__call__``: [B, H, W, C] -> [B, H, W], in float32. The dropout before it in lpips is inactive at evaluation.
    Initialised to ones: lpips' uncalibrated ``lpips=False`` baseline, which sums the channels.
    """

    param_dtype: Dtype = jnp.float32
    precision: Optional[jax.lax.Precision] = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.ones, (1, 1, x.shape[-1], 1), self.param_dtype)
        # A 1x1 convolution to one channel is this contraction over channels.
        return jnp.einsum("bhwc,c->bhw", x, kernel[0, 0, :, 0].astype(jnp.float32), precision=self.precision)


class LPIPS(nn.Module):
    """LPIPS distance between two image batches.

    ``__call__(x0, x1)``: x0, x1 [B, H, W, 3] in [-1, 1] with H, W >= 16 -> [B] float32 distances.

    ``dtype`` is the trunk's compute dtype; the normalisation, heads and averages always run in float32, since the
    per-pixel differences of unit-normalised features are tiny and summed over many channels. A fresh ``init``
    gives all-ones heads, i.e. lpips' uncalibrated ``lpips=False`` baseline; load real weights for the metric.
    """

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Optional[jax.lax.Precision] = None

    @nn.compact
    def __call__(self, x0: jax.Array, x1: jax.Array) -> jax.Array:
        _check_images(x0, x1)
        shift = jnp.asarray(SHIFT, jnp.float32)
        scale = jnp.asarray(SCALE, jnp.float32)
        net = VGG16Features(self.dtype, self.param_dtype, self.precision, name="net")
        # Two passes rather than one over the concatenated batch: each image then goes through the very same
        # computation whatever its partner, which LPIPS(x, x) == 0 exactly relies on.
        feats0, feats1 = (net(((x.astype(jnp.float32) - shift) / scale).astype(self.dtype)) for x in (x0, x1))
        total = jnp.zeros((x0.shape[0],), jnp.float32)
        for k, (f0, f1) in enumerate(zip(feats0, feats1, strict=True)):
            f0, f1 = (normalize_channels(f.astype(jnp.float32)) for f in (f0, f1))
            # Fused into the subtraction, the two normalisations can be compiled differently (XLA:CPU does), and
            # then identical images are a few ulps apart; the barrier keeps LPIPS(x, x) exactly 0.
            f0, f1 = jax.lax.optimization_barrier((f0, f1))
            diff = jnp.square(f0 - f1)
            head = LinearHead(self.param_dtype, self.precision, name=f"lin{k}")(diff)
            total = total + jnp.mean(head, axis=(1, 2))
        return total


def _check_images(x0: jax.Array, x1: jax.Array) -> None:
    if x0.ndim != 4 or x0.shape[-1] != 3:
        raise ValueError(f"LPIPS images: shape {x0.shape}; expected [B, H, W, 3] (NHWC RGB in [-1, 1])")
    if x0.shape != x1.shape:
        raise ValueError(f"LPIPS images: shapes {x0.shape} and {x1.shape} differ; both must be [B, H, W, 3]")
    if min(x0.shape[1:3]) < MIN_SIZE:
        raise ValueError(
            f"LPIPS images: spatial size {x0.shape[1:3]}; H and W must be >= {MIN_SIZE} "
            f"({len(VGG16_STAGES) - 1} max-pools precede the last VGG16 stage)"
        )


def lpips_distance(
    params: Any, x0: jax.Array, x1: jax.Array, dtype: Dtype = jnp.float32, precision: Optional[Any] = None
) -> jax.Array:
    """LPIPS distances [B] between x0 and x1 ([B, H, W, 3] in [-1, 1], H, W >= 16).

    ``params`` is the tree of ``load_lpips_params`` (or ``LPIPS().init(...)["params"]``), numpy or jax arrays. It
    is wrapped in ``stop_gradient``: LPIPS is a fixed metric, so differentiating a loss through this function gives
    gradients for the images only, even when the caller's ``jax.grad`` happens to cover the params too.
    """
    params = jax.lax.stop_gradient(params)
    return LPIPS(dtype=dtype, precision=precision).apply({"params": params}, x0, x1)


def lpips_param_shapes() -> dict:
    """The parameter tree's shapes as ``jax.ShapeDtypeStruct`` (no compute): what a loaded tree must match."""
    x = jax.ShapeDtypeStruct((1, MIN_SIZE, MIN_SIZE, 3), jnp.float32)
    return jax.eval_shape(lambda a, b: LPIPS().init(jax.random.key(0), a, b)["params"], x, x)

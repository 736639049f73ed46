"""PatchGAN discriminator (Isola et al. 2017) as the LDM / taming first-stage trainers use it.

``NLayerDiscriminator`` maps images [B, H, W, 3] in [-1, 1] to a map of real/fake logits [B, H', W', 1], one per
overlapping patch: a 4x4 stride-2 convolution, ``n_layers - 1`` more stride-2 ones with doubling width (capped at
8 x ``base_channels``), one stride-1 block and a stride-1 output convolution, all with padding 1. With three layers
each logit sees a 70x70 patch. H' = H / 2**n_layers - 2, so images need a side of at least 3 * 2**n_layers.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
NORMS = ("batch", "none")


def min_image_size(n_layers: int) -> int:
    """Smallest image side whose logit map is at least 1x1."""
    return 3 * 2**n_layers


class BatchStatNorm(nn.Module):
    """Batch normalisation from the statistics of the current call, with a learned scale and shift.

    The reference discriminator is a BatchNorm network that is only ever run in training mode, so its running
    averages are never read: we keep none. Real and reconstructed images are normalised in separate calls, as in
    the reference. Under ``jax.jit`` over a mesh the mean is over the global batch (synchronised BatchNorm).
    """

    eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        # N(1, 0.02) scale and zero shift: the reference's weights_init for BatchNorm layers.
        scale = self.param("scale", lambda k, s, d: 1.0 + 0.02 * jax.random.normal(k, s, d), (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=(0, 1, 2))
        var = jnp.mean(jnp.square(xf - mean), axis=(0, 1, 2))  # biased variance, as torch uses to normalise
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias
        return y.astype(self.dtype)


class NLayerDiscriminator(nn.Module):
    n_layers: int = 3
    base_channels: int = 64
    norm: str = "batch"  # "none": no normalisation (and biased convolutions), e.g. for batch-size-1 debugging
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.norm not in NORMS:
            raise ValueError(f"disc.norm={self.norm!r}: must be one of {NORMS}")
        # N(0, 0.02) convolution weights, the reference's weights_init.
        conv = dict(
            kernel_size=(4, 4),
            padding=((1, 1), (1, 1)),
            kernel_init=nn.initializers.normal(0.02),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        h = nn.Conv(self.base_channels, strides=(2, 2), name="conv_0", **conv)(x.astype(self.dtype))
        h = nn.leaky_relu(h, 0.2)
        use_bias = self.norm == "none"  # a bias before BatchNorm is cancelled by its mean
        for n in range(1, self.n_layers + 1):
            width = self.base_channels * min(2**n, 8)
            stride = 2 if n < self.n_layers else 1
            h = nn.Conv(width, strides=(stride, stride), use_bias=use_bias, name=f"conv_{n}", **conv)(h)
            if self.norm == "batch":
                h = BatchStatNorm(dtype=self.dtype, param_dtype=self.param_dtype, name=f"norm_{n}")(h)
            h = nn.leaky_relu(h, 0.2)
        out = nn.Conv(1, strides=(1, 1), name="conv_out", **conv)(h)
        return out.astype(jnp.float32)

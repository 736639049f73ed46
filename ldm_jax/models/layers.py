"""Building blocks shared by the UNet and the autoencoders.

All tensors are NHWC. Submodule names follow the diffusers layout (``norm1``, ``conv1``, ``time_emb_proj``,
``to_q`` ...) so that weight converters map names one to one.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.models import conv
from ldm_jax.models.attention import attention

Dtype = Any


def timestep_embedding(
    timesteps: jax.Array, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0.0, max_period: float = 10000.0
) -> jax.Array:
    """Sinusoidal embedding of (possibly fractional) timesteps.

    Args:
      timesteps: [B] float or int.
    Returns:
      [B, dim] float32. ``flip_sin_to_cos=True, freq_shift=0`` is the Stable Diffusion convention.
    """
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class GroupNorm(nn.Module):
    """``nn.GroupNorm``'s function and parameters ("scale", "bias": checkpoints and converters are unchanged) for
    [B, ..., C] inputs, with its statistics taken in two steps: per channel over the positions, then per group over
    the [B, C] sums. Why: flax reduces [B, H, W, G, C/G] over the positions and the channels of a group at once,
    which XLA:CPU runs as a slow strided reduction. On the peers' small UNet (benchmarks/peers.py, batch 4 of 32x32
    latents) its 46 GroupNorms took 23 ms of a 300 ms forward pass (summed over both threads) and take 3 ms this
    way. The mean and the mean of squares come from the same pass, as flax's fast variance does; float32
    statistics and arithmetic, the output in ``dtype`` (as flax)."""

    num_groups: int = 32
    epsilon: float = 1e-6
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c, g = x.shape[-1], self.num_groups
        if c % g:
            raise ValueError(f"GroupNorm({self.name}): num_groups={g} must divide the {c} channels")
        scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        dtype = self.dtype or jnp.promote_types(x.dtype, self.param_dtype)
        b, k = x.shape[0], c // g
        xf = x.astype(jnp.float32).reshape(b, -1, c)  # [B, positions, C]

        def group_mean(v):  # [B, positions, C] -> [B, G]
            return v.sum(1).reshape(b, g, k).sum(-1) / (v.shape[1] * k)

        def per_channel(v):  # [B, G] -> [B, 1, C], broadcast over the positions
            return jnp.repeat(v, k, axis=1)[:, None, :]

        mean, mean_sq = group_mean(xf), group_mean(xf * xf)
        inv = jax.lax.rsqrt(jnp.maximum(mean_sq - mean * mean, 0.0) + self.epsilon)
        y = (xf - per_channel(mean)) * (per_channel(inv) * scale.astype(jnp.float32)) + bias.astype(jnp.float32)
        return y.reshape(x.shape).astype(dtype)


class TimestepEmbedding(nn.Module):
    """MLP applied to the sinusoidal embedding: linear_1 -> SiLU -> linear_2."""

    dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, emb: jax.Array) -> jax.Array:
        emb = nn.Dense(self.dim, dtype=self.dtype, param_dtype=self.param_dtype, name="linear_1")(emb)
        emb = nn.silu(emb)
        return nn.Dense(self.dim, dtype=self.dtype, param_dtype=self.param_dtype, name="linear_2")(emb)


class AttentionPooling(nn.Module):
    """[B, T, D] -> [B, D]: one query, the tokens' mean plus a learned offset, attending to itself and every token
    (DeepFloyd IF's pooling; diffusers' ``AttentionPooling``, whose parameter names these are)."""

    num_heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, _, width = x.shape
        if width % self.num_heads:
            raise ValueError(f"AttentionPooling: {self.num_heads} heads do not divide the context width {width}")
        dense = lambda n: nn.Dense(width, dtype=self.dtype, param_dtype=self.param_dtype, name=n)  # noqa: E731
        offset = self.param(
            "positional_embedding",
            lambda k, s, d: jax.random.normal(k, s, d) / width**0.5,
            (1, width),
            self.param_dtype,
        )
        query = jnp.mean(x, axis=1, keepdims=True) + offset.astype(x.dtype)  # [B, 1, D]
        keys = jnp.concatenate([query, x], axis=1)
        dh = width // self.num_heads
        split = lambda y: y.reshape(b, y.shape[1], self.num_heads, dh)  # noqa: E731
        q, k, v = split(dense("q_proj")(query)), split(dense("k_proj")(keys)), split(dense("v_proj")(keys))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / np.sqrt(dh)
        pooled = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1).astype(v.dtype), v)
        return pooled.reshape(b, width)


class TextTimeEmbedding(nn.Module):
    """A summary of the whole prompt for the timestep embedding (diffusers' ``addition_embed_type="text"``):
    LayerNorm -> AttentionPooling -> Dense -> LayerNorm. Added to the timestep embedding, it reaches every
    ResnetBlock through its scale and shift, including the levels without cross-attention."""

    dim: int
    num_heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, context: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.LayerNorm(epsilon=1e-5, **kw, name="norm1")(context)
        x = AttentionPooling(self.num_heads, **kw, name="pool")(x)
        x = nn.Dense(self.dim, **kw, name="proj")(x)
        return nn.LayerNorm(epsilon=1e-5, **kw, name="norm2")(x)


def _conv(features, kernel, name, dtype, param_dtype, strides=1, padding="SAME", zero_init=False):
    kwargs = {}
    if zero_init:
        kwargs = dict(kernel_init=nn.initializers.zeros, bias_init=nn.initializers.zeros)
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(strides, strides),
        padding=padding,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
        # The implementation of models/conv.py (XLA's, or one matmul where that is faster); nn.Conv's parameters.
        conv_general_dilated=conv.conv_general_dilated,
        **kwargs,
    )


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-Conv twice, with an optional timestep shift and a 1x1 shortcut when channels change.

    ``zero_init_last`` zero-initialises ``conv2`` so the block starts as the identity (the CompVis UNet does this;
    the autoencoder does not).
    """

    out_channels: int
    groups: int = 32
    eps: float = 1e-5
    dropout: float = 0.0
    zero_init_last: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: Optional[jax.Array] = None, deterministic: bool = True) -> jax.Array:
        h = GroupNorm(self.groups, epsilon=self.eps, dtype=self.dtype, param_dtype=self.param_dtype, name="norm1")(x)
        h = nn.silu(h)
        h = _conv(self.out_channels, 3, "conv1", self.dtype, self.param_dtype)(h)
        if temb is not None:
            t = nn.Dense(self.out_channels, dtype=self.dtype, param_dtype=self.param_dtype, name="time_emb_proj")(
                nn.silu(temb)
            )
            h = h + t[:, None, None, :]
        h = GroupNorm(self.groups, epsilon=self.eps, dtype=self.dtype, param_dtype=self.param_dtype, name="norm2")(h)
        h = nn.silu(h)
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        h = _conv(self.out_channels, 3, "conv2", self.dtype, self.param_dtype, zero_init=self.zero_init_last)(h)
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, 1, "conv_shortcut", self.dtype, self.param_dtype, padding="VALID")(x)
        return x + h


class Downsample(nn.Module):
    """Strided 3x3 convolution. ``asymmetric_pad`` pads only bottom/right, as the CompVis autoencoder does."""

    channels: int
    asymmetric_pad: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        padding = ((0, 1), (0, 1)) if self.asymmetric_pad else ((1, 1), (1, 1))
        return _conv(self.channels, 3, "conv", self.dtype, self.param_dtype, strides=2, padding=padding)(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 convolution."""

    channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        # Each pixel repeated 2x2 by a broadcast (the same values as jax.image.resize's "nearest"): its gradient is a
        # sum over the copies, where resize's is a scatter (the peers' 32x32x320 map: 0.2 vs 5.4 ms on this CPU).
        x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, h * 2, w * 2, c)
        return _conv(self.channels, 3, "conv", self.dtype, self.param_dtype)(x)


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v projections (self-attention when ``context`` is None)."""

    heads: int
    head_dim: int
    out_bias: bool = True
    qkv_bias: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: Optional[jax.Array] = None) -> jax.Array:
        inner = self.heads * self.head_dim
        context = x if context is None else context
        dense = lambda n, bias: nn.Dense(  # noqa: E731
            inner, use_bias=bias, dtype=self.dtype, param_dtype=self.param_dtype, name=n
        )
        q = dense("to_q", self.qkv_bias)(x)
        k = dense("to_k", self.qkv_bias)(context)
        v = dense("to_v", self.qkv_bias)(context)
        out = attention(q, k, v, self.heads)
        return nn.Dense(
            x.shape[-1], use_bias=self.out_bias, dtype=self.dtype, param_dtype=self.param_dtype, name="to_out_0"
        )(out)


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over all pixels with a GroupNorm in front (autoencoder mid block)."""

    groups: int = 32
    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        y = GroupNorm(self.groups, epsilon=self.eps, dtype=self.dtype, param_dtype=self.param_dtype, name="group_norm")(
            x
        )
        y = y.reshape(b, h * w, c)
        y = Attention(1, c, qkv_bias=True, dtype=self.dtype, param_dtype=self.param_dtype, name="attn")(y)
        return x + y.reshape(b, h, w, c)


class GEGLUFeedForward(nn.Module):
    """Gated-GELU feed-forward of the Stable Diffusion transformer block (``ff.net.0.proj`` / ``ff.net.2``)."""

    mult: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        inner = dim * self.mult
        h = nn.Dense(inner * 2, dtype=self.dtype, param_dtype=self.param_dtype, name="proj_in")(x)
        h, gate = jnp.split(h, 2, axis=-1)
        h = h * nn.gelu(gate, approximate=False)
        return nn.Dense(dim, dtype=self.dtype, param_dtype=self.param_dtype, name="proj_out")(h)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to ``context``, and GEGLU feed-forward, each residual."""

    heads: int
    head_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        ln = lambda n: nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, param_dtype=self.param_dtype, name=n)  # noqa: E731
        attn = lambda n: Attention(  # noqa: E731
            self.heads, self.head_dim, dtype=self.dtype, param_dtype=self.param_dtype, name=n
        )
        x = x + attn("attn1")(ln("norm1")(x))
        x = x + attn("attn2")(ln("norm2")(x), context)
        x = x + GEGLUFeedForward(dtype=self.dtype, param_dtype=self.param_dtype, name="ff")(ln("norm3")(x))
        return x


POSITION_EMBEDDINGS = ("none", "sincos")


def sincos_position_embedding(h: int, w: int, dim: int) -> np.ndarray:
    """A fixed 2-D sine-cosine embedding of the pixels of an h x w map: [h * w, dim], float32, row-major.

    Why: the LDM UNet has no position input; its features learn where they are only from the convolutions' zero
    padding, which reaches a few pixels in from the border. A prompt that names a place ("at the top left") then has
    nothing to attend from in the middle of a larger latent map: the demo's UNet on 16x16 latents (f=2) drew objects
    at random places (position 0.133, chance 0.111) while the same recipe on 8x8 latents placed them.

    Coordinates are the pixel centres as fractions of the side, so every level of the UNet encodes the same place
    the same way; a quarter of the channels each hold sin and cos of the row and of the column at frequencies
    pi * 2**k, geometric from pi (one half period over the side) to the map's Nyquist rate. Channels beyond the last
    multiple of 4 are zero.
    """
    n = dim // 4
    freqs = np.pi * 2.0 ** np.linspace(0.0, np.log2(max(h, w, 2) / 2), n)
    rows = (np.arange(h) + 0.5)[:, None] / h * freqs
    cols = (np.arange(w) + 0.5)[:, None] / w * freqs
    by_row = np.concatenate([np.sin(rows), np.cos(rows)], -1)  # [h, 2n]
    by_col = np.concatenate([np.sin(cols), np.cos(cols)], -1)  # [w, 2n]
    grid = np.concatenate([np.repeat(by_row[:, None], w, 1), np.repeat(by_col[None], h, 0)], -1)
    return np.pad(grid.reshape(h * w, 4 * n), ((0, 0), (0, dim - 4 * n))).astype(np.float32)


class SpatialTransformer(nn.Module):
    """Cross-attention transformer over the pixels of a feature map (the LDM ``SpatialTransformer``).

    ``proj_out`` is zero-initialised so that a freshly initialised block is the identity, as in the LDM code.
    ``use_linear_projection`` selects dense (SD 2.x) rather than 1x1-conv (SD 1.x) projections.
    ``position_embedding="sincos"`` adds ``sincos_position_embedding`` to the tokens after ``proj_in`` (not in LDM
    or SD, whose UNets have none; it adds no parameters).
    """

    heads: int
    head_dim: int
    depth: int = 1
    groups: int = 32
    use_linear_projection: bool = False
    position_embedding: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        inner = self.heads * self.head_dim
        y = GroupNorm(self.groups, epsilon=1e-6, dtype=self.dtype, param_dtype=self.param_dtype, name="norm")(x)
        if self.use_linear_projection:
            y = y.reshape(b, h * w, c)
            y = nn.Dense(inner, dtype=self.dtype, param_dtype=self.param_dtype, name="proj_in")(y)
        else:
            y = _conv(inner, 1, "proj_in", self.dtype, self.param_dtype, padding="VALID")(y)
            y = y.reshape(b, h * w, inner)
        if self.position_embedding == "sincos":
            y = y + jnp.asarray(sincos_position_embedding(h, w, inner), y.dtype)
        for i in range(self.depth):
            y = BasicTransformerBlock(
                self.heads,
                self.head_dim,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"transformer_blocks_{i}",
            )(y, context)
        if self.use_linear_projection:
            y = nn.Dense(
                c,
                kernel_init=nn.initializers.zeros,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="proj_out",
            )(y)
            y = y.reshape(b, h, w, c)
        else:
            y = y.reshape(b, h, w, inner)
            y = _conv(c, 1, "proj_out", self.dtype, self.param_dtype, padding="VALID", zero_init=True)(y)
        return x + y

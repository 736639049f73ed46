"""CLIP-style text transformer in Flax (causal, pre-LayerNorm), the Stable Diffusion text encoder family.

Maps token ids [B, T] to a context sequence [B, T, width] for the UNet's cross-attention. Submodule names follow
Hugging Face ``CLIPTextModel`` (``token_embedding``, ``layers_i.self_attn.q_proj``, ``final_layer_norm`` ...).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models.attention import attention

Dtype = Any

TEXT_ENCODER_VARIANTS = {
    "tiny": dict(width=64, layers=2, heads=4, max_length=16),
    "clip_vit_l14": dict(width=768, layers=12, heads=12, max_length=77),
}


def quick_gelu(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(1.702 * x)


class CLIPEncoderLayer(nn.Module):
    width: int
    heads: int
    activation: str = "quick_gelu"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.LayerNorm(epsilon=1e-5, name="layer_norm1", **kw)(x)
        q = nn.Dense(self.width, name="q_proj", **kw)(h)
        k = nn.Dense(self.width, name="k_proj", **kw)(h)
        v = nn.Dense(self.width, name="v_proj", **kw)(h)
        x = x + nn.Dense(self.width, name="out_proj", **kw)(attention(q, k, v, self.heads, mask))
        h = nn.LayerNorm(epsilon=1e-5, name="layer_norm2", **kw)(x)
        h = nn.Dense(self.width * 4, name="fc1", **kw)(h)
        h = quick_gelu(h) if self.activation == "quick_gelu" else nn.gelu(h, approximate=False)
        return x + nn.Dense(self.width, name="fc2", **kw)(h)


class CLIPTextTransformer(nn.Module):
    """Causal text transformer.

    Attributes:
      output_layer: -1 returns the final layer after ``final_layer_norm`` (SD 1.x); -2 returns the penultimate
        layer's output, also passed through ``final_layer_norm`` (SD 2.x / OpenCLIP convention).
    """

    vocab_size: int = 49408
    max_length: int = 77
    width: int = 768
    layers: int = 12
    heads: int = 12
    activation: str = "quick_gelu"
    output_layer: int = -1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        """tokens: [B, T] int32 with T <= max_length -> [B, T, width] float32."""
        b, t = tokens.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.Embed(self.vocab_size, self.width, name="token_embedding", **kw)(tokens)
        pos = self.param(
            "position_embedding", nn.initializers.normal(0.01), (self.max_length, self.width), self.param_dtype
        )
        x = x + pos[None, :t].astype(x.dtype)
        causal = jnp.tril(jnp.ones((t, t), dtype=bool))[None, None]
        n_run = self.layers if self.output_layer == -1 else self.layers + 1 + self.output_layer
        for i in range(n_run):
            x = CLIPEncoderLayer(self.width, self.heads, self.activation, name=f"layers_{i}", **kw)(x, causal)
        x = nn.LayerNorm(epsilon=1e-5, name="final_layer_norm", **kw)(x)
        return x.astype(jnp.float32)

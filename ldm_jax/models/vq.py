"""Vector-quantised autoencoder (the LDM paper's VQ first stages, diffusers' ``VQModel``).

``encode`` maps images [B, H, W, 3] in [-1, 1] to continuous latents [B, H/f, W/f, embed_dim] (after
``quant_conv``); ``decode`` snaps them to the nearest codebook entries and decodes. Latent diffusion models run in
the continuous space and let ``decode`` quantise, as the LDM code does.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models.autoencoder import Decoder, Encoder

Dtype = Any


class Quantized(NamedTuple):
    z_q: jax.Array  # [B, h, w, d], straight-through: its gradient flows to the encoder output
    indices: jax.Array  # [B, h, w] int32 codebook indices
    codebook_loss: jax.Array  # scalar: ||sg(z) - e||^2, moves the codes
    commitment_loss: jax.Array  # scalar: ||z - sg(e)||^2, keeps the encoder near its codes (weighted by beta)
    perplexity: jax.Array  # scalar: exp(entropy of code usage in the batch); num_codes when usage is uniform
    z: jax.Array  # [B, h, w, d] the latents as matched against the codes (unit-normalised with l2_codes)


class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook lookup with the straight-through estimator (van den Oord et al. 2017)."""

    num_codes: int
    dim: int
    # Match and quantise unit-normalised latents against unit-normalised codes (cosine similarity; Yu et al. 2022,
    # ViT-VQGAN): keeps every code in play on the sphere instead of a few large-norm codes winning.
    l2_codes: bool = False
    param_dtype: Dtype = jnp.float32

    def setup(self):
        # Uniform(-1/K, 1/K), the reference initialisation.
        k = 1.0 / self.num_codes
        self.embedding = self.param(
            "embedding",
            lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -k, k),
            (self.num_codes, self.dim),
            self.param_dtype,
        )

    def codes(self) -> jax.Array:
        """The codebook as quantisation uses it: [num_codes, dim]."""
        codes = self.embedding.astype(jnp.float32)
        return _unit(codes) if self.l2_codes else codes

    def __call__(self, z: jax.Array) -> Quantized:
        z = z.astype(jnp.float32)
        if self.l2_codes:
            z = _unit(z)
        codes = self.codes()
        flat = z.reshape(-1, self.dim)
        # ||z||^2 + ||e||^2 - 2 z.e, as the reference computes it; argmin picks the first of equal distances.
        dist = (
            jnp.sum(flat**2, axis=1, keepdims=True)
            + jnp.sum(codes**2, axis=1)[None, :]
            - 2.0 * jnp.matmul(flat, codes.T, precision=jax.lax.Precision.HIGHEST)
        )
        idx = jnp.argmin(dist, axis=1).astype(jnp.int32)
        e = codes[idx].reshape(z.shape)
        codebook_loss = jnp.mean(jnp.square(e - jax.lax.stop_gradient(z)))
        commitment_loss = jnp.mean(jnp.square(z - jax.lax.stop_gradient(e)))
        z_q = z + jax.lax.stop_gradient(e - z)
        # segment_sum, not a mean of one-hots: [N, K] one-hots are gigabytes at pod batch sizes with 16k codes.
        usage = jax.ops.segment_sum(jnp.ones_like(idx, jnp.float32), idx, self.num_codes) / idx.shape[0]
        perplexity = jnp.exp(-jnp.sum(usage * jnp.log(usage + 1e-10)))
        return Quantized(z_q, idx.reshape(z.shape[:-1]), codebook_loss, commitment_loss, perplexity, z)

    def lookup(self, indices: jax.Array) -> jax.Array:
        """indices [B, h, w] -> code vectors [B, h, w, dim]."""
        return self.codes()[indices]


def _unit(x: jax.Array) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class VQModel(nn.Module):
    """VQ autoencoder: Encoder -> quant_conv -> quantize -> post_quant_conv -> Decoder."""

    block_out_channels: Sequence[int] = (128, 256, 512)
    layers_per_block: int = 2
    latent_channels: int = 3
    embed_dim: int = 3
    num_codes: int = 8192
    l2_codes: bool = False
    in_channels: int = 3
    norm_groups: int = 32
    mid_attention: bool = True
    remat_policy: str = "none"  # of the encoder's and decoder's blocks (models/remat.py)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def setup(self):
        kw = dict(
            norm_groups=self.norm_groups,
            remat_policy=self.remat_policy,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        self.encoder = Encoder(
            self.block_out_channels, self.layers_per_block, self.latent_channels, mid_attention=self.mid_attention, **kw
        )
        self.decoder = Decoder(
            self.block_out_channels, self.layers_per_block, self.in_channels, mid_attention=self.mid_attention, **kw
        )
        one = dict(kernel_size=(1, 1), dtype=self.dtype, param_dtype=self.param_dtype)
        self.quant_conv = nn.Conv(self.embed_dim, **one)
        self.post_quant_conv = nn.Conv(self.latent_channels, **one)
        self.quantize = VectorQuantizer(
            self.num_codes, self.embed_dim, l2_codes=self.l2_codes, param_dtype=self.param_dtype
        )

    def encode(self, x: jax.Array) -> jax.Array:
        """x: [B, H, W, 3] in [-1, 1] -> continuous latents [B, H/f, W/f, embed_dim] (not yet quantised)."""
        return self.quant_conv(self.encoder(x.astype(self.dtype))).astype(jnp.float32)

    def quantize_latents(self, h: jax.Array) -> Quantized:
        return self.quantize(h)

    def decode_quantized(self, z_q: jax.Array) -> jax.Array:
        return self.decoder(self.post_quant_conv(z_q.astype(self.dtype))).astype(jnp.float32)

    def decode(self, h: jax.Array, quantize: bool = True) -> jax.Array:
        """Continuous latents -> images [B, H, W, 3] (unclipped); quantises first unless ``quantize=False``."""
        z_q = self.quantize(h).z_q if quantize else h
        return self.decode_quantized(z_q)

    def decode_indices(self, indices: jax.Array) -> jax.Array:
        """Codebook indices [B, h, w] -> images."""
        return self.decode_quantized(self.quantize.lookup(indices))

    def __call__(self, x: jax.Array) -> tuple[jax.Array, Quantized]:
        q = self.quantize(self.encode(x))
        return self.decode_quantized(q.z_q), q

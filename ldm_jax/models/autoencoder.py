"""KL-regularised convolutional autoencoder (the LDM first stage).

``encode`` maps images [B, H, W, 3] in [-1, 1] to a diagonal Gaussian over latents [B, H/f, W/f, z]; ``decode``
maps latents back. The downsampling factor is ``f = 2 ** (len(block_out_channels) - 1)``.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models.layers import Downsample, GroupNorm, ResnetBlock, SpatialSelfAttention, Upsample
from ldm_jax.models.remat import remat

Dtype = Any


def _kl(block_out_channels, latent_channels, layers_per_block=2, norm_groups=32):
    return dict(
        block_out_channels=block_out_channels,
        layers_per_block=layers_per_block,
        latent_channels=latent_channels,
        norm_groups=norm_groups,
        init_logvar=0.0,
        kind="kl",
        mid_attention=True,
        remat_policy="none",  # rematerialisation of every ResNet block and the mid attention (models/remat.py)
    )


def _vq(block_out_channels, embed_dim, num_codes):
    return dict(
        block_out_channels=block_out_channels,
        layers_per_block=2,
        latent_channels=embed_dim,
        embed_dim=embed_dim,
        num_codes=num_codes,
        l2_codes=False,
        norm_groups=32,
        kind="vq",
        mid_attention=True,
        remat_policy="none",
    )


# Named first-stage sizes. "kl_f8" is the LDM paper's / Stable Diffusion's KL-f8 autoencoder; the kl_* and vq_*
# entries follow the paper's model zoo (models/first_stage_models). Attention at intermediate resolutions
# (kl-f16/f32's and vq-f8/f16's attn_resolutions) is not modelled: mid-block attention only.
AUTOENCODER_VARIANTS = {
    "tiny_f4": _kl((32, 64, 64), 4, layers_per_block=1, norm_groups=8),
    "tiny_f8": _kl((32, 64, 64, 64), 4, layers_per_block=1, norm_groups=8),
    "kl_f4": _kl((128, 256, 512), 3),
    "kl_f8": _kl((128, 256, 512, 512), 4),
    "kl_f16": _kl((128, 128, 256, 256, 512), 16),
    "kl_f32": _kl((128, 128, 256, 256, 512, 512), 64),
    "vq_f4": _vq((128, 256, 512), 3, 8192),
    "vq_f8": _vq((128, 256, 256, 512), 4, 16384),
    "vq_f16": _vq((128, 128, 256, 256, 512), 8, 16384),
}


class DiagonalGaussian(NamedTuple):
    """Posterior q(z|x) with per-element mean and log-variance, both [B, h, w, z]."""

    mean: jax.Array
    logvar: jax.Array

    def sample(self, rng: jax.Array) -> jax.Array:
        return self.mean + jnp.exp(0.5 * self.logvar) * jax.random.normal(rng, self.mean.shape, self.mean.dtype)

    def mode(self) -> jax.Array:
        return self.mean

    def kl(self) -> jax.Array:
        """KL(q || N(0, I)) summed over latent elements: [B]."""
        kl = 0.5 * (jnp.square(self.mean) + jnp.exp(self.logvar) - 1.0 - self.logvar)
        return jnp.sum(kl, axis=(1, 2, 3))


class Encoder(nn.Module):
    block_out_channels: Sequence[int]
    layers_per_block: int
    out_channels: int
    norm_groups: int = 32
    mid_attention: bool = True
    remat_policy: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(groups=self.norm_groups, eps=1e-6, dtype=self.dtype, param_dtype=self.param_dtype)
        resnet_block = remat(ResnetBlock, self.remat_policy)
        mid_attention_block = remat(SpatialSelfAttention, self.remat_policy)
        h = nn.Conv(self.block_out_channels[0], (3, 3), dtype=self.dtype, param_dtype=self.param_dtype, name="conv_in")(
            x
        )
        for lev, ch in enumerate(self.block_out_channels):
            for j in range(self.layers_per_block):
                h = resnet_block(ch, name=f"down_blocks_{lev}_resnets_{j}", **kw)(h)
            if lev != len(self.block_out_channels) - 1:
                h = Downsample(
                    ch,
                    asymmetric_pad=True,
                    dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    name=f"down_blocks_{lev}_downsamplers_0",
                )(h)
        ch = self.block_out_channels[-1]
        h = resnet_block(ch, name="mid_block_resnets_0", **kw)(h)
        if self.mid_attention:
            h = mid_attention_block(
                self.norm_groups, dtype=self.dtype, param_dtype=self.param_dtype, name="mid_block_attentions_0"
            )(h)
        h = resnet_block(ch, name="mid_block_resnets_1", **kw)(h)
        h = GroupNorm(
            self.norm_groups, epsilon=1e-6, dtype=self.dtype, param_dtype=self.param_dtype, name="conv_norm_out"
        )(h)
        h = nn.silu(h)
        return nn.Conv(self.out_channels, (3, 3), dtype=self.dtype, param_dtype=self.param_dtype, name="conv_out")(h)


class Decoder(nn.Module):
    block_out_channels: Sequence[int]
    layers_per_block: int
    out_channels: int = 3
    norm_groups: int = 32
    mid_attention: bool = True
    remat_policy: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        kw = dict(groups=self.norm_groups, eps=1e-6, dtype=self.dtype, param_dtype=self.param_dtype)
        resnet_block = remat(ResnetBlock, self.remat_policy)
        mid_attention_block = remat(SpatialSelfAttention, self.remat_policy)
        chans = list(reversed(self.block_out_channels))
        h = nn.Conv(chans[0], (3, 3), dtype=self.dtype, param_dtype=self.param_dtype, name="conv_in")(z)
        h = resnet_block(chans[0], name="mid_block_resnets_0", **kw)(h)
        if self.mid_attention:
            h = mid_attention_block(
                self.norm_groups, dtype=self.dtype, param_dtype=self.param_dtype, name="mid_block_attentions_0"
            )(h)
        h = resnet_block(chans[0], name="mid_block_resnets_1", **kw)(h)
        for i, ch in enumerate(chans):
            for j in range(self.layers_per_block + 1):
                h = resnet_block(ch, name=f"up_blocks_{i}_resnets_{j}", **kw)(h)
            if i != len(chans) - 1:
                h = Upsample(ch, dtype=self.dtype, param_dtype=self.param_dtype, name=f"up_blocks_{i}_upsamplers_0")(h)
        h = GroupNorm(
            self.norm_groups, epsilon=1e-6, dtype=self.dtype, param_dtype=self.param_dtype, name="conv_norm_out"
        )(h)
        h = nn.silu(h)
        return nn.Conv(self.out_channels, (3, 3), dtype=self.dtype, param_dtype=self.param_dtype, name="conv_out")(h)


class AutoencoderKL(nn.Module):
    """KL autoencoder with ``encode`` / ``decode`` methods; ``__call__`` reconstructs (used for init and training)."""

    block_out_channels: Sequence[int] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    in_channels: int = 3
    norm_groups: int = 32
    # Initial log-variance of the posterior (bias of quant_conv's log-variance half). 0 is the reference init;
    # a negative value starts training with little posterior noise, which short runs need to reconstruct at all.
    init_logvar: float = 0.0
    mid_attention: bool = True
    # Rematerialisation of the encoder's and decoder's blocks (models/remat.py): memory, not parameters or results.
    remat_policy: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def setup(self):
        kw = dict(
            norm_groups=self.norm_groups,
            mid_attention=self.mid_attention,
            remat_policy=self.remat_policy,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        self.encoder = Encoder(self.block_out_channels, self.layers_per_block, 2 * self.latent_channels, **kw)
        self.decoder = Decoder(self.block_out_channels, self.layers_per_block, self.in_channels, **kw)
        one = dict(kernel_size=(1, 1), dtype=self.dtype, param_dtype=self.param_dtype)
        z = self.latent_channels

        def quant_bias_init(key, shape, dtype=jnp.float32):
            return jnp.concatenate([jnp.zeros((z,), dtype), jnp.full((z,), self.init_logvar, dtype)])

        self.quant_conv = nn.Conv(2 * z, bias_init=quant_bias_init, **one)
        self.post_quant_conv = nn.Conv(self.latent_channels, **one)

    def encode(self, x: jax.Array) -> DiagonalGaussian:
        """x: [B, H, W, 3] in [-1, 1] -> posterior over [B, H/f, W/f, latent_channels]."""
        moments = self.quant_conv(self.encoder(x.astype(self.dtype))).astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        # Clipping the log-variance as the reference does keeps exp() finite early in training.
        return DiagonalGaussian(mean, jnp.clip(logvar, -30.0, 20.0))

    def decode(self, z: jax.Array) -> jax.Array:
        """z: [B, h, w, latent_channels] -> images [B, h*f, w*f, 3] (unclipped)."""
        return self.decoder(self.post_quant_conv(z.astype(self.dtype))).astype(jnp.float32)

    def __call__(self, x: jax.Array, rng: jax.Array, sample_posterior: bool = True):
        posterior = self.encode(x)
        z = posterior.sample(rng) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

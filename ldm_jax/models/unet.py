"""Conditional UNet with cross-attention (the LDM / Stable Diffusion denoiser).

The network maps ``(x_t [B, H, W, C_in], t [B], context [B, T, D]) -> prediction [B, H, W, C_out]`` and knows
nothing about noise schedules or targets (see ``ldm_jax.diffusion``). Variants are tables of field values
(``UNET_VARIANTS``), not subclasses.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax import config_lib

from ldm_jax.models.layers import (
    Downsample,
    POSITION_EMBEDDINGS,
    GroupNorm,
    TextTimeEmbedding,
    ResnetBlock,
    SpatialTransformer,
    TimestepEmbedding,
    Upsample,
    timestep_embedding,
)
from ldm_jax.models.remat import REMAT_POLICIES, remat

Dtype = Any
ADDITION_EMBED_TYPES = ("none", "text")

# Field values of named UNet sizes. "sd15" is the Stable Diffusion 1.x UNet (860M parameters).
UNET_VARIANTS = {
    "tiny": dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        attention_levels=(False, True),
        num_heads=(2, 4),
        head_dim=0,
        transformer_depth=1,
        norm_groups=8,
    ),
    "sd15": dict(
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        attention_levels=(True, True, True, False),
        num_heads=(8, 8, 8, 8),
        head_dim=0,
        transformer_depth=1,
        norm_groups=32,
    ),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class UNetConfig(config_lib.Section):
    """``config.unet``: the UNet's sizes. Its input, output, context and class widths come from the task."""

    block_out_channels: tuple
    layers_per_block: int
    attention_levels: tuple
    num_heads: tuple
    head_dim: int
    transformer_depth: int
    norm_groups: int
    use_linear_projection: bool = False
    # "sincos": a fixed position embedding in every SpatialTransformer (layers.sincos_position_embedding), for
    # latent maps too wide for the convolutions' padding to tell the middle where it is. Not in SD's UNet: a run
    # with it cannot be exported to diffusers.
    position_embedding: str = "none"
    # "text": the prompt, pooled by attention (layers.TextTimeEmbedding), is added to the timestep embedding, so
    # every ResnetBlock sees it, not only the levels with cross-attention (diffusers' addition_embed_type="text").
    addition_embed_type: str = "none"
    addition_embed_type_num_heads: int = 4
    dropout: float = 0.0
    # Rematerialisation of the blocks (models/remat.py), trading compute for memory: "full" or "dots" for large
    # models and batches, "none" (fastest) when everything fits.
    remat_policy: str = "none"

    def validate(self, prefix: str) -> None:
        chans = tuple(self.block_out_channels)
        n = len(chans)
        self.check(n >= 1, prefix, "block_out_channels", "must name at least one level")
        self.check(all(ch >= 1 for ch in chans), prefix, "block_out_channels", "every entry must be >= 1")
        self.check(self.norm_groups >= 1, prefix, "norm_groups", "must be >= 1 and divide every level's channels")
        self.check(self.layers_per_block >= 1, prefix, "layers_per_block", "must be >= 1 (ResNet blocks per level)")
        self.check(
            self.transformer_depth >= 1,
            prefix,
            "transformer_depth",
            "must be >= 1 (transformer blocks per attention level; no attention at a level: its attention_levels "
            "entry False)",
        )
        self.check(self.head_dim >= 0, prefix, "head_dim", "must be >= 0 (0: the level's channels / num_heads)")
        self.check(
            all(ch % self.norm_groups == 0 for ch in chans),
            prefix,
            "block_out_channels",
            f"every entry must be divisible by norm_groups={self.norm_groups}",
        )
        self.check(
            all(isinstance(a, bool) for a in self.attention_levels),
            prefix,
            "attention_levels",
            "entries must be True or False (capitalised on the command line: --config.unet.attention_levels=False,True)",
        )
        self.check(len(self.attention_levels) == n, prefix, "attention_levels", f"must have {n} entries, one per level")
        self.check(len(self.num_heads) == n, prefix, "num_heads", f"must have {n} entries, one per level")
        for lev, ch in enumerate(chans):
            if self.head_dim > 0:
                self.check(ch % self.head_dim == 0, prefix, "head_dim", f"must divide every level's channels {chans}")
            else:
                heads = self.num_heads[lev]
                self.check(
                    heads >= 1 and ch % heads == 0,
                    prefix,
                    "num_heads",
                    f"entry {lev} must be >= 1 and divide {ch} channels",
                    tuple(self.num_heads),
                )
        self.check(0.0 <= self.dropout < 1.0, prefix, "dropout", "must be in [0, 1)")
        self.check(
            self.position_embedding in POSITION_EMBEDDINGS,
            prefix,
            "position_embedding",
            f"must be one of {POSITION_EMBEDDINGS}",
        )
        self.check(
            self.addition_embed_type in ADDITION_EMBED_TYPES,
            prefix,
            "addition_embed_type",
            f"must be one of {ADDITION_EMBED_TYPES}",
        )
        self.check(self.addition_embed_type_num_heads >= 1, prefix, "addition_embed_type_num_heads", "must be >= 1")
        self.check(self.remat_policy in REMAT_POLICIES, prefix, "remat_policy", f"must be one of {REMAT_POLICIES}")

    def build(self, *, in_channels: int, out_channels: int, context_dim: int, num_classes: int = 0, dtype=jnp.float32):
        """The UNet of this section; the widths of its input, output, context and class embedding come from the
        rest of the task (first stage, concat conditioning, text encoder, labels)."""
        return UNet(
            in_channels=in_channels,
            out_channels=out_channels,
            block_out_channels=tuple(self.block_out_channels),
            layers_per_block=self.layers_per_block,
            attention_levels=tuple(self.attention_levels),
            num_heads=tuple(self.num_heads),
            head_dim=self.head_dim,
            transformer_depth=self.transformer_depth,
            context_dim=context_dim,
            norm_groups=self.norm_groups,
            use_linear_projection=self.use_linear_projection,
            position_embedding=self.position_embedding,
            addition_embed_type=self.addition_embed_type,
            addition_embed_type_num_heads=self.addition_embed_type_num_heads,
            dropout=self.dropout,
            num_classes=num_classes,
            remat_policy=self.remat_policy,
            dtype=dtype,
        )


def unet_section(variant: dict | None = None, **overrides):
    """A ``config.unet`` section: the sizes of ``variant`` (a ``UNET_VARIANTS`` entry), then ``overrides``."""
    return UNetConfig.defaults(**{**(variant or {}), **overrides})


class UNet(nn.Module):
    """Denoising UNet.

    Attributes:
      block_out_channels: channels per resolution level; each level but the last halves the resolution.
      layers_per_block: ResNet blocks per level on the way down (one more on the way up).
      attention_levels: whether each level has a SpatialTransformer after every ResNet block.
      num_heads / head_dim: heads per level; when ``head_dim > 0`` it wins and heads = channels // head_dim.
      context_dim: width of the conditioning sequence (text encoder output); 0 for models without one, whose
        transformer blocks then attend to the feature map in both attention layers (as LDM does without context).
      position_embedding: "sincos" adds a fixed position embedding to every SpatialTransformer's tokens.
      addition_embed_type: "text" adds the attention-pooled context to the timestep embedding (needs context).
      num_classes: > 0 adds a learned class embedding to the timestep embedding, with one extra row (index
        ``num_classes``) for the null class that classifier-free guidance conditions on.
      remat_policy: rematerialisation of every ResNet block and SpatialTransformer (a name in
        ``ldm_jax.models.remat.REMAT_POLICIES``); changes memory and compute, never the parameters or the result.
    """

    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: Sequence[int] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    attention_levels: Sequence[bool] = (True, True, True, False)
    num_heads: Sequence[int] = (8, 8, 8, 8)
    head_dim: int = 0
    transformer_depth: int = 1
    context_dim: int = 768
    norm_groups: int = 32
    use_linear_projection: bool = False
    position_embedding: str = "none"
    addition_embed_type: str = "none"
    addition_embed_type_num_heads: int = 4
    dropout: float = 0.0
    num_classes: int = 0
    remat_policy: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _heads(self, level: int) -> tuple[int, int]:
        ch = self.block_out_channels[level]
        if self.head_dim > 0:
            return ch // self.head_dim, self.head_dim
        heads = self.num_heads[level]
        return heads, ch // heads

    def _resnet(self, ch: int, name: str) -> ResnetBlock:
        # Argument 3 (self = 0) is the Python bool ``deterministic``: static under remat.
        return remat(ResnetBlock, self.remat_policy, static_argnums=(3,))(
            ch,
            groups=self.norm_groups,
            eps=1e-5,
            dropout=self.dropout,
            zero_init_last=True,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )

    def _transformer(self, level: int, name: str) -> SpatialTransformer:
        heads, head_dim = self._heads(level)
        return remat(SpatialTransformer, self.remat_policy)(
            heads,
            head_dim,
            depth=self.transformer_depth,
            groups=self.norm_groups,
            use_linear_projection=self.use_linear_projection,
            position_embedding=self.position_embedding,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        context: jax.Array | None = None,
        train: bool = False,
        class_labels: jax.Array | None = None,
    ) -> jax.Array:
        det = not train
        chans = self.block_out_channels
        nlev = len(chans)
        temb = timestep_embedding(t, chans[0])
        temb = TimestepEmbedding(chans[0] * 4, dtype=self.dtype, param_dtype=self.param_dtype, name="time_embedding")(
            temb.astype(self.dtype)
        )
        if self.num_classes:
            if class_labels is None:
                raise ValueError(
                    f"UNet(num_classes={self.num_classes}) needs class_labels [B] (null class = num_classes)"
                )
            temb = temb + nn.Embed(
                self.num_classes + 1,
                chans[0] * 4,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="class_embedding",
            )(class_labels)
        if (context is None) != (self.context_dim == 0):
            raise ValueError(
                f"UNet(context_dim={self.context_dim}): context must be given exactly when context_dim > 0"
            )
        context = None if context is None else context.astype(self.dtype)
        if self.addition_embed_type == "text":
            if context is None:
                raise ValueError("UNet(addition_embed_type='text') pools the context: it needs context_dim > 0")
            temb = temb + TextTimeEmbedding(
                chans[0] * 4,
                self.addition_embed_type_num_heads,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="add_embedding",
            )(context)

        h = nn.Conv(chans[0], (3, 3), dtype=self.dtype, param_dtype=self.param_dtype, name="conv_in")(
            x.astype(self.dtype)
        )
        skips = [h]
        for lev, ch in enumerate(chans):
            for j in range(self.layers_per_block):
                h = self._resnet(ch, f"down_blocks_{lev}_resnets_{j}")(h, temb, det)
                if self.attention_levels[lev]:
                    h = self._transformer(lev, f"down_blocks_{lev}_attentions_{j}")(h, context)
                skips.append(h)
            if lev != nlev - 1:
                h = Downsample(
                    ch, dtype=self.dtype, param_dtype=self.param_dtype, name=f"down_blocks_{lev}_downsamplers_0"
                )(h)
                skips.append(h)

        h = self._resnet(chans[-1], "mid_block_resnets_0")(h, temb, det)
        h = self._transformer(nlev - 1, "mid_block_attentions_0")(h, context)
        h = self._resnet(chans[-1], "mid_block_resnets_1")(h, temb, det)

        for i, lev in enumerate(reversed(range(nlev))):
            ch = chans[lev]
            for j in range(self.layers_per_block + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = self._resnet(ch, f"up_blocks_{i}_resnets_{j}")(h, temb, det)
                if self.attention_levels[lev]:
                    h = self._transformer(lev, f"up_blocks_{i}_attentions_{j}")(h, context)
            if lev != 0:
                h = Upsample(ch, dtype=self.dtype, param_dtype=self.param_dtype, name=f"up_blocks_{i}_upsamplers_0")(h)

        h = GroupNorm(
            self.norm_groups, epsilon=1e-5, dtype=self.dtype, param_dtype=self.param_dtype, name="conv_norm_out"
        )(h)
        h = nn.silu(h)
        # Zero-initialised output convolution: the untrained model predicts exactly zero (LDM's zero_module).
        h = nn.Conv(
            self.out_channels,
            (3, 3),
            kernel_init=nn.initializers.zeros,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="conv_out",
        )(h)
        return h.astype(jnp.float32)

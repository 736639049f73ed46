"""The first-stage autoencoder a config's ``model`` section describes: its section (KL or VQ) and the module.

Both the first-stage task (which trains it) and the latent diffusion tasks (which freeze it) build it from here, as
do the converters (from a diffusers or CompVis config's fields).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax.numpy as jnp

from ldm_jax import config_lib
from ldm_jax.models.autoencoder import AutoencoderKL
from ldm_jax.models.remat import REMAT_POLICIES
from ldm_jax.models.vq import VQModel

KINDS = ("kl", "vq")


@dataclasses.dataclass(frozen=True, kw_only=True)
class _ModelCommon(config_lib.Section):
    kind: str
    block_out_channels: tuple
    layers_per_block: int
    latent_channels: int
    norm_groups: int
    mid_attention: bool = True
    # Rematerialisation of every ResNet block and the mid attention (models/remat.py): memory, never results.
    remat_policy: str = "none"

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def validate(self, prefix: str) -> None:
        self.check(self.kind in KINDS, prefix, "kind", f"must be one of {KINDS}")
        chans = tuple(self.block_out_channels)
        self.check(len(chans) >= 1, prefix, "block_out_channels", "must name at least one level")
        self.check(all(ch >= 1 for ch in chans), prefix, "block_out_channels", "every entry must be >= 1")
        self.check(self.norm_groups >= 1, prefix, "norm_groups", "must be >= 1 and divide every level's channels")
        self.check(
            all(ch % self.norm_groups == 0 for ch in chans),
            prefix,
            "block_out_channels",
            f"every entry must be divisible by norm_groups={self.norm_groups}",
        )
        self.check(self.latent_channels >= 1, prefix, "latent_channels", "must be >= 1")
        self.check(self.layers_per_block >= 1, prefix, "layers_per_block", "must be >= 1")
        self.check(self.remat_policy in REMAT_POLICIES, prefix, "remat_policy", f"must be one of {REMAT_POLICIES}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class KLModelConfig(_ModelCommon):
    """``model`` of a KL autoencoder (``AutoencoderKL``)."""

    kind: str = "kl"
    # Initial log-variance of the posterior: 0 is the reference's; short runs start lower to reconstruct at all.
    init_logvar: float = 0.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class VQModelConfig(_ModelCommon):
    """``model`` of a VQ autoencoder (``VQModel``); ``latent_channels`` is the encoder's output width."""

    kind: str = "vq"
    embed_dim: int = 3
    num_codes: int = 8192
    l2_codes: bool = False  # cosine-similarity codes (l2-normalised latents and codes)

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        self.check(self.num_codes >= 2, prefix, "num_codes", "must be >= 2")
        self.check(self.embed_dim >= 1, prefix, "embed_dim", "must be >= 1")


def model_config(model: Mapping, prefix: str = "model.") -> KLModelConfig | VQModelConfig:
    """A ``model`` section (or converter fields) read and validated as the section its ``kind`` names."""
    kind = dict(model).get("kind")
    if kind not in KINDS:
        config_lib.fail(f"{prefix}kind", kind, f"must be one of {KINDS}")
    cls = KLModelConfig if kind == "kl" else VQModelConfig
    return cls.from_config(model, prefix)


def build_autoencoder(model: Mapping, dtype: str = "float32", remat_policy: str | None = None):
    """The module of a ``model`` section: ``AutoencoderKL`` or ``VQModel``. ``remat_policy`` overrides the
    section's (a frozen first stage is never differentiated, so remat would only recompute)."""
    m = model if isinstance(model, _ModelCommon) else model_config(model)
    common = dict(
        block_out_channels=tuple(m.block_out_channels),
        layers_per_block=m.layers_per_block,
        latent_channels=m.latent_channels,
        norm_groups=m.norm_groups,
        mid_attention=m.mid_attention,
        remat_policy=m.remat_policy if remat_policy is None else remat_policy,
        dtype=jnp.dtype(dtype),
    )
    if m.kind == "vq":
        return VQModel(embed_dim=m.embed_dim, num_codes=m.num_codes, l2_codes=m.l2_codes, **common)
    return AutoencoderKL(init_logvar=m.init_logvar, **common)


def latent_channels(model: Mapping) -> int:
    """Channels of the latents a first stage hands the diffusion model: the code width of a VQ model (its
    pre-quantisation latents), the posterior's channels of a KL one."""
    m = dict(model)
    return int(m["embed_dim"] if m["kind"] == "vq" else m["latent_channels"])

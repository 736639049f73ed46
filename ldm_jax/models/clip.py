"""CLIP in Flax: a ViT image tower and the causal text tower, each with its projection into the joint space.

The networks of OpenAI CLIP (``transformers.CLIPModel``) and OpenCLIP (``open_clip.model.CLIP`` with ViT and the
default text tower) are the same; they differ only in weight names (converted by ``ldm_jax.interop.clip_weights``)
and in the MLP activation, a field here: ``quick_gelu`` (``x * sigmoid(1.702 x)``) for OpenAI's models, exact
``gelu`` for OpenCLIP's own (LAION) ones.

- Image tower (:class:`CLIPVisionTransformer`): pixels [B, S, S, 3] (NHWC, already resized and normalised with the
  model's mean / std) -> patch convolution without bias -> a learned class token in front -> learned positional
  embedding -> pre-LayerNorm (``pre_layrnorm``, OpenCLIP's ``ln_pre``) -> pre-LN encoder layers -> post-LayerNorm of
  the class token -> projection without bias -> [B, embed_dim].
- Text tower (:meth:`CLIP.encode_text`): ``CLIPTextTransformer`` (the Stable Diffusion text encoder: final-layer
  LayerNorm output) -> the hidden state at the end-of-text token -> projection without bias -> [B, embed_dim].

Embeddings are returned without L2 normalisation (``get_image_features`` / ``encode_image(normalize=False)``).
Every LayerNorm has eps 1e-5, as both references.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models.text_encoders import CLIPEncoderLayer, CLIPTextTransformer

Dtype = Any

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
LAYER_NORM_EPS = 1e-5  # fixed in CLIPEncoderLayer / CLIPTextTransformer; both references use it
ACTIVATIONS = ("quick_gelu", "gelu")
PAD_TOKENS = ("eot", "zero")  # ldm_jax.data.tokenizer.CLIPTokenizer's pad_token

# The fields of the CLIP module (the architecture); a variant adds how its inputs are made (below).
MODEL_FIELDS = (
    "image_size",
    "patch_size",
    "vision_width",
    "vision_layers",
    "vision_heads",
    "text_width",
    "text_layers",
    "text_heads",
    "vocab_size",
    "context_length",
    "embed_dim",
    "activation",
)
# Per variant besides the model fields: ``pad_token`` of the tokenizer ("eot": pads with <|endoftext|> 49407 as
# OpenAI / transformers; "zero": pads with 0 as OpenCLIP's tokenizer; the embeddings do not depend on it, see
# CLIP.encode_text), ``mean`` / ``std`` of the pixel normalisation (RGB, on [0, 1] pixels) and ``layer_norm_eps``.
_OPENAI = dict(mean=OPENAI_MEAN, std=OPENAI_STD, layer_norm_eps=LAYER_NORM_EPS, vocab_size=49408, context_length=77)
CLIP_VARIANTS = {
    # The parity tests' size (transformers and open_clip models of these shapes, random weights).
    "tiny": dict(
        _OPENAI,
        image_size=32,
        patch_size=8,
        vision_width=64,
        vision_layers=2,
        vision_heads=4,
        text_width=48,
        text_layers=2,
        text_heads=4,
        embed_dim=32,
        activation="quick_gelu",
        pad_token="eot",
    ),
    # openai/clip-vit-base-patch16 (OpenAI ViT-B/16).
    "vit_b16": dict(
        _OPENAI,
        image_size=224,
        patch_size=16,
        vision_width=768,
        vision_layers=12,
        vision_heads=12,
        text_width=512,
        text_layers=12,
        text_heads=8,
        embed_dim=512,
        activation="quick_gelu",
        pad_token="eot",
    ),
    # openai/clip-vit-large-patch14 (OpenAI ViT-L/14; its text tower is Stable Diffusion 1.x's text encoder).
    "vit_l14": dict(
        _OPENAI,
        image_size=224,
        patch_size=14,
        vision_width=1024,
        vision_layers=24,
        vision_heads=16,
        text_width=768,
        text_layers=12,
        text_heads=12,
        embed_dim=768,
        activation="quick_gelu",
        pad_token="eot",
    ),
    # OpenCLIP ViT-H-14 laion2b_s32b_b79k (the text tower family of Stable Diffusion 2.x). Its vision heads are
    # 80 wide (OpenCLIP's ViT-H-14.json: head_width 80), not 64. OpenCLIP normalises with OpenAI's mean / std.
    "vit_h14": dict(
        _OPENAI,
        image_size=224,
        patch_size=14,
        vision_width=1280,
        vision_layers=32,
        vision_heads=16,
        text_width=1024,
        text_layers=24,
        text_heads=16,
        embed_dim=1024,
        activation="gelu",
        pad_token="zero",
    ),
}


def validate_fields(fields: dict, what: str = "CLIP fields") -> None:
    """Raises ValueError naming the field, its value and the rule, for fields a CLIP cannot be built from."""
    missing = [k for k in MODEL_FIELDS if k not in fields]
    if missing:
        raise ValueError(f"{what}: missing fields {missing}")
    if fields["activation"] not in ACTIVATIONS:
        raise ValueError(f"{what}: activation={fields['activation']!r}; must be one of {ACTIVATIONS}")
    if "pad_token" in fields and fields["pad_token"] not in PAD_TOKENS:
        raise ValueError(f"{what}: pad_token={fields['pad_token']!r}; must be one of {PAD_TOKENS}")
    if "layer_norm_eps" in fields and fields["layer_norm_eps"] != LAYER_NORM_EPS:
        raise ValueError(f"{what}: layer_norm_eps={fields['layer_norm_eps']}; ldm_jax's CLIP uses {LAYER_NORM_EPS}")
    for tower in ("vision", "text"):
        width, heads = fields[f"{tower}_width"], fields[f"{tower}_heads"]
        if heads < 1 or width % heads:
            raise ValueError(f"{what}: {tower}_heads={heads} must divide {tower}_width={width}")
    if fields["image_size"] % fields["patch_size"]:
        raise ValueError(
            f"{what}: image_size={fields['image_size']} must be a multiple of patch_size={fields['patch_size']}"
        )


def build_clip(fields: dict, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32) -> CLIP:
    """The CLIP module of a variant's (or a loaded checkpoint's) fields; extra keys (mean, std, ...) are ignored."""
    validate_fields(fields)
    return CLIP(**{k: fields[k] for k in MODEL_FIELDS}, dtype=dtype, param_dtype=param_dtype)


class CLIPVisionTransformer(nn.Module):
    """The ViT image tower: pixels [B, S, S, 3] (NHWC, normalised; S = image_size) -> image embeddings [B, embed_dim].

    Submodule names follow ``transformers.CLIPVisionModel`` (``patch_embedding``, ``pre_layrnorm``, ``layers_i``,
    ``post_layernorm``) plus ``visual_projection``, which transformers keeps on ``CLIPModel``.
    """

    image_size: int = 224
    patch_size: int = 14
    width: int = 1024
    layers: int = 24
    heads: int = 16
    embed_dim: int = 768
    activation: str = "quick_gelu"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        b, h, w, c = pixels.shape
        if (h, w, c) != (self.image_size, self.image_size, 3):
            raise ValueError(
                f"CLIPVisionTransformer: pixels of shape {pixels.shape}; expected [B, {self.image_size}, "
                f"{self.image_size}, 3] (resize and crop first: ldm_jax.evaluation.clip_score.preprocess)"
            )
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        p = self.patch_size
        x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", use_bias=False, name="patch_embedding", **kw)(
            pixels.astype(self.dtype)
        )
        x = x.reshape(b, -1, self.width)
        cls = self.param("class_embedding", nn.initializers.normal(self.width**-0.5), (self.width,), self.param_dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, self.width)), x], axis=1)
        n = (self.image_size // p) ** 2 + 1
        pos = self.param("position_embedding", nn.initializers.normal(0.02), (n, self.width), self.param_dtype)
        x = x + pos[None].astype(x.dtype)
        x = nn.LayerNorm(epsilon=LAYER_NORM_EPS, name="pre_layrnorm", **kw)(x)
        for i in range(self.layers):
            x = CLIPEncoderLayer(self.width, self.heads, self.activation, name=f"layers_{i}", **kw)(x, None)
        pooled = nn.LayerNorm(epsilon=LAYER_NORM_EPS, name="post_layernorm", **kw)(x[:, 0])
        out = nn.Dense(self.embed_dim, use_bias=False, name="visual_projection", **kw)(pooled)
        return out.astype(jnp.float32)


class CLIP(nn.Module):
    """Both towers. ``encode_image(pixels [B, S, S, 3]) -> [B, embed_dim]``, ``encode_text(tokens [B, T]) ->
    [B, embed_dim]`` (float32, not L2-normalised); ``__call__`` returns both (it is what ``init`` traces).

    Parameters: ``vision_model`` (:class:`CLIPVisionTransformer`), ``text_model`` (``CLIPTextTransformer``, the
    Stable Diffusion text encoder's layout) and ``text_projection``.
    """

    image_size: int = 224
    patch_size: int = 14
    vision_width: int = 1024
    vision_layers: int = 24
    vision_heads: int = 16
    text_width: int = 768
    text_layers: int = 12
    text_heads: int = 12
    vocab_size: int = 49408
    context_length: int = 77
    embed_dim: int = 768
    activation: str = "quick_gelu"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.vision_model = CLIPVisionTransformer(
            self.image_size,
            self.patch_size,
            self.vision_width,
            self.vision_layers,
            self.vision_heads,
            self.embed_dim,
            self.activation,
            **kw,
        )
        self.text_model = CLIPTextTransformer(
            vocab_size=self.vocab_size,
            max_length=self.context_length,
            width=self.text_width,
            layers=self.text_layers,
            heads=self.text_heads,
            activation=self.activation,
            output_layer=-1,
            **kw,
        )
        self.text_projection = nn.Dense(self.embed_dim, use_bias=False, **kw)

    def encode_image(self, pixels: jax.Array) -> jax.Array:
        """pixels [B, S, S, 3] float (normalised) -> [B, embed_dim] float32."""
        return self.vision_model(pixels)

    def encode_text(self, tokens: jax.Array) -> jax.Array:
        """tokens [B, T] int (T <= context_length, each row holding an end-of-text token) -> [B, embed_dim] float32.

        Pools the final-LayerNorm output at ``argmax(tokens)``, as OpenCLIP (``pool_type="argmax"``) and transformers
        for configs with the legacy ``eos_token_id=2``; transformers with ``eos_token_id=49407`` takes the first
        49407 instead, the same position: <|endoftext|> = 49407 is the largest id of the vocabulary and argmax
        returns its first occurrence. So either pad convention ("eot" 49407 or 0) pools the same row, and since
        attention is causal nothing after it changes it.
        """
        hidden = self.text_model(tokens)
        eot = jnp.argmax(tokens, axis=-1)
        pooled = jnp.take_along_axis(hidden, eot[:, None, None], axis=1)[:, 0]
        return self.text_projection(pooled.astype(self.dtype)).astype(jnp.float32)

    def __call__(self, pixels: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.encode_image(pixels), self.encode_text(tokens)

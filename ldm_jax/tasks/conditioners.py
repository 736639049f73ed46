"""What conditions a latent diffusion UNet: text, a class label, a noise level, or nothing.

A conditioner owns its config section and its part of every stage of a task's life:

- model: the widths it gives the UNet (``context_dim``, ``unet_classes``), its own trained weights (the text encoder
  when trainable, a class-token table) and frozen ones (``setup_frozen``), and how its encoded condition enters the
  UNet (``unet_inputs``: the cross-attention context or the class label);
- training: the batch's condition with dropped examples replaced by the null condition (classifier-free guidance);
- sampling: host-side conditions (prompts, class ids, levels) -> arrays (``condition_inputs``, ``null_inputs``),
  checks, preview conditions, and the ``ldm_jax.sample`` flags it reads (``FLAGS``);
- evaluation: the conditions and the attributes to read back for dataset examples.

``guided``: whether sampling uses classifier-free guidance (unconditional and super-resolution models have no null
condition to guide against).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from ldm_jax import config_lib
from ldm_jax.data import latent_cache, pipeline, shapes
from ldm_jax.data.tokenizer import CLIPTokenizer
from ldm_jax.evaluation import attributes
from ldm_jax.models.text_encoders import CLIPTextTransformer
from ldm_jax.tasks.protocol import SampleInputs
from ldm_jax.training import checkpoint

ACTIVATIONS = ("quick_gelu", "gelu")
PAD_TOKENS = ("eot", "zero")
# How a class label enters the UNet (``class_conditioning``): "timestep", a learned embedding added to the timestep
# embedding (ADM; diffusers' num_class_embeds); "cross_attention", a learned embedding as a one-token context of every
# SpatialTransformer's cross-attention (LDM's class-conditional ImageNet models: ClassEmbedder, conditioning_key
# crossattn).
CLASS_CONDITIONINGS = ("timestep", "cross_attention")


def class_conditioning(config) -> str:
    """A class-conditional run's ``class_conditioning``; runs written before the field existed used "timestep"."""
    return config.get("class_conditioning", "timestep")


def _caption(example) -> str:
    c = example["caption"]
    return c.decode("utf-8") if isinstance(c, bytes) else str(c)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TextEncoderConfig(config_lib.Section):
    """``config.text_encoder``: a CLIP-style text transformer and its tokenizer."""

    vocab_size: int = 49408
    width: int
    layers: int
    heads: int
    max_length: int
    activation: str = "quick_gelu"
    output_layer: int = -1  # -1: the last layer (SD 1.x); -2: the penultimate (SD 2.x / OpenCLIP)
    pad_token: str = "eot"  # SD 1.x pads with end-of-text, SD 2.x / OpenCLIP with 0
    # False: frozen at the weights of ``init_from`` and passed to the step in ``frozen``.
    trainable: bool = True

    def validate(self, prefix: str) -> None:
        self.check(self.max_length >= 2, prefix, "max_length", "must be >= 2")
        self.check(self.width >= 1, prefix, "width", "must be >= 1")
        self.check(self.vocab_size >= 49408, prefix, "vocab_size",
                   "must be >= 49408, the CLIP tokenizer's vocabulary (its token ids index the embedding)")  # fmt: skip
        self.check(self.layers >= 1, prefix, "layers", "must be >= 1")
        self.check(
            self.heads >= 1 and self.width % self.heads == 0,
            prefix,
            "heads",
            f"must be >= 1 and divide {prefix}width={self.width}",
        )
        self.check(
            self.output_layer == -1 or self.layers >= 2,
            prefix,
            "output_layer",
            f"-2 (the penultimate layer) needs {prefix}layers >= 2",
        )
        self.check(self.output_layer in (-1, -2), prefix, "output_layer", "must be -1 (last) or -2 (penultimate)")
        self.check(self.pad_token in PAD_TOKENS, prefix, "pad_token", "must be 'eot' or 'zero'")
        self.check(self.activation in ACTIVATIONS, prefix, "activation", "must be 'quick_gelu' or 'gelu'")


def text_encoder_section(variant: dict, **overrides):
    """A ``config.text_encoder`` section: the sizes of ``variant`` (a ``TEXT_ENCODER_VARIANTS`` entry)."""
    return TextEncoderConfig.defaults(**{**variant, **overrides})


class TextConditioner:
    """Cross-attention on a CLIP-style text encoder's output; the empty prompt is the null condition."""

    FLAGS = ("prompt", "prompts_file", "negative_prompt")
    NEEDS = "a text-conditioned run"
    guided = True
    num_classes = 0
    unet_classes = 0
    label_field = None

    def __init__(self, config, dtype):
        self.config = config
        self.dtype = dtype
        self.fingerprint = None  # of the frozen text encoder, for a run on a latent cache (``check_cache``)
        te = TextEncoderConfig.from_config(config.text_encoder, "text_encoder.")
        self.trainable = te.trainable
        self.context_dim = te.width
        self.tokenizer = CLIPTokenizer(te.max_length, te.pad_token)
        self.text_encoder = CLIPTextTransformer(
            vocab_size=te.vocab_size,
            max_length=te.max_length,
            width=te.width,
            layers=te.layers,
            heads=te.heads,
            activation=te.activation,
            output_layer=te.output_layer,
            dtype=dtype,
        )
        self.null_tokens = jnp.asarray(self.tokenizer([""])[0])

    @staticmethod
    def validate(config) -> None:
        te = TextEncoderConfig.from_config(config.text_encoder, "text_encoder.")
        cache = pipeline.cache_info(config.data)
        cached = cache["text_encoder"] if cache else None
        if cached:
            spec = config.data.source
            config_lib.check(not te.trainable, "text_encoder.trainable", te.trainable,
                             f"must be False: {spec!r} holds the embeddings of a frozen text encoder "
                             f"({cached['workdir']!r}); set init_from to that workdir")  # fmt: skip
            for field in ("width", "max_length"):
                config_lib.check(getattr(te, field) == cached[field], f"text_encoder.{field}", getattr(te, field),
                                 f"must be {cached[field]}, as in the text encoder of {spec!r}")  # fmt: skip
        prompts = config.sample.prompts
        config_lib.check(len(prompts) >= 1, "sample.prompts", prompts, "must hold at least one prompt for previews")

    # ---- model -------------------------------------------------------------------------------------------------
    def init(self, rng):
        """(UNet init key, this part's trained params, the UNet's example (context, class labels))."""
        k_unet, k_text = jax.random.split(rng)
        tokens = jnp.zeros((1, self.tokenizer.max_length), jnp.int32)
        text_params = self.text_encoder.init({"params": k_text}, tokens)["params"]
        context = self.text_encoder.apply({"params": text_params}, tokens)
        return k_unet, ({"text": text_params} if self.trainable else {}), (context, None)

    def setup_frozen(self, frozen: dict) -> None:
        if not self.trainable:
            if not self.config.init_from:
                raise ValueError(
                    "text_encoder.trainable=False: a frozen text encoder needs trained weights; set init_from to a "
                    "txt2img workdir whose text encoder to freeze"
                )
            src, _, _ = checkpoint.load_trained_params(self.config.init_from, "ema")
            frozen["text"] = src["text"]
            if pipeline.is_latent_cache(self.config.data.source):
                self.fingerprint = latent_cache.fingerprint(frozen["text"])
                # A run on cached text embeddings gives dropped examples (classifier-free guidance) the empty
                # prompt's embedding, as a run from tokens does.
                null = self.text_encoder.apply({"params": frozen["text"]}, self.null_tokens[None, :])
                frozen["null_context"] = np.asarray(null)

    def check_cache(self, info: dict) -> None:
        """Raises ValueError unless the latent cache's text embeddings (if any) come from this run's frozen text
        encoder (training only)."""
        made_by = info["text_encoder"]
        if made_by and self.fingerprint != made_by["fingerprint"]:
            raise ValueError(
                f"data.source={self.config.data.source!r}: its text embeddings come from the text encoder of "
                f"{made_by['workdir']!r}, but init_from={self.config.init_from!r} holds another; train from that "
                "workdir or cache again"
            )

    def encode(self, params, frozen, tokens):
        text = params["text"] if self.trainable else frozen["text"]
        return self.text_encoder.apply({"params": text}, tokens)

    @staticmethod
    def unet_inputs(context):
        return context, None

    def training_condition(self, params, frozen, batch, drop):
        if "context" in batch:  # a latent cache with text embeddings: no text encoder in the step
            null = frozen["null_context"].astype(self.dtype)
            return jnp.where(drop[:, None, None], null, batch["context"].astype(self.dtype))
        tokens = jnp.where(drop[:, None], self.null_tokens[None, :], batch["tokens"])
        return self.encode(params, frozen, tokens)

    # ---- sampling ----------------------------------------------------------------------------------------------
    def condition_inputs(self, prompts):
        return self.tokenizer(list(prompts))

    def null_inputs(self, n, negative=None):
        """Token ids of the negative prompt (default: the empty prompt the model was trained to ignore)."""
        return self.tokenizer([negative or ""] * n)

    def check(self, prompts) -> None:
        pass

    def preview_conditions(self) -> tuple[list, Any]:
        s = self.config.sample
        return list(s.prompts), s.negative_prompt

    def sample_conditions(self, inputs: SampleInputs, sources: int | None) -> tuple[list, list[dict], Any, bool]:
        """(conditions, manifest fields per source, negative, repeats) from the sample flags."""
        if not inputs.prompts:
            raise ValueError("no prompts: pass --prompt (repeatable) or --prompts_file")
        limit = self.tokenizer.max_length - 2
        long = [p for p in inputs.prompts if len(self.tokenizer.tokenize(p)) > limit]
        if long:
            logging.warning("%d prompt(s) exceed %d tokens and are truncated: %s", len(long), limit, long)
        negative = self.config.sample.negative_prompt if inputs.negative_prompt is None else inputs.negative_prompt
        describe = [dict(prompt=p, truncated=p in long) for p in inputs.prompts]
        return list(inputs.prompts), describe, negative, True

    # ---- evaluation --------------------------------------------------------------------------------------------
    def eval_conditions(self, examples) -> tuple[list, list[dict], Any]:
        """(conditions, the attributes each generated image should show, negative) of dataset examples."""
        prompts = [_caption(e) for e in examples]
        return prompts, [attributes.parse_caption(p) for p in prompts], self.config.sample.negative_prompt

    @staticmethod
    def distribution_conditions(examples) -> tuple[list, list[str] | None]:
        """(conditions, prompts or None) of dataset examples, for distribution metrics (FID, CLIP score)."""
        prompts = [_caption(e) for e in examples]
        return prompts, prompts


def _class_names(config) -> list[str]:
    """Class names of a run whose labels come from its data source ([] for the shapes labelings)."""
    if config.classes != pipeline.SOURCE_LABELS:
        return []
    return pipeline.source_class_names(config.data)


class ClassConditioner:
    """A learned class embedding, added to the timestep embedding or given to the cross-attention as a one-token
    context (``class_conditioning``); class ``num_classes`` is the null class."""

    FLAGS = ("class_label",)
    NEEDS = "a class-conditional run"
    guided = True
    tokenizer = None

    def __init__(self, config, dtype):
        self.config = config
        self.label_field = config.classes
        self.source_names = _class_names(config)
        self.num_classes = len(self.source_names) if self.source_names else shapes.num_classes(config.classes)
        self.cross_attention = class_conditioning(config) == "cross_attention"
        self.context_dim = int(config.class_context_dim) if self.cross_attention else 0
        self.unet_classes = 0 if self.cross_attention else self.num_classes
        # One row per class and one for the null class (classifier-free guidance).
        self.embedder = nn.Embed(self.num_classes + 1, self.context_dim, dtype=dtype) if self.cross_attention else None

    @staticmethod
    def validate(config) -> None:
        labelings = tuple(shapes.LABELINGS) + (pipeline.SOURCE_LABELS,)
        config_lib.check(config.classes in labelings, "classes", config.classes, f"must be one of {labelings}")
        if config.classes == pipeline.SOURCE_LABELS:
            config_lib.check(bool(config.data.source), "classes", config.classes,
                             "labels from the source need data.source (class sub-folders, a TFDS label feature)")  # fmt: skip
            names = _class_names(config)
            config_lib.check(len(names) >= 2, "classes", config.classes,
                             f"the source {config.data.source!r} names {len(names)} classes; need >= 2")  # fmt: skip
            n = len(names)
        else:
            n = shapes.num_classes(config.classes)
        labels = tuple(config.sample.class_labels)
        config_lib.check(len(labels) >= 1, "sample.class_labels", labels, "must hold at least one class for previews")
        config_lib.check(all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < n for x in labels),
                         "sample.class_labels", labels, f"must be integers in [0, {n})")  # fmt: skip
        how = class_conditioning(config)
        config_lib.check(how in CLASS_CONDITIONINGS, "class_conditioning", how, f"must be one of {CLASS_CONDITIONINGS}")
        if how == "cross_attention":
            dim = config.class_context_dim
            config_lib.check(
                dim >= 1, "class_context_dim", dim, "must be >= 1 with class_conditioning='cross_attention'"
            )
            levels = tuple(config.unet.attention_levels)
            config_lib.check(any(levels), "unet.attention_levels", levels,
                             "needs at least one level with attention for class_conditioning='cross_attention' "
                             "(the class token is the cross-attention's context)")  # fmt: skip

    def init(self, rng):
        if not self.cross_attention:
            return rng, {}, (None, jnp.zeros((1,), jnp.int32))
        k_unet, k_emb = jax.random.split(rng)
        labels = jnp.zeros((1,), jnp.int32)
        params = {"class_embedding": self.embedder.init({"params": k_emb}, labels)["params"]}
        return k_unet, params, (self.encode(params, None, labels), None)

    def setup_frozen(self, frozen: dict) -> None:
        pass

    def encode(self, params, frozen, labels):
        """The UNet's condition: the labels, or with cross-attention their embeddings as [B, 1, class_context_dim]."""
        if not self.cross_attention:
            return labels
        return self.embedder.apply({"params": params["class_embedding"]}, labels)[:, None, :]

    def unet_inputs(self, cond):
        return (cond, None) if self.cross_attention else (None, cond)

    def training_condition(self, params, frozen, batch, drop):
        labels = jnp.where(drop, self.num_classes, batch["label"]).astype(jnp.int32)
        return self.encode(params, frozen, labels)

    def condition_inputs(self, labels):
        return np.asarray(labels, np.int32)

    def null_inputs(self, n, negative=None):
        if negative not in (None, ""):
            raise ValueError(f"negative={negative!r}: class-conditional models have no negative prompt")
        return np.full((n,), self.num_classes, np.int32)

    def check(self, labels) -> None:
        bad = [x for x in labels if not (isinstance(x, (int, np.integer)) and 0 <= x < self.num_classes)]
        if bad:
            raise ValueError(
                f"class labels {bad}: must be integers in [0, {self.num_classes}) for classes={self.config.classes!r}"
            )

    def class_name(self, label: int) -> str:
        if self.source_names:
            return self.source_names[label]
        return shapes.class_name(label, self.config.classes)

    def preview_conditions(self) -> tuple[list, Any]:
        return list(self.config.sample.class_labels), None

    def sample_conditions(self, inputs: SampleInputs, sources: int | None):
        if not inputs.class_labels:
            raise ValueError("this run is class-conditional: pass --class_label (repeatable)")
        bad = [x for x in inputs.class_labels if not 0 <= x < self.num_classes]
        if bad:
            raise ValueError(
                f"--class_label={bad}: must be in [0, {self.num_classes}) for classes={self.config.classes!r}"
            )
        describe = [dict(class_label=x, class_name=self.class_name(x)) for x in inputs.class_labels]
        return list(inputs.class_labels), describe, None, True

    def distribution_conditions(self, examples) -> tuple[list, None]:
        if self.source_names:
            return [int(e["label"]) for e in examples], None
        return [shapes.class_label(e, self.config.classes) for e in examples], None

    def eval_conditions(self, examples):
        """The examples' class labels; only the attributes the class names are scored."""
        if self.source_names:
            raise ValueError("attribute scoring needs the embedded shapes dataset; this run trains on data.source")
        labeling = self.config.classes
        wanted = [{a: int(e[a]) for a in shapes.LABELINGS[labeling]} for e in examples]
        return [shapes.class_label(e, labeling) for e in examples], wanted, None


class NullConditioner:
    """No condition: an unconditional model, sampled without guidance. Without a context sequence the UNet's
    transformer blocks attend to the feature map in both attention layers."""

    FLAGS = ("num_images",)
    NEEDS = "an unconditional run"
    guided = False
    context_dim = 0
    num_classes = 0
    unet_classes = 0
    tokenizer = None
    label_field = None

    def __init__(self, config, dtype):
        self.config = config

    @staticmethod
    def validate(config) -> None:
        n = config.sample.num_preview
        config_lib.check(n >= 1, "sample.num_preview", n, "must be >= 1")

    def init(self, rng):
        return rng, {}, (None, None)

    def setup_frozen(self, frozen: dict) -> None:
        pass

    @staticmethod
    def encode(params, frozen, inputs):
        return None

    @staticmethod
    def unet_inputs(cond):
        return None, None

    def training_condition(self, params, frozen, batch, drop):
        return None

    def condition_inputs(self, conditions):
        return None

    def null_inputs(self, n, negative=None):
        if negative not in (None, ""):
            raise ValueError(f"negative={negative!r}: unconditional models have no negative prompt")
        return None

    def check(self, conditions) -> None:
        pass

    def preview_conditions(self) -> tuple[list, Any]:
        return [None] * self.config.sample.num_preview, None

    def sample_conditions(self, inputs: SampleInputs, sources: int | None):
        if inputs.num_images < 1:
            raise ValueError(f"--num_images={inputs.num_images}: must be >= 1")
        return [None] * inputs.num_images, [{}] * inputs.num_images, None, False

    @staticmethod
    def distribution_conditions(examples) -> tuple[list, None]:
        return [None] * len(examples), None

    def eval_conditions(self, examples):
        raise ValueError(
            "an unconditional model has no condition whose attributes its images could be scored on; evaluate a "
            "txt2img, class_cond, inpainting or superres run"
        )


class NoiseLevelConditioner:
    """Super-resolution's noise-augmentation level of the low-resolution input, given to the UNet as its class
    input (no class input when ``superres.max_noise_level`` is 0). The level is drawn in training together with the
    noise of the low-resolution image (``concat_inputs.LowResConcat``), so it has no condition dropout and no null
    level; sampling is not guided."""

    FLAGS = ("noise_level",)
    NEEDS = "a superres run"
    guided = False
    context_dim = 0
    tokenizer = None
    label_field = None

    def __init__(self, config, dtype):
        self.config = config
        self.max_level = int(config.superres.max_noise_level)
        self.num_classes = self.max_level + 1 if self.max_level > 0 else 0
        self.unet_classes = self.num_classes

    @staticmethod
    def validate(config) -> None:
        top, level = config.superres.max_noise_level, config.sample.noise_level
        rule = f"must be in [0, superres.max_noise_level={top}]"
        config_lib.check(0 <= level <= top, "sample.noise_level", level, rule)
        n = config.sample.num_preview
        config_lib.check(n >= 1, "sample.num_preview", n, "must be >= 1")
        drop = config.diffusion.cond_drop_prob
        config_lib.check(
            drop == 0.0,
            "diffusion.cond_drop_prob",
            drop,
            "must be 0 for superres (the low-resolution image always conditions; sampling is not guided)",
        )

    def init(self, rng):
        return rng, {}, (None, jnp.zeros((1,), jnp.int32) if self.num_classes else None)

    def setup_frozen(self, frozen: dict) -> None:
        pass

    @staticmethod
    def encode(params, frozen, levels):
        return levels

    @staticmethod
    def unet_inputs(levels):
        return None, levels

    def training_condition(self, params, frozen, batch, drop):
        return None  # drawn with the concat input's noise

    def condition_inputs(self, levels):
        return np.asarray(levels, np.int32) if self.num_classes else None

    def null_inputs(self, n, negative=None):
        if negative not in (None, ""):
            raise ValueError(f"negative={negative!r}: super-resolution models have no negative prompt")
        return None

    def check(self, levels) -> None:
        bad = [x for x in levels if not (isinstance(x, (int, np.integer)) and 0 <= x <= self.max_level)]
        if bad:
            raise ValueError(f"noise levels {bad}: must be integers in [0, superres.max_noise_level={self.max_level}]")

    def level(self, given: int | None, what: str = "--noise_level") -> int:
        level = self.config.sample.noise_level if given is None else int(given)
        if not 0 <= level <= self.max_level:
            raise ValueError(f"{what}={level}: must be in [0, superres.max_noise_level={self.max_level}]")
        return level

    def preview_conditions(self) -> tuple[list, Any]:
        return [self.config.sample.noise_level] * self.config.sample.num_preview, None

    def sample_conditions(self, inputs: SampleInputs, sources: int | None):
        level = self.level(inputs.noise_level)
        return [level] * sources, [dict(noise_level=level)] * sources, None, True

    def eval_conditions(self, examples):
        raise ValueError("super-resolution is scored against the original images, not by attributes")

    @staticmethod
    def distribution_conditions(examples):
        raise ValueError(
            "eval.every: distribution metrics during training need a txt2img, class_cond or unconditional run"
        )

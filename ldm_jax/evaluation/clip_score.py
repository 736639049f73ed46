"""CLIP score: how well images match their captions, as torchmetrics' ``CLIPScore`` defines it.

Per image-caption pair ``100 * max(cos(E_image, E_text), 0)``; the reported metric is the mean over the pairs.
The embeddings come from our Flax CLIP (``ldm_jax.models.clip``) with weights read by
``ldm_jax.interop.clip_weights.load_clip`` (a transformers ``CLIPModel`` folder such as openai/clip-vit-large-patch14,
torchmetrics' default, or an OpenCLIP checkpoint such as ViT-H-14 laion2b). Nothing is downloaded.

The pieces, for a caller that jits over its own device mesh::

    scorer = load_clip_scorer(path)
    pixels = scorer.preprocess(images_uint8)          # host, numpy [N, S, S, 3]
    tokens = scorer.tokenizer(captions)               # host, numpy int32 [N, 77]
    e_img = jax.jit(scorer.image_embeddings)(scorer.params, pixels)
    e_txt = jax.jit(scorer.text_embeddings)(scorer.params, tokens)
    scores = clip_score(e_img, e_txt)                 # numpy float64 [N]; report scores.mean()

Float32 parity with the PyTorch references holds at XLA:CPU's float32 matmuls; on GPUs / TPUs, whose default
float32 matmul precision is lower (TF32 / bf16 passes), jit under ``jax.default_matmul_precision("highest")`` to
keep it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import numpy as np
from PIL import Image

from ldm_jax.data.tokenizer import CLIPTokenizer
from ldm_jax.interop.clip_weights import load_clip
from ldm_jax.models.clip import CLIP, OPENAI_MEAN, OPENAI_STD

Params = dict


def _resized_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) with the shorter side ``size`` and the longer ``int(size * long / short)`` (truncated), as
    transformers' ``get_resize_output_image_size(default_to_square=False)`` and torchvision's ``Resize(int)``."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    return (new_long, size) if width <= height else (size, new_long)


def preprocess(
    images: np.ndarray | Sequence[np.ndarray],
    size: int,
    mean: Sequence[float] = OPENAI_MEAN,
    std: Sequence[float] = OPENAI_STD,
) -> np.ndarray:
    """RGB uint8 images [N, H, W, 3] (or a sequence of [H_i, W_i, 3]) -> float32 pixels [N, size, size, 3].

    Reproduces transformers' ``CLIPImageProcessor`` (its PIL backend, ``CLIPImageProcessorPil``, the one
    transformers 5 uses without torchvision; the configuration of every OpenAI CLIP on the hub) exactly:

    1. resize with PIL's bicubic filter (``Image.resize(..., Image.BICUBIC)``, on the uint8 image, with PIL's
       antialiasing when downscaling) so that the shorter side is ``size`` and the longer
       ``int(size * long / short)``;
    2. center crop ``size`` x ``size`` starting at row ``(h - size) // 2`` and column ``(w - size) // 2``;
    3. ``x / 255`` (in float64, then float32), then ``(x - mean) / std`` in float32.

    OpenCLIP's own pipeline (torchvision ``Resize`` on the PIL image, which also calls PIL's bicubic, then
    ``CenterCrop``) differs only in step 2: torchvision starts the crop at ``round((h - size) / 2)``, one pixel
    further when the difference is odd. Runs on the host, one image at a time.
    """
    if isinstance(images, np.ndarray) and images.ndim != 4:
        raise ValueError(f"preprocess: images of shape {images.shape}; expected [N, H, W, 3] uint8 RGB")
    mean32, std32 = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    if mean32.shape != (3,) or std32.shape != (3,):
        raise ValueError(f"preprocess: mean={mean}, std={std}; expected 3 values each (RGB)")
    out = np.empty((len(images), size, size, 3), np.float32)
    for i, image in enumerate(images):
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"preprocess: image {i} of shape {image.shape} and dtype {image.dtype}; expected [H, W, 3] uint8"
            )
        h, w = image.shape[:2]
        new_h, new_w = _resized_size(h, w, size)
        resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), resample=Image.BICUBIC))
        top, left = (new_h - size) // 2, (new_w - size) // 2
        crop = resized[top : top + size, left : left + size]
        x = (crop.astype(np.float64) * (1 / 255)).astype(np.float32)
        out[i] = (x - mean32) / std32
    return out


def image_embeddings(params: Params, pixels: jax.Array, *, model: CLIP) -> jax.Array:
    """pixels [B, S, S, 3] (from :func:`preprocess`) -> image embeddings [B, D] float32, not normalised. Pure and
    jittable; bind ``model`` with ``functools.partial`` (``load_clip_scorer`` does)."""
    return model.apply({"params": params}, pixels, method=CLIP.encode_image)


def text_embeddings(params: Params, tokens: jax.Array, *, model: CLIP) -> jax.Array:
    """tokens [B, T] int32 (``CLIPTokenizer`` output, T = the model's context length) -> text embeddings [B, D]
    float32, not normalised. Pure and jittable; bind ``model`` with ``functools.partial``."""
    return model.apply({"params": params}, tokens, method=CLIP.encode_text)


def clip_score(image_emb, text_emb) -> np.ndarray:
    """Per-pair CLIP scores [N] (float64): ``100 * max(cos(image_emb[i], text_emb[i]), 0)``, torchmetrics'
    ``CLIPScore`` per pair (it reports their mean). Embeddings [N, D], normalised or not."""
    a, b = np.asarray(image_emb, np.float64), np.asarray(text_emb, np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"clip_score: embeddings of shapes {a.shape} and {b.shape}; expected equal [N, D]")
    na, nb = np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
    if not (np.all(na > 0) and np.all(nb > 0)):
        raise ValueError("clip_score: an embedding has zero norm; its cosine is undefined")
    cos = np.sum(a * b, axis=-1) / (na * nb)
    return 100.0 * np.maximum(cos, 0.0)


@dataclasses.dataclass(frozen=True)
class CLIPScorer:
    """What scoring needs, from :func:`load_clip_scorer`.

    ``image_embeddings(params, pixels)`` / ``text_embeddings(params, tokens)``: pure, jittable, bound to ``model``;
    ``params``: numpy float32 on the host (no device placement here); ``tokenizer``: the CLIP tokenizer with the
    checkpoint's pad convention and context length; ``preprocess(images)``: :func:`preprocess` at ``image_size``
    with the checkpoint's mean / std.
    """

    model: CLIP
    params: Params
    image_embeddings: Callable[[Params, jax.Array], jax.Array]
    text_embeddings: Callable[[Params, jax.Array], jax.Array]
    tokenizer: CLIPTokenizer
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def preprocess(self, images) -> np.ndarray:
        return preprocess(images, self.image_size, self.mean, self.std)


def load_clip_scorer(
    path: str, arch: str | None = None, activation: str | None = None, allow_pickle: bool = False
) -> CLIPScorer:
    """Reads CLIP weights (``clip_weights.load_clip``: a transformers CLIPModel folder or an OpenCLIP file; for
    OpenCLIP files ``arch`` / ``activation`` as documented there, default activation "gelu") -> a CLIPScorer."""
    model, params, settings = load_clip(path, arch=arch, activation=activation, allow_pickle=allow_pickle)
    tokenizer = CLIPTokenizer(max_length=settings["context_length"], pad_token=settings["pad_token"])
    if model.vocab_size != tokenizer.vocab_size:
        raise ValueError(
            f"{path}: the text tower has a vocabulary of {model.vocab_size}; the CLIP tokenizer has "
            f"{tokenizer.vocab_size} ids"
        )
    return CLIPScorer(
        model=model,
        params=params,
        image_embeddings=functools.partial(image_embeddings, model=model),
        text_embeddings=functools.partial(text_embeddings, model=model),
        tokenizer=tokenizer,
        image_size=settings["image_size"],
        mean=tuple(settings["mean"]),
        std=tuple(settings["std"]),
    )

"""Raw records of the user's data -> training examples at ``data.image_size``, and what happens to bad records.

Decoding: EXIF orientation applied; any PIL mode to RGB (palette and alpha composited on white, 16-bit and float
grey scaled to 8 bits, CMYK converted). Then the shorter side is resized to the image size (Lanczos, antialiased)
and a square is cropped (``data.crop``: "center" or "random"), optionally flipped (``data.random_flip``). One of a
record's captions is chosen. Every random choice comes from ``(data.shuffle_seed, position in the stream)``, so an
example is a pure function of its position: any process count and a resumed run see the same pixels and captions.
The original size and the crop offset travel with the example (SDXL-style size conditioning needs them).

A bad record (unreadable or cut-short image, missing image, missing or non-UTF-8 caption where captions are needed)
never stops or desynchronises a run: the next good record of the source takes its place, so every process still
builds full batches, and the example carries the reason code in ``_bad`` (0 = fine), which the training loop counts
(``data/bad/<reason>`` metrics) and checks against ``data.max_bad_fraction``.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

from ldm_jax.data.sources import decode_to_pil

# Reason codes of ``_bad`` (index + 1).
BAD_REASONS = (
    "truncated",
    "missing_image",
    "unreadable_file",
    "unreadable_image",
    "missing_caption",
    "caption_not_utf8",
    "bad_record",
    "missing_label",
)
CROPS = ("center", "random")
# Bad records in a row after which the source is declared unusable (a run would only substitute forever).
MAX_CONSECUTIVE_BAD = 64


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL image -> RGB, upright."""
    im = ImageOps.exif_transpose(im)
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        a = np.asarray(im, np.float64)
        if im.mode.startswith("I;16"):
            a = a / 257.0  # 16-bit grey, however dark
        elif im.mode == "I" and a.max(initial=0) > 255:
            a = a / 257.0  # a 16-bit PNG that Pillow opened as 32-bit "I"
        return Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8)).convert("RGB")
    if im.mode in ("P", "PA", "LA", "RGBA", "La", "RGBa") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def resize_and_crop(im: Image.Image, size: int, crop: str, rng: np.random.Generator):
    """(uint8 [size, size, 3], (top, left) of the crop in the resized image): shorter side to ``size``, then a
    square crop."""
    w, h = im.size
    scale = size / min(w, h)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    if new != (w, h):
        im = im.resize(new, Image.Resampling.LANCZOS)
    if crop == "random":
        top, left = int(rng.integers(0, new[1] - size + 1)), int(rng.integers(0, new[0] - size + 1))
    else:
        top, left = (new[1] - size) // 2, (new[0] - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)), np.uint8), (top, left)


class ExampleSource:
    """Random access to training examples of a raw source (``data/sources.py``), bad records substituted.

    ``needs``: what an example must have beyond its image ("caption" for text tasks, "label" for class labels)."""

    def __init__(self, raw, image_size: int, crop: str, random_flip: bool, seed: int, needs: tuple[str, ...] = ()):
        self.raw, self.image_size, self.crop, self.flip, self.seed = raw, image_size, crop, random_flip, seed
        self.needs = needs
        self.class_names = getattr(raw, "class_names", [])
        self.description = raw.description

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, i: int) -> dict:
        return self.get(i, i)

    def reason(self, rec: dict) -> str:
        """Why a raw record cannot train ("" when it can), before decoding its image."""
        error = rec["error"]
        if error == "caption_not_utf8" and "caption" not in self.needs:
            error = ""  # the image is fine and its caption is not used
        if error:
            return error
        if rec["image"] is None:
            return "missing_image"
        if "caption" in self.needs and not rec["captions"]:
            return "missing_caption"
        if "label" in self.needs and rec["label"] < 0:
            return "missing_label"
        return ""

    def decode(self, rec: dict, rng: np.random.Generator) -> tuple[dict | None, str]:
        """(the example of raw record ``rec`` with all its "captions", "") or (None, why it cannot train)."""
        why = self.reason(rec)
        if why:
            return None, why
        try:
            im = to_rgb(decode_to_pil(rec["image"]))
            # Prepared shards carry the size before preparation; otherwise the upright (EXIF) size.
            original = rec.get("original_size") or (im.size[1], im.size[0])
            image, (top, left) = resize_and_crop(im, self.image_size, self.crop, rng)
        except Exception:  # PIL raises many types for corrupt data; the reason is what counts here
            return None, "unreadable_image"
        if self.flip and rng.random() < 0.5:
            image = image[:, ::-1]
        return {
            "key": rec["key"],
            "image": np.ascontiguousarray(image),
            "captions": rec["captions"],
            "label": np.int32(rec["label"]),
            "original_size": np.asarray(original, np.int32),
            "crop_offset": np.asarray((top, left), np.int32),
        }, ""

    def record_example(self, index: int) -> tuple[dict | None, str]:
        """Record ``index`` alone, with no substitution (what ``cache_latents`` encodes): (example, "") or (None,
        reason)."""
        return self.decode(self.raw[index], np.random.default_rng([self.seed, index]))

    def get(self, index: int, position: int) -> dict:
        """The example at stream ``position`` for record ``index`` (or the next good record after it)."""
        rng = np.random.default_rng([self.seed, position])
        first_reason = ""
        for attempt in range(MAX_CONSECUTIVE_BAD):
            example, why = self.decode(self.raw[(index + attempt) % len(self.raw)], rng)
            if example is None:
                first_reason = first_reason or why
                continue
            captions = example.pop("captions")
            del example["key"]
            example["caption"] = captions[int(rng.integers(len(captions)))] if captions else ""
            example["_bad"] = np.int32(BAD_REASONS.index(first_reason) + 1 if first_reason else 0)
            return example
        raise ValueError(
            f"{self.description}: {MAX_CONSECUTIVE_BAD} records in a row from record {index} are bad (the first: "
            f"{first_reason}); check the data and data.image_key / caption_key / label_key"
        )


class EmbeddedExamples:
    """The embedded TFDS datasets (already at the image size, with captions and attributes), with the same extra
    fields as ``ExampleSource``'s examples."""

    def __init__(self, source, image_size: int):
        self.source, self.image_size = source, image_size
        self.class_names = []
        self.description = "embedded dataset"

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict:
        return self.get(i, i)

    def get(self, index: int, position: int) -> dict:
        ex = dict(self.source[index])
        ex["original_size"] = np.asarray((self.image_size, self.image_size), np.int32)
        ex["crop_offset"] = np.zeros((2,), np.int32)
        ex["_bad"] = np.int32(0)
        return ex

    def record_example(self, index: int) -> tuple[dict, str]:
        """Like ``ExampleSource.record_example``: the example with its caption as "captions" and its shapes
        attributes (class labels of the embedded dataset are computed from them)."""
        ex = self.get(index, index)
        caption = ex.pop("caption")
        ex["captions"] = [caption.decode("utf-8") if isinstance(caption, bytes) else str(caption)]
        ex["label"] = np.int32(-1)
        return ex, ""


class BadRecordCount:
    """Counts of bad records by reason over the run so far, summed over every process at each check, so that every
    process reports the same numbers and stops at the same step."""

    def __init__(self, description: str, max_fraction: float):
        self.description, self.max_fraction = description, max_fraction
        self.local = np.zeros((len(BAD_REASONS) + 1,), np.int64)  # [0]: good examples

    def add(self, codes: np.ndarray) -> None:
        self.local += np.bincount(np.asarray(codes).ravel(), minlength=len(self.local))

    def totals(self) -> np.ndarray:
        """Counts summed over every process (a collective: every process calls it at the same step)."""
        import jax
        from jax.experimental import multihost_utils

        if jax.process_count() == 1:
            return self.local.copy()
        return np.asarray(multihost_utils.process_allgather(self.local)).reshape(-1, len(self.local)).sum(0)

    def restore(self, counts) -> None:
        """Adds a resumed run's saved totals (checkpoint metadata), once: on process 0."""
        import jax

        if counts is not None and jax.process_index() == 0:
            self.local += np.asarray(counts, np.int64)

    def check(self) -> dict[str, float]:
        """Metrics of the whole run (``data/bad/<reason>`` counts, ``data/bad_fraction``); raises ValueError past
        ``data.max_bad_fraction``. A collective: every process calls it at the same step."""
        counts = self.totals()
        total = int(counts.sum())
        bad = int(counts[1:].sum())
        fraction = bad / max(total, 1)
        metrics = {f"data/bad/{r}": float(c) for r, c in zip(BAD_REASONS, counts[1:], strict=True) if c}
        metrics["data/bad_fraction"] = fraction
        if fraction > self.max_fraction:
            worst = BAD_REASONS[int(np.argmax(counts[1:]))]
            raise ValueError(
                f"{self.description}: {bad} of {total} examples so far came from bad records ({fraction:.1%} > "
                f"data.max_bad_fraction={self.max_fraction}); most often {worst!r} "
                f"({int(counts[1:].max())}); the bad ones were replaced by the next good record"
            )
        return metrics

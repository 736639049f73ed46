"""Checks generated images against the attributes named in their prompt, from pixels alone.

For one image of the shapes dataset: the background is the median colour; object pixels are those far from it;
their mean colour gives the object colour (nearest palette entry), their centroid the 3x3 position, their area the
size, and how much of their bounding box they fill the shape (square ~1, circle ~0.79, triangle ~0.5).
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

import numpy as np

from ldm_jax.data import shapes

ATTRIBUTES = ("color", "position", "size", "shape", "background")
_CAPTION = re.compile(
    r"^a (?P<size>\w+) (?P<color>\w+) (?P<shape>\w+) (?P<position>.+) on a (?P<background>\w+) background$"
)


def parse_caption(text: str) -> dict[str, int]:
    """Attribute indices from a caption of the shapes dataset; ValueError if it is not one."""
    m = _CAPTION.match(text.strip())
    tables = {
        "size": shapes.SIZES,
        "color": shapes.COLOR_NAMES,
        "shape": shapes.SHAPES,
        "position": shapes.POSITIONS,
        "background": shapes.BACKGROUND_NAMES,
    }
    if not m or any(m[k] not in v for k, v in tables.items()):
        raise ValueError(
            f"prompt {text!r} is not a shapes-dataset caption ('a <size> <color> <shape> <position> on a <bg> background')"
        )
    return {k: tables[k].index(m[k]) for k in tables}


def predict_attributes(image: np.ndarray) -> dict[str, int] | None:
    """Attribute indices read off a uint8 image [H, W, 3]; None when no object is found."""
    img = image.astype(np.float32)
    h, w, _ = img.shape
    bg = np.median(img.reshape(-1, 3), axis=0)
    dist = np.linalg.norm(img - bg, axis=-1)
    mask = dist > 60.0
    if mask.sum() < max(2, h * w // 400):
        return None
    ys, xs = np.nonzero(mask)
    # Weight the colour by how far each pixel is from the background: anti-aliased edges count less.
    wts = dist[mask]
    mean = (img[mask] * wts[:, None]).sum(0) / wts.sum()
    palette = np.array([shapes.COLORS[c] for c in shapes.COLOR_NAMES], np.float32)
    color = int(np.argmin(np.linalg.norm(palette - mean, axis=-1)))
    backgrounds = np.array([shapes.BACKGROUNDS[c] for c in shapes.BACKGROUND_NAMES], np.float32)
    background = int(np.argmin(np.linalg.norm(backgrounds - bg, axis=-1)))
    col = min(int(xs.mean() / w * 3), 2)
    row = min(int(ys.mean() / h * 3), 2)
    area = mask.sum() / (h * w)
    # Threshold halfway (in radius) between the two sizes' circle areas.
    r_mid = 0.5 * (shapes.SIZE_RADIUS["small"] + shapes.SIZE_RADIUS["large"])
    size = int(area > np.pi * r_mid**2)
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    fill = mask.sum() / box
    shape = shapes.SHAPES.index("square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle")
    return {"color": color, "position": 3 * row + col, "size": size, "shape": shape, "background": background}


def score(images: Iterable[np.ndarray], prompts: Sequence[str]) -> dict[str, float]:
    """Per-attribute accuracy of ``images`` against their ``prompts`` plus the share with no object found."""
    return score_wanted(images, [parse_caption(p) for p in prompts])


def score_wanted(images: Iterable[np.ndarray], wanted: Sequence[dict[str, int]]) -> dict[str, float]:
    """Per-attribute accuracy against ``wanted[i]`` (attribute -> index; only the attributes it names are scored,
    e.g. colour and shape for a class label), plus the share of images with no object found (counted as misses)."""
    names = [a for a in ATTRIBUTES if any(a in w for w in wanted)]
    hits = {a: 0 for a in names}
    asked = {a: 0 for a in names}
    missing = 0
    n = 0
    for img, want in zip(images, wanted, strict=True):
        got = predict_attributes(np.asarray(img))
        n += 1
        missing += got is None
        for a in want:
            asked[a] += 1
            hits[a] += int(got is not None and got[a] == want[a])
    if n == 0:
        raise ValueError("score() got no images")
    out = {f"accuracy/{a}": hits[a] / asked[a] for a in names}
    out["no_object_rate"] = missing / n
    out["count"] = float(n)
    return out


def shape_accuracy_by_kind(images: Iterable[np.ndarray], wanted: Sequence[dict[str, int]]) -> dict[str, float]:
    """Shape accuracy per asked shape and size ("shape/triangle/small": the share of small triangles read as
    triangles), for the examples whose ``wanted`` names both; where a model loses shape, this says which."""
    hits: dict[str, list[int]] = {}
    for img, want in zip(images, wanted, strict=True):
        if "shape" not in want or "size" not in want:
            continue
        got = predict_attributes(np.asarray(img))
        key = f"shape/{shapes.SHAPES[want['shape']]}/{shapes.SIZES[want['size']]}"
        hits.setdefault(key, []).append(int(got is not None and got["shape"] == want["shape"]))
    return {k: float(np.mean(v)) for k, v in sorted(hits.items())}

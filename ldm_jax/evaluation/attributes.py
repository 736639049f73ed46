"""Checks generated images against the attributes named in their prompt, from pixels alone.

For one image of the shapes dataset: the background is the median colour; object pixels are those far from it;
their mean colour gives the object colour (nearest palette entry), their centroid the 3x3 position, their area the
size. The shape is the one whose drawing explains the pixels best (``read_shape``): each pixel's coverage (where its
colour lies between background and object colour) is compared with the three shapes as ``shapes.render`` draws them,
each placed at the object's centroid with the object's area, at the image's resolution, sharp or softened.

Why templates and not how much of its bounding box the object fills (square ~1, circle ~0.79, triangle ~0.5, the
reader's first version): that ratio is decided by a handful of edge pixels. On the dataset's own 32 px images it read
1 large triangle in 5 wrong (clipped at the border, their fill rises), and a reconstruction that softens edges by
half a pixel, plainly a square or a triangle to the eye, read as a circle. The templates use every pixel and the
known geometry; ``tests/test_data.py`` holds both readers to the dataset's labels, on sharp and on blurred images.
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

import numpy as np
from scipy.ndimage import gaussian_filter

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
    shape = read_shape(img, bg, mean)
    return {"color": color, "position": 3 * row + col, "size": size, "shape": shape, "background": background}


def fill_ratio_shape(mask: np.ndarray) -> int:
    """The first reader's shape: how much of its bounding box the object mask fills (kept for comparison)."""
    ys, xs = np.nonzero(mask)
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    fill = mask.sum() / box
    return shapes.SHAPES.index("square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle")


# Supersampling of the templates (as shapes.render draws at 4x and box-downsamples), the softenings tried (Gaussian
# sigma in pixels: a decoder's edges are softer than the renderer's) and the radius factors around the area's.
_SUPERSAMPLE = 4
_SIGMAS = (0.0, 0.5, 1.0)
_RADIUS_FACTORS = (0.92, 1.0, 1.08)


def _coverage(img: np.ndarray, bg: np.ndarray, fg: np.ndarray) -> np.ndarray:
    """Per pixel, where its colour lies on the line from ``bg`` (0) to ``fg`` (1), clipped to [0, 1]."""
    d = fg - bg
    a = ((img - bg) @ d) / max(float(d @ d), 1e-6)
    return np.clip(a, 0.0, 1.0)


def shape_template(shape: str, cx: float, cy: float, r: float, h: int, w: int) -> np.ndarray:
    """Coverage [h, w] of ``shape`` with centre (cx, cy) and radius r in pixels, drawn as ``shapes.render`` draws it
    (the square of the circle's area, the triangle 1.3 r tall above its centre), box-averaged over 4x4 samples."""
    s = _SUPERSAMPLE
    y = (np.arange(h * s) + 0.5) / s
    x = (np.arange(w * s) + 0.5) / s
    yy, xx = np.meshgrid(y, x, indexing="ij")
    if shape == "circle":
        inside = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    elif shape == "square":
        half = r * shapes.SQUARE_HALF
        inside = (np.abs(xx - cx) <= half) & (np.abs(yy - cy) <= half)
    else:
        (ax, ay), (bx, by), (qx, qy) = shapes.triangle_vertices(cx, cy, r)
        # Inside when on the same side of all three edges (vertices listed in one winding order).
        e1 = (bx - ax) * (yy - ay) - (by - ay) * (xx - ax)
        e2 = (qx - bx) * (yy - by) - (qy - by) * (xx - bx)
        e3 = (ax - qx) * (yy - qy) - (ay - qy) * (xx - qx)
        inside = ((e1 <= 0) & (e2 <= 0) & (e3 <= 0)) | ((e1 >= 0) & (e2 >= 0) & (e3 >= 0))
    return inside.reshape(h, s, w, s).mean(axis=(1, 3))


def _blur(a: np.ndarray, sigma: float) -> np.ndarray:
    # Zero outside the image, the kernel cut at 3 sigma.
    return a if sigma == 0 else gaussian_filter(a, sigma, mode="constant", truncate=3.0)


# Area of each shape in units of r^2 (the radius a coverage's area gives), and how far the triangle's centroid sits
# below its centre (units of r; 0 for the others): where a template goes.
_AREA = {"circle": np.pi, "square": (2 * shapes.SQUARE_HALF) ** 2}


def _triangle_area_and_offset() -> tuple[float, float]:
    (ax, ay), (bx, by), (cx, cy) = shapes.triangle_vertices(0.0, 0.0, 1.0)
    area = 0.5 * abs((bx - ax) * (cy - ay) - (cx - ax) * (by - ay))
    return area, (ay + by + cy) / 3


_AREA["triangle"], _TRIANGLE_CENTROID_DY = _triangle_area_and_offset()


def read_shape(img: np.ndarray, bg: np.ndarray, fg: np.ndarray) -> int:
    """The index of the shape whose template (``shape_template``) is nearest (sum of squared coverage differences)
    to the image's coverage, each shape at the centroid and area the coverage gives, its radius and edge softness
    searched over a few values."""
    h, w, _ = img.shape
    cov = _coverage(img, bg, fg)
    cov = np.where(cov > 0.1, cov, 0.0)  # background noise (a decoder's speckle) is not object
    area = cov.sum()
    if area <= 0:  # the far pixels lie away from the object colour's side: nothing to compare
        return shapes.SHAPES.index("circle")
    ys, xs = np.mgrid[:h, :w] + 0.5
    my, mx = (cov * ys).sum() / area, (cov * xs).sum() / area
    best = []
    for name in shapes.SHAPES:
        r0 = np.sqrt(area / _AREA[name])
        err = np.inf
        for f in _RADIUS_FACTORS:
            r = r0 * f
            cy = my - (_TRIANGLE_CENTROID_DY * r if name == "triangle" else 0.0)
            t = shape_template(name, mx, cy, r, h, w)
            for sigma in _SIGMAS:
                err = min(err, float(np.square(_blur(t, sigma) - cov).sum()))
        best.append(err)
    return int(np.argmin(best))


def score(images: Iterable[np.ndarray], prompts: Sequence[str]) -> dict[str, float]:
    """Per-attribute accuracy of ``images`` against their ``prompts`` plus the share with no object found."""
    return score_wanted(images, [parse_caption(p) for p in prompts])


def read_images(images: Iterable[np.ndarray]) -> list[dict[str, int] | None]:
    """``predict_attributes`` of each image (None: no object found)."""
    return [predict_attributes(np.asarray(img)) for img in images]


def report(images: Iterable[np.ndarray], wanted: Sequence[dict[str, int]]) -> tuple[dict, dict, dict]:
    """(``score_wanted``, shape accuracy per asked shape and size, ``shape_confusion``) of ``images``, each image
    read once."""
    readings = read_images(images)
    return _scores(readings, wanted), _shape_by_kind(readings, wanted), _shape_confusion(readings, wanted)


def score_wanted(images: Iterable[np.ndarray], wanted: Sequence[dict[str, int]]) -> dict[str, float]:
    """Per-attribute accuracy against ``wanted[i]`` (attribute -> index; only the attributes it names are scored,
    e.g. colour and shape for a class label), plus the share of images with no object found (counted as misses)."""
    return _scores(read_images(images), wanted)


def shape_confusion(images: Iterable[np.ndarray], wanted: Sequence[dict[str, int]]) -> dict[str, dict[str, float]]:
    """What shape is read where each shape was asked: ``{asked: {read: share}}`` over the shapes and "none" (no
    object found), each row summing to 1, for the examples whose ``wanted`` names a shape. Accuracy alone cannot
    tell a model that draws the wrong shape from one that draws the same shape whatever is asked (every row alike)."""
    return _shape_confusion(read_images(images), wanted)


def _scores(readings, wanted) -> dict[str, float]:
    names = [a for a in ATTRIBUTES if any(a in w for w in wanted)]
    hits = {a: 0 for a in names}
    asked = {a: 0 for a in names}
    missing = 0
    n = 0
    for got, want in zip(readings, wanted, strict=True):
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


def _shape_by_kind(readings, wanted) -> dict[str, float]:
    """Shape accuracy per asked shape and size ("shape/triangle/small": the share of small triangles read as
    triangles), for the examples whose ``wanted`` names both; where a model loses shape, this says which."""
    hits: dict[str, list[int]] = {}
    for got, want in zip(readings, wanted, strict=True):
        if "shape" not in want or "size" not in want:
            continue
        key = f"shape/{shapes.SHAPES[want['shape']]}/{shapes.SIZES[want['size']]}"
        hits.setdefault(key, []).append(int(got is not None and got["shape"] == want["shape"]))
    return {k: float(np.mean(v)) for k, v in sorted(hits.items())}


def _shape_confusion(readings, wanted) -> dict[str, dict[str, float]]:
    reads: dict[str, list[str]] = {}
    for got, want in zip(readings, wanted, strict=True):
        if "shape" not in want:
            continue
        reads.setdefault(shapes.SHAPES[want["shape"]], []).append(
            "none" if got is None else shapes.SHAPES[got["shape"]]
        )
    return {
        asked: {read: r.count(read) / len(r) for read in (*shapes.SHAPES, "none")}
        for asked in shapes.SHAPES
        if (r := reads.get(asked))
    }

"""Full-reference image quality: PSNR and SSIM, per image, on uint8 RGB images (data range 255).

SSIM follows Wang et al. (2004) as scikit-image computes it with ``gaussian_weights=True``: a Gaussian window of
sigma 1.5 truncated at 3.5 sigma (11 taps), K1 = 0.01, K2 = 0.03, population (not sample) covariances, reflected
borders, the mean over channels of the SSIM map with the 5-pixel border cropped.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

DATA_RANGE = 255.0
SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _as_float(images) -> np.ndarray:
    x = np.asarray(images)
    if x.dtype != np.uint8:
        raise ValueError(f"images of dtype {x.dtype}: PSNR / SSIM here take uint8 images (range 255)")
    return x.astype(np.float64)


def psnr(a, b, where=None) -> np.ndarray:
    """PSNR in dB of each image pair [N, H, W, C] (inf where identical); ``where`` ([N, H, W, 1], 0/1) restricts
    the mean squared error to those pixels."""
    a, b = _as_float(a), _as_float(b)
    if where is None:
        mse = np.mean((a - b) ** 2, axis=(1, 2, 3))
    else:
        w = np.broadcast_to(np.asarray(where, np.float64), a.shape)
        mse = np.sum(w * (a - b) ** 2, axis=(1, 2, 3)) / np.maximum(np.sum(w, axis=(1, 2, 3)), 1.0)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(DATA_RANGE**2 / mse)


def ssim(a, b) -> np.ndarray:
    """SSIM of each image pair [N, H, W, C] (images at least 11 pixels a side)."""
    a, b = _as_float(a), _as_float(b)
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"ssim: image batches {a.shape} and {b.shape} must be equal [N, H, W, C]")
    radius = int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)
    if min(a.shape[1:3]) < 2 * radius + 1:
        raise ValueError(f"ssim: images {a.shape[1]}x{a.shape[2]} are smaller than the {2 * radius + 1}-pixel window")
    # Blur over H and W only, each image and channel on its own.
    blur = lambda x: ndimage.gaussian_filter(  # noqa: E731
        x, sigma=(0, SSIM_SIGMA, SSIM_SIGMA, 0), truncate=SSIM_TRUNCATE, mode="reflect"
    )
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (SSIM_K1 * DATA_RANGE) ** 2, (SSIM_K2 * DATA_RANGE) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    r = radius
    return s[:, r:-r, r:-r, :].mean(axis=(1, 2, 3))

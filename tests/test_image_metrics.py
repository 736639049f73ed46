"""PSNR and SSIM against their definitions, computed independently here."""

import numpy as np
import pytest

from ldm_jax.evaluation import image_metrics


def _pair(seed=0, shape=(2, 24, 20, 3)):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, shape).astype(np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-30, 31, shape), 0, 255).astype(np.uint8)
    return a, b


def test_psnr_is_the_definition():
    a, b = _pair()
    mse = ((a.astype(np.float64) - b) ** 2).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(image_metrics.psnr(a, b), 10 * np.log10(255.0**2 / mse))
    assert np.isinf(image_metrics.psnr(a, a)).all()
    where = np.zeros(a.shape[:3] + (1,))
    where[:, :5] = 1
    part = ((a[:, :5].astype(np.float64) - b[:, :5]) ** 2).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(image_metrics.psnr(a, b, where=where), 10 * np.log10(255.0**2 / part))
    with pytest.raises(ValueError, match="uint8"):
        image_metrics.psnr(a.astype(np.float32), b)


def test_ssim_matches_a_direct_windowed_computation():
    """At interior pixels (no border effects) the SSIM map is Wang et al.'s formula with an 11-tap Gaussian window of
    sigma 1.5; the score is the mean over the map with a 5-pixel border cropped."""
    a, b = _pair(1, (1, 23, 23, 1))
    x = np.arange(-5, 6)
    g = np.exp(-(x**2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    fa, fb = a[0, ..., 0].astype(np.float64), b[0, ..., 0].astype(np.float64)
    vals = []
    # Pixels whose window lies inside the image: reflection never enters.
    for i in range(5, 18):
        for j in range(5, 18):
            pa, pb = fa[i - 5 : i + 6, j - 5 : j + 6], fb[i - 5 : i + 6, j - 5 : j + 6]
            ma, mb = (w * pa).sum(), (w * pb).sum()
            va, vb = (w * pa * pa).sum() - ma**2, (w * pb * pb).sum() - mb**2
            cov = (w * pa * pb).sum() - ma * mb
            vals.append(((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    # A 23-pixel image cropped by 5 leaves exactly these 13x13 interior pixels.
    np.testing.assert_allclose(image_metrics.ssim(a, b), [np.mean(vals)], rtol=1e-10)
    np.testing.assert_allclose(image_metrics.ssim(a, a), [1.0])
    noisier = np.clip(a.astype(int) + np.random.default_rng(2).integers(-90, 91, a.shape), 0, 255).astype(np.uint8)
    assert image_metrics.ssim(a, noisier)[0] < image_metrics.ssim(a, b)[0] < 1.0
    with pytest.raises(ValueError, match="smaller than the 11-pixel window"):
        image_metrics.ssim(a[:, :8, :8], b[:, :8, :8])


@pytest.mark.parametrize("shape", [(3, 24, 20, 3), (2, 11, 11, 3), (2, 37, 64, 3), (1, 16, 16, 1)])
def test_ssim_equals_scikit_image_on_whole_images(shape):
    """The score scikit-image reports for the whole image (its border handling and crop included) with Wang et al.'s
    settings: Gaussian weights of sigma 1.5 truncated at 3.5 sigma, population covariances, data range 255."""
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(sum(shape))
    a = rng.integers(0, 256, shape).astype(np.uint8)
    # Structure that differs near the borders too: a shifted copy with noise, and a dark frame.
    b = np.clip(np.roll(a.astype(int), 1, axis=2) + rng.integers(-40, 41, shape), 0, 255).astype(np.uint8)
    b[:, :2] = 0
    ours = image_metrics.ssim(a, b)
    ref = [
        structural_similarity(
            x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255, channel_axis=-1
        )
        for x, y in zip(a, b, strict=True)
    ]
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)

"""Kernel Inception Distance (Binkowski et al., 2018) as torch-fidelity 0.4.0 computes it
(``metric_kid.kid_features_to_metric`` with its defaults), in float64 numpy.

KID is the squared maximum mean discrepancy between two feature sets under the polynomial kernel
``k(x, y) = (gamma x.y + coef0) ** degree`` (degree 3, gamma 1 / D, coef0 1), estimated without bias on
``subsets`` random pairs of subsets of ``subset_size`` rows each, and reported as the mean and the standard
deviation (numpy's default, ddof 0) over those subsets. The subsets are drawn as torch-fidelity draws them: one
``np.random.RandomState(seed)``, and per subset ``choice(n_1, subset_size, replace=False)`` for the first set then
the same for the second, so the same seed gives the same number. The features are torch-fidelity's "2048" (the FID
Inception's pool3, :func:`ldm_jax.evaluation.fid.inception_features`).

Unlike the FID, the estimator is unbiased: a set against itself, or two sets from one distribution, give values
around 0, slightly negative ones included.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

# torch-fidelity's defaults (``defaults.py``: kid_subsets, kid_subset_size, rng_seed, kid_kernel_poly_*).
DEFAULT_SUBSETS = 100
DEFAULT_SUBSET_SIZE = 1000
DEFAULT_SEED = 2020
DEFAULT_DEGREE = 3
DEFAULT_COEF0 = 1.0


class KernelInceptionDistance(NamedTuple):
    """torch-fidelity's ``kernel_inception_distance_mean`` and ``kernel_inception_distance_std``."""

    mean: float
    std: float


def polynomial_kernel(x, y, *, degree: int = DEFAULT_DEGREE, gamma: float | None = None, coef0: float = DEFAULT_COEF0):
    """Gram matrix [n, m] of ``(gamma x.y + coef0) ** degree`` between rows of x [n, D] and y [m, D];
    ``gamma=None`` is 1 / D."""
    if gamma is None:
        gamma = 1.0 / x.shape[1]
    return (x @ y.T * gamma + coef0) ** degree


def mmd2_unbiased(k_xx, k_xy, k_yy) -> float:
    """Unbiased MMD^2 from square Gram matrices [m, m]: the within-set means leave out the diagonal (m (m - 1)
    pairs), the cross-set mean keeps all m^2 pairs (torch-fidelity's ``mmd_est="unbiased"``, which is not the
    U-statistic: that would leave out the cross diagonal too)."""
    m = k_xx.shape[0]
    within_x = (k_xx.sum(axis=1) - np.diagonal(k_xx)).sum()
    within_y = (k_yy.sum(axis=1) - np.diagonal(k_yy)).sum()
    cross = k_xy.sum(axis=0).sum()
    return float((within_x + within_y) / (m * (m - 1)) - 2 * cross / (m * m))


def kernel_inception_distance(
    features_1,
    features_2,
    *,
    subsets: int = DEFAULT_SUBSETS,
    subset_size: int = DEFAULT_SUBSET_SIZE,
    seed: int = DEFAULT_SEED,
    degree: int = DEFAULT_DEGREE,
    gamma: float | None = None,
    coef0: float = DEFAULT_COEF0,
) -> KernelInceptionDistance:
    """KID between feature sets [n_1, D] and [n_2, D] (e.g. real and generated pool3 features), computed in float64.

    torch-fidelity computes in the features' own dtype (float32 from its extractor); here float64 always, so on
    float32 features the two agree to float32 rounding of the kernel sums, and exactly (to float64 rounding) on
    float64 ones. Raises ValueError when a set has fewer than ``subset_size`` rows, as torch-fidelity does (it
    draws without replacement); pass a smaller ``subset_size`` for small sets.
    """
    f1 = np.asarray(features_1, np.float64)
    f2 = np.asarray(features_2, np.float64)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
        raise ValueError(
            f"kernel_inception_distance: features of shapes {f1.shape} and {f2.shape}; expected [n_1, D] and [n_2, D]"
        )
    if subsets < 1:
        raise ValueError(f"kernel_inception_distance: subsets={subsets}; expected at least 1")
    if subset_size < 2:
        raise ValueError(f"kernel_inception_distance: subset_size={subset_size}; the unbiased estimator needs >= 2")
    n1, n2 = len(f1), len(f2)
    if n1 < subset_size or n2 < subset_size:
        raise ValueError(
            f"kernel_inception_distance: subset_size={subset_size} but the feature sets have {n1} and {n2} rows; "
            "subsets are drawn without replacement, so each set needs at least subset_size rows (pass a smaller "
            "subset_size)"
        )
    rng = np.random.RandomState(seed)
    kernel = {"degree": degree, "gamma": gamma, "coef0": coef0}
    values = np.zeros(subsets)
    for i in range(subsets):
        # The draw order (set 1, then set 2, per subset) is torch-fidelity's: the same seed picks the same rows.
        x = f1[rng.choice(n1, subset_size, replace=False)]
        y = f2[rng.choice(n2, subset_size, replace=False)]
        values[i] = mmd2_unbiased(
            polynomial_kernel(x, x, **kernel), polynomial_kernel(x, y, **kernel), polynomial_kernel(y, y, **kernel)
        )
    return KernelInceptionDistance(float(np.mean(values)), float(np.std(values)))

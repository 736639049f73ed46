"""Inception Score (Salimans et al., 2016) as torch-fidelity 0.4.0 computes it (``metric_isc.isc_features_to_metric``
with its defaults), in float64 numpy.

The input is torch-fidelity's ``logits_unbiased``: the FID Inception's pool3 features times its 1008-class
classifier weight, without the bias (:func:`ldm_jax.evaluation.fid.inception_logits_unbiased`, weights loaded with
``load_fid_inception(path, classifier=True)``). The rows are shuffled with ``np.random.RandomState(seed)
.permutation`` (torch-fidelity's ``samples_shuffle``), split into ``splits`` consecutive chunks (rows
``i N // splits`` to ``(i + 1) N // splits``), and each chunk scores ``exp(mean_x KL(p(y|x) || p(y)))`` with
``p(y)`` the chunk's mean class distribution. Reported: the mean and standard deviation (ddof 0) over the chunks.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

# torch-fidelity's defaults (``defaults.py``: isc_splits, samples_shuffle, rng_seed).
DEFAULT_SPLITS = 10
DEFAULT_SEED = 2020


class InceptionScore(NamedTuple):
    """torch-fidelity's ``inception_score_mean`` and ``inception_score_std``."""

    mean: float
    std: float


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def inception_score(
    logits, *, splits: int = DEFAULT_SPLITS, shuffle: bool = True, seed: int = DEFAULT_SEED
) -> InceptionScore:
    """Inception Score of logits [N, C] (``logits_unbiased``, C = 1008 for the FID Inception).

    torch-fidelity casts its float32 logits to float64 before the softmax, as here, so the two agree to float64
    rounding on the same logits. Raises ValueError for fewer rows than ``splits`` (torch-fidelity would average an
    empty chunk into a NaN).
    """
    x = np.asarray(logits, np.float64)
    if x.ndim != 2:
        raise ValueError(f"inception_score: logits of shape {x.shape}; expected [N, classes]")
    if splits < 1:
        raise ValueError(f"inception_score: splits={splits}; expected at least 1")
    n = len(x)
    if n < splits:
        raise ValueError(f"inception_score: {n} rows of logits for splits={splits}; each split needs at least one")
    if shuffle:
        x = x[np.random.RandomState(seed).permutation(n)]
    log_p = _log_softmax(x)
    p = np.exp(log_p)
    scores = []
    for i in range(splits):
        rows = slice(i * n // splits, (i + 1) * n // splits)
        log_marginal = np.log(p[rows].mean(axis=0))
        kl = (p[rows] * (log_p[rows] - log_marginal)).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return InceptionScore(float(np.mean(scores)), float(np.std(scores)))

"""torch-fidelity side of the KID and Inception Score parity tests: runs in the reference environment, never
imports jax.

  python tests/reference/kid_is_oracle.py spec.json

``spec.json`` holds ``{"inputs": .npz of float64 arrays, "outputs": .json path, "kid": [case], "isc": [case]}``.
A KID case ``{"name", "a", "b", "kwargs"}`` calls torch-fidelity 0.4.0's own ``kid_features_to_metric`` on the
arrays ``a`` and ``b`` of ``inputs``; an IS case ``{"name", "logits", "kwargs"}`` calls ``isc_featuresdict_to_metric``
on ``{"logits_unbiased": logits}``; ``kwargs`` are torch-fidelity's (``kid_subsets``, ``rng_seed``, ...; its
defaults for the rest). The outputs map each name to ``{"mean", "std"}``, or to ``{"error": type and message}``
when torch-fidelity raised.

torch-fidelity is installed with ``--no-deps`` (tests/reference/requirements-nodeps.txt): it declares torchvision,
which is not in this environment.
"""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import torch


class _NoTorchvision:
    """Stands for every torchvision class torch_fidelity names at import time; using one is an error."""

    def __init__(self, *args, **kwargs):
        raise RuntimeError("kid_is_oracle: torchvision is a stand-in here; only the metric functions work")


def _stand_in_torchvision() -> None:
    """``import torch_fidelity`` imports every submodule, and its datasets, feature extractors and utils import
    torchvision (and ``torchvision.datasets.CIFAR10`` etc.) at module level. torchvision is not installed here: it
    would pull a multi-GB torch of its own and does not import beside ours. The metric functions we call are
    numpy / torch only, so empty modules let the package import."""
    for name in ("torchvision", "torchvision.datasets", "torchvision.transforms", "torchvision.transforms.functional"):
        sys.modules.setdefault(name, types.ModuleType(name))
    for cls in ("CIFAR10", "STL10", "CIFAR100"):
        setattr(sys.modules["torchvision.datasets"], cls, _NoTorchvision)


_stand_in_torchvision()

from torch_fidelity.metric_fid import (
    KEY_METRIC_FID,
    fid_features_to_statistics,
    fid_statistics_to_metric,
)
from torch_fidelity.metric_isc import (
    KEY_METRIC_ISC_MEAN,
    KEY_METRIC_ISC_STD,
    isc_featuresdict_to_metric,
)
from torch_fidelity.metric_kid import (
    KEY_METRIC_KID_MEAN,
    KEY_METRIC_KID_STD,
    kid_features_to_metric,
)


def _result(call, mean_key, std_key):
    try:
        out = call()
    except ValueError as e:
        return {"error": f"{type(e).__name__}: {e}"}
    return {"mean": out[mean_key], "std": out[std_key]}


def main(spec_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    with np.load(spec["inputs"]) as f:
        arrays = {k: torch.from_numpy(f[k]) for k in f.files}
    results = {}
    for case in spec.get("kid", []):
        a, b, kwargs = arrays[case["a"]], arrays[case["b"]], dict(case["kwargs"], verbose=False)
        results[case["name"]] = _result(
            lambda a=a, b=b, kwargs=kwargs: kid_features_to_metric(a, b, **kwargs),
            KEY_METRIC_KID_MEAN,
            KEY_METRIC_KID_STD,
        )
    for case in spec.get("isc", []):
        feats, kwargs = {"logits_unbiased": arrays[case["logits"]]}, dict(case["kwargs"], verbose=False)
        results[case["name"]] = _result(
            lambda feats=feats, kwargs=kwargs: isc_featuresdict_to_metric(feats, "logits_unbiased", **kwargs),
            KEY_METRIC_ISC_MEAN,
            KEY_METRIC_ISC_STD,
        )
    for case in spec.get("fid", []):
        stats = [fid_features_to_statistics(arrays[case[k]]) for k in ("a", "b")]
        results[case["name"]] = {"fid": fid_statistics_to_metric(*stats, verbose=False)[KEY_METRIC_FID]}
    with open(spec["outputs"], "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1])

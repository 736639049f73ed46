"""Random-weight files for the evaluation networks, written the way their real files are (the test itself makes
them: no real FID Inception or CLIP weights exist offline)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.evaluation import fid


def write_fid_inception(path: str, seed: int = 0) -> None:
    """A pytorch-fid-layout state dict (torch key names and shapes, the 1008-class classifier included) of a
    randomly initialised FID Inception with non-trivial BatchNorm statistics, saved as .npz."""
    params = jax.eval_shape(
        fid.FIDInceptionV3().init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, 75, 75, 3), jnp.float32)
    )["params"]
    rng = np.random.default_rng(seed)
    sd = {}
    for path_, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = [k.key for k in path_]
        prefix = ".".join(names[:-1])
        shape = tuple(leaf.shape)
        if names[-1] == "kernel":
            kh, kw, cin, cout = shape
            sd[f"{prefix}.conv.weight"] = (rng.standard_normal((cout, cin, kh, kw)) / np.sqrt(kh * kw * cin)).astype(
                np.float32
            )
        else:
            torch_name = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}[names[-1]]
            if names[-1] == "var":
                value = rng.uniform(0.5, 1.5, shape)
            elif names[-1] == "scale":
                value = rng.uniform(0.8, 1.2, shape)
            else:
                value = 0.1 * rng.standard_normal(shape)
            sd[f"{prefix}.bn.{torch_name}"] = value.astype(np.float32)
    sd["fc.weight"] = (0.05 * rng.standard_normal((fid.NUM_CLASSES, fid.FEATURE_DIM))).astype(np.float32)
    sd["fc.bias"] = np.zeros(fid.NUM_CLASSES, np.float32)
    np.savez(path, **sd)

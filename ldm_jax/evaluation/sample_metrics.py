"""Distribution metrics of generated images: FID, KID, Inception Score and CLIP score, sharded over every device of
every process.

  python -m ldm_jax.evaluate --samples=runs/coco30k --reference=/data/coco/val2014 --metrics=fid,kid,clip_score \\
      --fid_weights=pt_inception-2015-12-05-6726825d.pth --clip_weights=/models/open_clip_vit_h14.safetensors

Each batch of rows is split over the mesh; each process decodes only the rows its devices hold
(``transfer.rows_to_mesh``), and the networks run once per batch for every metric asked:

- FID: pytorch-fid's network and input pipeline (``fid.inception_features``: the image's uint8 pixels, as read from
  its PNG, resized to 299x299 with torch's bilinear ``F.interpolate(align_corners=False)``, no antialiasing, then
  ``2 x - 1``). clean-fid resizes with PIL bicubic and antialiasing instead, which moves FID by a few points;
  numbers here are comparable to pytorch-fid's (the LDM paper's and MLPerf's). Each process accumulates the sums and
  outer products of its own rows' features; the hosts' sums are pooled exactly (``FeatureStatistics.pooled``).
- KID: the same features (torch-fidelity's "2048"), gathered on every process, then ``kid.kernel_inception_distance``
  (torch-fidelity's estimator and subset draw). torch-fidelity's own extractor resizes differently (TF1-style), so
  its end-to-end KID differs slightly; the estimator is identical.
- IS: the FID Inception's 1008-way ``logits_unbiased`` (needs ``fc.weight`` in the weight file), torch-fidelity's
  splits.
- CLIP score: ``clip_score``'s towers and preprocessing (the Hugging Face CLIPImageProcessor's: shorter side to the
  model's size with PIL bicubic, centre crop); per image ``100 * max(cos(image, caption), 0)``, averaged
  (torchmetrics' definition), the embeddings gathered from every device. Needs a prompt per image (a sampling job's
  manifest, or a source with captions).

A reference set's features are computed once and cached (``reference_cache``: an .npz readable by pytorch-fid, with
``mu`` and ``sigma``, plus the features themselves when KID needs them); a pytorch-fid statistics file is a valid
reference for FID.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import time
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from ldm_jax import storage
from ldm_jax.evaluation import clip_score, fid, image_sets, inception_score, kid
from ldm_jax.training import distributed, transfer
from ldm_jax.training.sharding import batch_sharding, replicated

METRICS = ("fid", "kid", "is", "clip_score")
INCEPTION_METRICS = ("fid", "kid", "is")
RESIZE_NOTE = (
    "pytorch-fid: uint8 pixels -> [0, 1], bilinear resize to 299 (torch F.interpolate, align_corners=False, no "
    "antialias), 2x - 1"
)


def parse_metrics(value: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(m.strip() for m in value.split(",") if m.strip()))
    bad = [m for m in names if m not in METRICS]
    if bad or not names:
        raise ValueError(f"--metrics={value!r}: {bad or 'empty'}; choose from {', '.join(METRICS)}")
    return names


@dataclasses.dataclass
class Networks:
    """The weights the asked metrics need, loaded once (on the host; placed on the mesh by ``score_set``)."""

    inception: Any = None  # FID Inception params (with "fc" for IS)
    clip: Any = None  # a clip_score.ClipScorer
    weights_identity: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def load(cls, metrics, fid_weights: str = "", clip_weights: str = "", clip_arch: str = "") -> Networks:
        out = cls()
        if any(m in INCEPTION_METRICS for m in metrics):
            if not fid_weights:
                raise ValueError(
                    f"--metrics={','.join(metrics)}: FID, KID and IS need --fid_weights (pytorch-fid's "
                    "pt_inception-2015-12-05-6726825d.pth, or its .safetensors / .npz conversion); nothing is downloaded"
                )
            out.inception = jax.device_get(fid.load_fid_inception(fid_weights, classifier="is" in metrics))
            out.weights_identity["fid_weights"] = _file_identity(fid_weights)
        if "clip_score" in metrics:
            if not clip_weights:
                raise ValueError(
                    "--metrics=clip_score needs --clip_weights (a Hugging Face CLIPModel folder or an OpenCLIP "
                    "checkpoint file); nothing is downloaded"
                )
            out.clip = clip_score.load_clip_scorer(clip_weights, arch=clip_arch or None)
            out.weights_identity["clip_weights"] = _file_identity(clip_weights)
        return out


def _file_identity(path: str) -> dict:
    st = os.stat(path)
    return dict(path=os.path.abspath(path), size=st.st_size, mtime_ns=st.st_mtime_ns)


@dataclasses.dataclass
class SetFeatures:
    """What one pass over an image set gives (every process holds the same values)."""

    count: int  # rows scored
    bad: int  # rows that could not be read
    statistics: fid.FeatureStatistics | None = None
    features: np.ndarray | None = None  # [count, 2048] float32, when KID needs them
    logits: np.ndarray | None = None  # [count, 1008], for IS
    clip_scores: np.ndarray | None = None  # [count] per-image CLIP scores
    seconds: float = 0.0


def _pool(stats: fid.FeatureStatistics) -> fid.FeatureStatistics:
    """Every process's statistics pooled exactly; float64 crosses the all-gather as int32 pairs (without x64, jax
    would cast it to float32)."""
    if jax.process_count() == 1:
        return stats
    state = stats.state()
    parts = [np.ascontiguousarray(np.asarray(a, np.float64)).view(np.int32) for a in state]
    gathered = [np.asarray(multihost_utils.process_allgather(p)) for p in parts]
    arrays = [g.reshape(jax.process_count(), *p.shape).view(np.float64) for g, p in zip(gathered, parts, strict=True)]
    counts = arrays[0].reshape(-1).astype(np.int64)
    return fid.FeatureStatistics.pooled(fid.StatisticsState(counts, arrays[1], arrays[2], arrays[3]))


def score_set(images, mesh, networks: Networks, metrics, per_device_batch: int = 16, what: str = "set") -> SetFeatures:
    """One pass of the networks the ``metrics`` need over ``images`` (an ``image_sets`` set), in batches of
    ``per_device_batch`` rows per device over ``mesh``. Every process must call it with the same arguments."""
    n = len(images)
    batch = per_device_batch * mesh.size
    probe = next((item for item in map(images.item, range(min(n, 64))) if item[0] is not None), None)
    if probe is None:
        raise ValueError(f"{images.description}: none of its first images can be read")
    height, width = probe[0].shape[:2]
    use_inception = any(m in INCEPTION_METRICS for m in metrics)
    use_clip = "clip_score" in metrics
    if use_clip and probe[1] is None:
        raise ValueError(f"{images.description}: clip_score needs a prompt per image; this set has none")
    rows = batch_sharding(mesh)
    repl = replicated(mesh)
    weights = transfer.to_mesh(
        dict(
            inception=networks.inception if use_inception else None,
            clip=networks.clip.params if use_clip else None,
        ),
        repl,
    )
    fn = _compiled_scorer(mesh, use_inception, "is" in metrics, networks.clip if use_clip else None)
    stats = fid.FeatureStatistics() if "fid" in metrics else None
    gathered = {"features": [], "logits": [], "clip": [], "valid": []}
    cache: dict[tuple[int, int], dict] = {}
    t0 = time.perf_counter()
    for b0 in range(0, n, batch):

        def load(lo, hi, b0=b0):
            # Rows past the end repeat the last row (their results are dropped); unreadable rows are zeros.
            if (lo, hi) not in cache:
                idx = [min(b0 + r, n - 1) for r in range(lo, hi)]
                items = [images.item(i) for i in idx]
                ims = [im for im, _ in items]
                valid = np.asarray([im is not None and b0 + r < n for im, r in zip(ims, range(lo, hi), strict=True)])
                ims = [np.zeros((height, width, 3), np.uint8) if im is None else im for im in ims]
                for i, im in zip(idx, ims, strict=True):
                    if im.shape[:2] != (height, width):
                        raise ValueError(
                            f"{images.description}: image {i} is {im.shape[1]}x{im.shape[0]}, the first "
                            f"{width}x{height}; a set's images must be one size"
                        )
                entry = dict(images=np.stack(ims), valid=valid)
                if use_clip:
                    entry["pixels"] = networks.clip.preprocess(entry["images"])
                    entry["tokens"] = networks.clip.tokenizer([prompt or "" for _, prompt in items])
                cache[(lo, hi)] = entry
            return cache[(lo, hi)]

        inputs = dict(
            images=transfer.rows_to_mesh(
                (batch, height, width, 3), np.uint8, rows, lambda lo, hi: load(lo, hi)["images"]
            ),
            valid=transfer.rows_to_mesh((batch,), bool, rows, lambda lo, hi: load(lo, hi)["valid"]),
        )
        if use_clip:
            s = networks.clip.image_size
            inputs["pixels"] = transfer.rows_to_mesh(
                (batch, s, s, 3), np.float32, rows, lambda lo, hi: load(lo, hi)["pixels"]
            )
            inputs["tokens"] = transfer.rows_to_mesh(
                (batch, networks.clip.tokenizer.max_length), np.int32, rows, lambda lo, hi: load(lo, hi)["tokens"]
            )
        out = fn(weights, inputs)
        cache.clear()
        if stats is not None:
            # Each process adds its own rows; the hosts' sums are pooled at the end.
            valid_local = dict(transfer.local_rows(out["valid"]))
            for first, block in transfer.local_rows(out["features"]):
                stats.update(block[valid_local[first]])
        if "kid" in metrics:
            gathered["features"].append(transfer.to_host(out["features"]))
        if "is" in metrics:
            gathered["logits"].append(transfer.to_host(out["logits"]))
        if use_clip:
            image, text = transfer.to_host((out["clip_image"], out["clip_text"]))
            gathered["clip"].append(clip_score.clip_score(image, text))
        gathered["valid"].append(transfer.to_host(out["valid"]))
        logging.log_every_n_seconds(logging.INFO, "%s: %d/%d images scored", 30, what, min(b0 + batch, n), n)
    valid = np.concatenate(gathered["valid"])
    result = SetFeatures(count=int(valid.sum()), bad=int(n - valid[:n].sum()), seconds=time.perf_counter() - t0)
    if stats is not None:
        result.statistics = _pool(stats)
    if gathered["features"]:
        result.features = np.concatenate(gathered["features"])[valid]
    if gathered["logits"]:
        result.logits = np.concatenate(gathered["logits"])[valid]
    if gathered["clip"]:
        result.clip_scores = np.concatenate(gathered["clip"])[valid]
    return result


_SCORERS: dict = {}


def _compiled_scorer(mesh, use_inception: bool, use_logits: bool, clip):
    key = (id(mesh), use_inception, use_logits, id(clip))
    if key in _SCORERS:
        return _SCORERS[key]

    def fn(weights, inputs):
        out = {"valid": inputs["valid"]}
        if use_inception:
            features = fid.inception_features(weights["inception"], inputs["images"])
            out["features"] = features
            if use_logits:
                out["logits"] = fid.inception_logits_unbiased(weights["inception"], features)
        if clip is not None:
            out["clip_image"] = clip.image_embeddings(weights["clip"], inputs["pixels"])
            out["clip_text"] = clip.text_embeddings(weights["clip"], inputs["tokens"])
        return out

    _SCORERS[key] = jax.jit(fn, out_shardings=batch_sharding(mesh))
    return _SCORERS[key]


# ------------------------------------------------------------------------------------------------ reference


def reference_cache_path(cache_dir: str, identity: dict) -> str:
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]
    return storage.join(cache_dir, f"{key}.npz")


def load_reference_file(path: str) -> SetFeatures:
    """A pytorch-fid statistics .npz (``mu``, ``sigma``) or our cache (those plus ``count`` and optionally
    ``features``)."""
    with storage.open_read(path) as raw, np.load(raw, allow_pickle=False) as f:
        if "mu" not in f.files or "sigma" not in f.files:
            raise ValueError(f"--reference={path!r}: keys {f.files}; a statistics file holds 'mu' and 'sigma'")
        mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
        features = f["features"].astype(np.float32) if "features" in f.files else None
        count = int(f["count"]) if "count" in f.files else (len(features) if features is not None else 0)
    stats = _FixedStatistics(mu, sigma, count)
    return SetFeatures(count=count, bad=0, statistics=stats, features=features)


class _FixedStatistics:
    """Statistics known only as (mu, sigma): a statistics file."""

    def __init__(self, mu, sigma, count):
        self._mu, self._sigma, self.count = mu, sigma, count

    def mean(self):
        return self._mu

    def covariance(self):
        return self._sigma


def save_reference_file(path: str, result: SetFeatures) -> None:
    """pytorch-fid's layout (``mu``, ``sigma``) plus ``count`` and, when computed, ``features``; atomic."""
    arrays = dict(mu=result.statistics.mean(), sigma=result.statistics.covariance(), count=np.int64(result.count))
    if result.features is not None:
        arrays["features"] = result.features.astype(np.float32)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    storage.write_bytes(path, buffer.getvalue())


def reference_features(spec: str, image_size: int, mesh, networks: Networks, metrics, per_device_batch: int,
                       cache_dir: str, data_dir: str = "", image_key: str = "image") -> tuple[SetFeatures, dict]:  # fmt: skip
    """The reference set's features for ``metrics`` (FID statistics, KID features): from a statistics file, from
    the cache, or computed (and cached by process 0). Returns them and a description of where they came from. The
    features of a cache hit are read by process 0 alone: the other processes get ``None`` (they compute no metric)."""
    needed = tuple(m for m in metrics if m in ("fid", "kid"))
    if spec.endswith(".npz"):
        # Read by process 0 alone (it computes the metrics): a file the other hosts cannot see is no error, and an
        # error process 0 meets stops every process, not process 0 alone while its peers wait in a collective.
        result, error = None, None
        if jax.process_index() == 0:
            try:
                if not storage.isfile(spec):
                    raise FileNotFoundError(f"--reference={spec!r}: no such file")
                result = load_reference_file(spec)
                if "kid" in needed and result.features is None:
                    raise ValueError(
                        f"--reference={spec!r}: a statistics file (mu, sigma) is enough for FID, not KID, which "
                        "compares features: pass the reference images, or a cache written with KID"
                    )
            except (OSError, ValueError) as e:
                error = e
        if not distributed.process_0_says(error is None):
            raise error or ValueError(f"--reference={spec!r}: process 0 could not use it (its log says why)")
        return result, dict(reference=spec, reference_from="statistics file")
    images = image_sets.open_image_set(spec, image_size, data_dir, image_key)
    identity = dict(images.identity, resize=RESIZE_NOTE, **networks.weights_identity)
    path = reference_cache_path(cache_dir, identity) if cache_dir else ""
    # Process 0 alone decides whether the cache serves, and only it reads it (it alone computes the metrics): the
    # other processes' cache folders (a per-host home by default) may hold another answer, and a process that
    # skipped the reference pass while its peers made it would leave their collectives unmatched.
    cached = None
    if path and jax.process_index() == 0 and storage.isfile(path):
        cached = load_reference_file(path)
        if "kid" in needed and cached.features is None:
            cached = None  # written for FID alone: computed again, with the features
    if distributed.process_0_says(cached is not None):
        logging.info("reference features of %s from the cache %s", images.description, path)
        return cached, dict(reference=images.description, reference_from=f"cache {path}")
    result = score_set(images, mesh, networks, needed, per_device_batch, what="reference")
    if path and jax.process_index() == 0:
        save_reference_file(path, result)
    return result, dict(reference=images.description, reference_from="computed", reference_cache=path or None)


def compute(samples: SetFeatures, reference: SetFeatures | None, metrics, kid_subsets: int, kid_subset_size: int,
            seed: int = kid.DEFAULT_SEED) -> dict:  # fmt: skip
    """The metrics' values from the two sets' features."""
    out: dict[str, Any] = {}
    if "fid" in metrics:
        s, r = samples.statistics, reference.statistics
        out["fid"] = fid.frechet_distance(s.mean(), s.covariance(), r.mean(), r.covariance())
    if "kid" in metrics:
        size = kid_subset_size or min(kid.DEFAULT_SUBSET_SIZE, len(samples.features), len(reference.features))
        value = kid.kernel_inception_distance(
            samples.features, reference.features, subsets=kid_subsets, subset_size=size, seed=seed
        )
        out.update(kid_mean=value.mean, kid_std=value.std, kid_subsets=kid_subsets, kid_subset_size=size)
    if "is" in metrics:
        value = inception_score.inception_score(samples.logits, seed=seed)
        out.update(is_mean=value.mean, is_std=value.std)
    if "clip_score" in metrics:
        out["clip_score"] = float(np.mean(samples.clip_scores))
        out["clip_score_std"] = float(np.std(samples.clip_scores))
    return out

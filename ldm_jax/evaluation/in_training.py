"""Evaluation during training (big_vision style): every ``eval.every`` steps the EMA weights generate
``eval.num_samples`` images, which are scored with distribution metrics (FID, KID, IS, CLIP score) and logged as
``eval/<metric>`` to TensorBoard and metrics.jsonl.

The conditions are those of the first ``eval.num_samples`` examples of the validation split (their captions or class
labels; ``eval.prompts_file`` replaces the captions), and the reference for FID and KID is the same examples' images,
centre-cropped at ``data.image_size``: paired, as COCO evaluations pair captions with their images. The image seeds
are ``eval.seed + i`` at every evaluation, so the curve follows the weights, not the noise. The reference features
are computed at the first evaluation of a run and kept. Generation and scoring are split over every device of every
process (``sample_metrics``).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
from absl import logging

from ldm_jax import config_lib, storage
from ldm_jax.data import pipeline
from ldm_jax.evaluation import sample_metrics
from ldm_jax.sampling.prompts import job_prompts


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig(config_lib.Section):
    """``config.eval``: distribution metrics of samples during training (latent diffusion runs)."""

    every: int = 0  # steps between evaluations; 0 = none
    num_samples: int = 256  # images generated (and reference images) per evaluation
    metrics: str = "fid"  # comma-separated: fid, kid, is, clip_score
    prompts_file: str = ""  # text runs: prompts instead of the validation captions (.txt/.jsonl/.csv/.tsv)
    fid_weights: str = ""  # pytorch-fid's FID Inception weights (fid, kid, is)
    clip_weights: str = ""  # a Hugging Face CLIPModel folder or an OpenCLIP file (clip_score)
    clip_arch: str = ""  # an OpenCLIP file's variant when its shapes cannot tell (see ldm_jax.evaluate)
    per_device_batch: int = 8
    seed: int = 1234
    kid_subsets: int = 100
    kid_subset_size: int = 0  # 0: 1000, or the number of samples when fewer

    def validate(self, prefix: str) -> None:
        self.check(self.every >= 0, prefix, "every", "must be >= 0 (0 = no evaluation during training)")
        if not self.every:
            return
        self.check(self.num_samples >= 2, prefix, "num_samples", "must be >= 2 (a covariance needs two images)")
        try:
            metrics = sample_metrics.parse_metrics(self.metrics)
        except ValueError:
            self.check(False, prefix, "metrics", f"must be a comma-separated choice of {sample_metrics.METRICS}")
        # The files are read at the first evaluation, thousands of steps in: a wrong path is named now instead.
        if any(m in sample_metrics.INCEPTION_METRICS for m in metrics):
            self.check(bool(self.fid_weights), prefix, "fid_weights", "FID, KID and IS need the FID Inception weights")
            self.check(os.path.isfile(self.fid_weights), prefix, "fid_weights", "no such file")
        if "clip_score" in metrics:
            self.check(bool(self.clip_weights), prefix, "clip_weights", "clip_score needs CLIP weights")
            self.check(os.path.exists(self.clip_weights), prefix, "clip_weights", "no such file or folder")
        if self.prompts_file:
            self.check(storage.isfile(self.prompts_file), prefix, "prompts_file", "no such file")
        self.check(
            0 <= self.seed and self.seed + self.num_samples <= 2**32, prefix, "seed",
            f"sample i uses seed + i as a uint32 key: must be in [0, {2**32 - self.num_samples}]",
        )  # fmt: skip
        for name in ("per_device_batch", "kid_subsets"):
            self.check(getattr(self, name) >= 1, prefix, name, "must be >= 1")
        if "kid" in metrics:
            self.check(
                self.kid_subset_size == 0 or 2 <= self.kid_subset_size <= self.num_samples, prefix, "kid_subset_size",
                f"must be 0 (automatic) or in [2, eval.num_samples={self.num_samples}]",
            )  # fmt: skip


class PeriodicEval:
    """The ``eval`` section of a latent diffusion task at work: ``evaluate(params, frozen, mesh)`` -> metrics."""

    def __init__(self, task):
        self.task = task
        self.section = EvalConfig.from_config(task.config.eval, "eval.")
        self.metrics = sample_metrics.parse_metrics(self.section.metrics) if self.section.every else ()
        self._prepared = None

    def _prepare(self, mesh):
        e, config = self.section, self.task.config
        networks = sample_metrics.Networks.load(self.metrics, e.fid_weights, e.clip_weights, e.clip_arch)
        source = pipeline.data_source(config.data, "validation")
        n = min(e.num_samples, len(source))
        if n < 2:
            raise ValueError(f"eval.num_samples={e.num_samples}: the validation split has {len(source)} example(s)")
        if "kid" in self.metrics and e.kid_subset_size > n:
            # Raised by every process alike (each sees the same split), not by process 0 alone when it computes KID
            # while the others go on into the next step.
            raise ValueError(
                f"eval.kid_subset_size={e.kid_subset_size}: the validation split gives {n} samples to draw subsets from"
            )
        examples = [source[i] for i in range(n)]
        conditions, prompts = self.task.conditioner.distribution_conditions(examples)
        if e.prompts_file:
            if prompts is None:
                raise ValueError(f"eval.prompts_file={e.prompts_file!r}: this {config.task} run takes no prompts")
            texts = [p.text for p in job_prompts([], e.prompts_file)]
            conditions = prompts = [texts[i % len(texts)] for i in range(n)]
        reference = None
        if any(m in ("fid", "kid") for m in self.metrics):
            images = ArrayImages(np.stack([x["image"] for x in examples]), None, "validation images")
            wanted = tuple(m for m in self.metrics if m in ("fid", "kid"))
            reference = sample_metrics.score_set(images, mesh, networks, wanted, e.per_device_batch, "reference")
        self._prepared = (networks, conditions, prompts, reference)
        logging.info("evaluation during training: %s on %d samples every %d steps", self.metrics, n, e.every)

    def evaluate(self, params, frozen, mesh) -> dict[str, float]:
        if self._prepared is None:
            self._prepare(mesh)
        networks, conditions, prompts, reference = self._prepared
        e, s = self.section, self.task.config.sample
        seeds = [e.seed + i for i in range(len(conditions))]
        images = self.task.generate_images(
            params, frozen, mesh, conditions, seeds, self.task.sampler_options(), s.guidance_scale,
            s.guidance_rescale, s.negative_prompt if prompts is not None else None, e.per_device_batch * mesh.size,
        )  # fmt: skip
        scored = sample_metrics.score_set(
            ArrayImages(images, prompts, "samples"), mesh, networks, self.metrics, e.per_device_batch, "samples"
        )
        if jax.process_index() != 0:
            return {}  # every process holds the same features; process 0 computes the metrics and logs them
        values = sample_metrics.compute(scored, reference, self.metrics, e.kid_subsets, e.kid_subset_size, e.seed)
        return {f"eval/{k}": float(v) for k, v in values.items() if k not in ("kid_subsets", "kid_subset_size")}


class ArrayImages:
    """An image set held in memory (``image_sets``' interface)."""

    def __init__(self, images: np.ndarray, prompts: list[str] | None, description: str):
        self.images, self.prompts, self.description = images, prompts, description

    def __len__(self) -> int:
        return len(self.images)

    def item(self, i: int):
        return self.images[i], (self.prompts[i] if self.prompts is not None else None)

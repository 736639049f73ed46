"""A sampling job: images for a list of sources (prompts, class labels, low-resolution images, or nothing), each
``per_source`` times, written into one folder by every process of a JAX job, resumable after a kill at any point.

The plan: image ``index = source * per_source + sample`` uses the seed ``seed + index``; its pixels are a function of
its condition, its seed and the settings alone (the sampler gives each image its own keys; see
``LatentDiffusionTask.generate_fn``), not of which process, device or batch row generates it. Every process computes
the same plan, the same set of images still to make (from the outputs found: ``sampling.outputs``), and the same
batches of them; each batch is split over every device of every process, and each process writes the rows its own
devices computed. So a job runs on any number of hosts, and a rerun after a kill makes exactly the missing images.

``job.json`` records what the images depend on (the model, the settings, a digest of the sources); a rerun into the
same folder with anything else is refused by name instead of mixing two jobs' images. ``summary.json`` records the
throughput, the per-process counts and the settings of the last run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from ldm_jax import config_lib, storage
from ldm_jax.imaging import make_grid, save_png, to_uint8
from ldm_jax.sampling import outputs
from ldm_jax.training import transfer
from ldm_jax.training.distributed import barrier, processes_where

JOB_FILE = "job.json"
SUMMARY_FILE = "summary.json"
# A grid.png is drawn for jobs up to this many images (a row per source).
GRID_MAX_IMAGES = 256
# Progress lines at most this often (seconds).
LOG_EVERY_S = 10.0


def digest(value: Any) -> str:
    """sha256 of ``value``: JSON-able data, or numpy arrays (by dtype, shape and bytes) inside lists and dicts."""
    h = hashlib.sha256()

    def feed(x):
        if isinstance(x, np.ndarray):
            h.update(f"array{x.dtype.str}{x.shape}".encode())
            h.update(np.ascontiguousarray(x).tobytes())
        elif isinstance(x, dict):
            h.update(b"{")
            for k in sorted(x):
                h.update(json.dumps(k).encode())
                feed(x[k])
            h.update(b"}")
        elif isinstance(x, (list, tuple)):
            h.update(b"[")
            for v in x:
                feed(v)
            h.update(b"]")
        else:
            h.update(json.dumps(x, sort_keys=True).encode())

    feed(value)
    return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class JobSpec:
    """What a job makes and how it writes it."""

    outdir: str
    model: dict  # identifies the weights: checkpoint step, which weights, a digest of the run's config
    settings: dict  # sampler, guidance, size, seed, ... : everything the pixels depend on besides the sources
    sources: list[dict]  # per source, its manifest fields (id, prompt or class or input file, extra columns)
    sources_digest: str  # of everything the sources feed the model (texts, labels, input pixels)
    per_source: int
    seed: int
    output_format: str = "png"
    shard_size: int = 1000

    @property
    def num_images(self) -> int:
        return len(self.sources) * self.per_source

    def identity(self) -> dict:
        """``job.json``: the fields a rerun must match."""
        return dict(
            model=self.model,
            settings=self.settings,
            sources=dict(count=len(self.sources), digest=self.sources_digest),
            per_source=self.per_source,
            seed=self.seed,
            output_format=self.output_format,
            shard_size=self.shard_size if self.output_format == "webdataset" else None,
        )

    def entry(self, index: int) -> dict:
        """Image ``index``'s manifest entry."""
        source, sample = divmod(index, self.per_source)
        return dict(index=index, sample=sample, seed=self.seed + index, **self.sources[source], **self.settings)


def _differences(old: dict, new: dict) -> list[str]:
    def shown(value):  # a setting one side lacks reads as None
        return None if value is dataclasses.MISSING else value

    return [f"{k}: {shown(a)!r} there, {shown(b)!r} now" for k, a, b in config_lib.differences(old, new)]


# What a rerun does with an --outdir that holds a job with other settings.
ON_OTHER_JOB = ("refuse", "move_aside")


def _aside_name(outdir: str) -> str:
    """The first free ``<outdir>.before-<k>`` (k = 1, 2, ...): an earlier job moved aside is never overwritten."""
    return storage.first_free(f"{outdir}.before-{k}" for k in itertools.count(1))


def open_job(spec: JobSpec, on_other_job: str = "refuse") -> None:
    """Creates the job folder and its ``job.json``, or checks a folder made before; removes what a killed run left
    half-written. A folder that holds a job with other settings is refused (ValueError naming every setting that
    differs) or, with ``on_other_job="move_aside"``, moved whole to ``<outdir>.before-<k>`` and the job started
    afresh (nothing is deleted). A folder that holds other files and no job is always refused."""
    if on_other_job not in ON_OTHER_JOB:
        raise ValueError(f"--on_other_job={on_other_job!r}: must be one of {', '.join(ON_OTHER_JOB)}")
    path = storage.join(spec.outdir, JOB_FILE)
    identity = json.loads(json.dumps(spec.identity()))  # as it reads back (tuples become lists)
    move, error = False, None
    if storage.exists(path):
        old = json.loads(storage.read_text(path))
        diff = _differences(old, identity)
        if diff and on_other_job == "refuse":
            error = ValueError(
                f"--outdir={spec.outdir!r} holds a sampling job with other settings ({'; '.join(diff)}); its images "
                "would not be one job's. Use another --outdir, the folder's settings to finish that job, or "
                f"--on_other_job=move_aside to move it to {spec.outdir}.before-<k> and start this one"
            )
        move = bool(diff)
    else:
        ours = (outputs.SHARDS, outputs.PARTS, "manifest.jsonl", "grid.png", SUMMARY_FILE)
        other = [n for n in storage.listdir(spec.outdir) if n not in ours and not outputs.is_temporary(n)]
        if other:
            error = ValueError(
                f"--outdir={spec.outdir!r} holds files and no {JOB_FILE} (e.g. {sorted(other)[:3]}): not a sampling "
                "job's folder; use a new or empty folder"
            )
    # On a shared filesystem every process decides alike; on hosts that share none, one may refuse its folder while
    # the others' are fine. Every process then stops, each with the reason it has, instead of waiting forever at
    # the next barrier for the one that stopped.
    refused = processes_where(error is not None)
    if error is not None:
        raise error
    if refused:
        raise ValueError(
            f"--outdir={spec.outdir!r}: process(es) {refused} refused the folder as they see it (their log says why)"
        )
    # Every process has read the folder before any changes it.
    barrier("sampling job checked")
    if move and jax.process_index() == 0:
        aside = _aside_name(spec.outdir)
        storage.rename(spec.outdir, aside)
        logging.warning(
            "--outdir=%s held a job with other settings (%s): moved to %s", spec.outdir, "; ".join(diff), aside
        )
    barrier("sampling job moved aside")
    if move and jax.process_index() != 0 and storage.exists(path):  # a host whose filesystem process 0 cannot see
        storage.rename(spec.outdir, _aside_name(spec.outdir))
    # Process 0 writes the new job.json only after every process has looked: one that looked later could take the
    # new job for the old one and move it.
    barrier("sampling job moved aside everywhere")
    if jax.process_index() == 0:
        storage.makedirs(spec.outdir)
        removed = outputs.remove_temporaries(spec.outdir)
        if removed:
            logging.info("removed %d unfinished file(s) of an interrupted run in %s", removed, spec.outdir)
        if not storage.exists(path):
            outputs.write_json(path, identity)
    # Nobody writes before process 0 has cleaned up (on a shared filesystem its removal could hit their files).
    barrier("sampling job opened")
    storage.makedirs(spec.outdir)
    if jax.process_index() != 0 and not storage.exists(path):
        # A host that does not see process 0's folder keeps its own job.json: its rerun checks the settings and
        # continues, instead of finding images and no job.
        outputs.write_json(path, identity)


def done_outputs(spec: JobSpec) -> np.ndarray:
    """``outputs.find_done`` of the folder as every process sees it, combined: an image is done when any process
    finds it (processes whose hosts share no filesystem each find their own)."""
    where = outputs.find_done(spec.outdir, spec.output_format, spec.num_images).astype(np.int32)
    if jax.process_count() > 1:
        where = np.asarray(multihost_utils.process_allgather(where)).reshape(-1, spec.num_images).max(axis=0)
    return where


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h} h {m:02d} min" if h else (f"{m} min {s:02d} s" if m else f"{s} s")


def run_job(
    spec: JobSpec,
    generate: Callable[[list[int]], Any],
    batch_size: int,
    mesh_size: int,
    on_other_job: str = "refuse",
) -> dict:
    """Makes the images of ``spec`` that its folder lacks; returns the summary (also written as ``summary.json``).

    ``generate(indices)``: the task's ``generate_batches`` for the images ``indices`` (their conditions and seeds),
    yielding ``(start, n, images)``; ``batch_size``: images per batch over the whole mesh; ``on_other_job``: see
    ``open_job``.
    """
    generate(list(range(spec.num_images)))  # the inputs are checked (ValueError) before anything is written
    open_job(spec, on_other_job)
    where = done_outputs(spec)
    todo = [int(i) for i in np.flatnonzero(where < 0)]
    done_before = spec.num_images - len(todo)
    logging.info(
        "sampling job %s: %d images, %d done before, %d to make in batches of %d over %d devices and %d process(es)",
        spec.outdir, spec.num_images, done_before, len(todo), batch_size, mesh_size, jax.process_count(),
    )  # fmt: skip
    writer = outputs.make_writer(spec.output_format, spec.outdir, jax.process_index(), spec.shard_size)
    made = 0  # by this process
    t0 = time.perf_counter()
    first_batch_s = None
    last_log = t0
    finished = 0  # images of every process, this run
    try:
        if todo:
            for start, n, images in generate(todo):
                for first, block in transfer.local_rows(images):
                    for row in range(first, min(first + len(block), n)):
                        index = todo[start + row]
                        writer.add(index, to_uint8(block[row - first]), spec.entry(index))
                        made += 1
                writer.commit()
                finished = start + n
                now = time.perf_counter()
                if first_batch_s is None:
                    first_batch_s = now - t0
                if jax.process_index() == 0 and (now - last_log >= LOG_EVERY_S or finished == len(todo)):
                    last_log = now
                    rate = finished / (now - t0)
                    left = (len(todo) - finished) / rate if rate > 0 else float("inf")
                    logging.info(
                        "sample: %d/%d images (%.1f%%), %.2f images/s (compile included), ETA %s; this process wrote %d",
                        done_before + finished, spec.num_images, 100 * (done_before + finished) / spec.num_images,
                        rate, _duration(left), made,
                    )  # fmt: skip
    finally:
        writer.close()
    seconds = time.perf_counter() - t0
    barrier("sampling job written")
    per_process = [made]
    if jax.process_count() > 1:
        per_process = [int(x) for x in np.asarray(multihost_utils.process_allgather(np.int32(made))).reshape(-1)]
    where = done_outputs(spec)
    missing = int(np.sum(where < 0))
    summary = dict(
        outdir=storage.absolute(spec.outdir),
        num_images=spec.num_images,
        done_before=done_before,
        made_this_run=len(todo),
        missing=missing,
        seconds=round(seconds, 3),
        first_batch_seconds=None if first_batch_s is None else round(first_batch_s, 3),
        images_per_second=round(len(todo) / seconds, 4) if todo and seconds > 0 else None,
        # Steady state: without the first batch, which includes the compile.
        images_per_second_after_first_batch=(
            round((len(todo) - min(batch_size, len(todo))) / (seconds - first_batch_s), 4)
            if len(todo) > batch_size and seconds > first_batch_s
            else None
        ),
        per_process_written=per_process,
        processes=jax.process_count(),
        devices=mesh_size,
        batch_size=batch_size,
        **spec.identity(),
    )
    if jax.process_index() == 0:
        if missing:
            logging.error("%d image(s) of the job are missing after the run", missing)
        entries = []
        for i in np.flatnonzero(where >= 0):
            e = spec.entry(int(i))
            if spec.output_format == "png":
                e["file"] = outputs.png_name(int(i))
            else:
                e.update(shard=f"{outputs.SHARDS}/{outputs.shard_name(int(where[i]))}", key=outputs.key_of(int(i)))
            entries.append(e)
        outputs.write_manifest(spec.outdir, entries)
        if 0 < spec.num_images <= GRID_MAX_IMAGES and not missing:
            found = outputs.read_images(spec.outdir, spec.output_format, range(spec.num_images))
            if len(found) < spec.num_images:  # hosts that share no filesystem each hold their own images
                logging.info(
                    "no grid.png: %d of the %d images are in other hosts' folders", spec.num_images - len(found),
                    spec.num_images,
                )  # fmt: skip
            else:
                grid = np.stack([found[i] for i in range(spec.num_images)])
                ncol = spec.per_source if spec.per_source > 1 else None
                save_png(
                    storage.join(spec.outdir, "grid.png"),
                    make_grid(grid, ncol=ncol),
                    upscale=4 if grid.shape[1] <= 64 else 1,
                )
        outputs.write_json(storage.join(spec.outdir, SUMMARY_FILE), summary)
        logging.info(
            "sampling job %s: %d images made in %s (%s images/s), %d done before, %d missing",
            spec.outdir, len(todo), _duration(seconds), summary["images_per_second"], done_before, missing,
        )  # fmt: skip
    return summary

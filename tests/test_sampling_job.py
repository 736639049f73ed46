"""Sharded, resumable sampling jobs (``ldm_jax.sample``) and distribution metrics of their images
(``ldm_jax.evaluate --samples``), on the session's tiny txt2img run.

One job (10 prompts from an MLPerf-style TSV x 2 images, 20 DDIM steps, 1 image per device per batch) is made four
ways: 1 process x 8 devices (PNG, the reference), 2 processes x 4 devices (PNG: every file bit-identical), and
killed with SIGKILL mid-run then rerun with the same command, as WebDataset shards and as PNGs (every image exactly
once, no partial file, pixels bit-identical to the reference).
"""

import json
import os
import shutil
import signal
import sys
import tarfile
import time

import numpy as np
import pytest
from cli import ROOT, run_module, start, two_process_job, wait_all
from metric_weights import write_fid_inception
from PIL import Image

from ldm_jax.evaluation import fid, image_sets, sample_metrics
from ldm_jax.sampling import outputs
from ldm_jax.sampling.prompts import job_prompts, read_prompts_file

PROMPTS = [
    "a large red circle in the center on a black background",
    "a small blue square at the top left on a white background",
    "a large yellow triangle at the bottom right on a gray background",
    "a small green circle on the left on a black background",
    "a large white square at the top on a black background",
    "a small red triangle at the bottom on a white background",
    "a large blue circle on the right on a gray background",
    "a small yellow square in the center on a black background",
    "a large green triangle at the top right on a white background",
    "a small white circle at the bottom left on a gray background",
]
PER = 2
N = len(PROMPTS) * PER


def _job_args(workdir, prompts_file, outdir, *extra):
    return [
        f"--workdir={workdir}", f"--prompts_file={prompts_file}", f"--num_per_prompt={PER}", "--num_steps=20",
        "--sampler=ddim", "--per_device_batch=1", "--seed=7", f"--outdir={outdir}", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def jobs(txt2img_workdir, tmp_path_factory):
    root = tmp_path_factory.mktemp("sampling_job")
    tsv = root / "captions.tsv"
    rows = ["id\timage_id\tcaption"] + [f"{1000 + 7 * i}\t{500 + i}\t{p}" for i, p in enumerate(PROMPTS)]
    tsv.write_text("\n".join(rows) + "\n")
    one = run_module("ldm_jax.sample", *_job_args(txt2img_workdir, tsv, root / "one"))
    assert one.returncode == 0, one.stderr[-3000:]
    # The two-process job's --outdir already holds an earlier job at guidance 9 (the one-process job's files, its
    # job.json edited), and a folder moved aside before it (.before-1): --on_other_job=move_aside moves the earlier
    # job whole to .before-2 on both processes' agreement and starts afresh.
    earlier = root / "two"
    shutil.copytree(root / "one", earlier)
    job = json.loads((earlier / "job.json").read_text())
    job["settings"]["guidance_scale"] = 9.0
    (earlier / "job.json").write_text(json.dumps(job))
    (root / "two.before-1").mkdir()
    (root / "two.before-1" / "mine.txt").write_text("moved aside by an earlier run")
    earlier_files = _files(earlier)
    module = [sys.executable, "-m", "ldm_jax.sample"]
    args = [*_job_args(txt2img_workdir, tsv, root / "two"), "--on_other_job=move_aside"]
    procs = two_process_job([*module, *args], str(root / "two"), 4)
    outputs_two = wait_all(procs, timeout=600)
    return dict(root=root, tsv=tsv, workdir=txt2img_workdir, earlier_files=earlier_files, outputs_two=outputs_two)


def _files(folder) -> dict[str, bytes]:
    """Every file under ``folder`` by relative path, with its bytes."""
    return {
        os.path.relpath(os.path.join(d, n), folder): open(os.path.join(d, n), "rb").read()
        for d, _, names in os.walk(folder)
        for n in names
    }


def _pngs(folder) -> dict[str, bytes]:
    return {n: (folder / n).read_bytes() for n in sorted(os.listdir(folder)) if n.endswith(".png") and n != "grid.png"}


def _manifest(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]


def test_prompt_files_of_every_kind(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n  a dog  \n")
    assert [(p.id, p.text) for p in job_prompts(["a cow"], str(tmp_path / "p.txt"))] == [
        ("0", "a cow"), ("1", "a cat"), ("2", "a dog"),
    ]  # fmt: skip
    (tmp_path / "p.jsonl").write_text('{"id": 9, "caption": "a cat", "extra": 1}\n{"caption": "a dog"}\n')
    got = job_prompts([], str(tmp_path / "p.jsonl"))
    assert [(p.id, p.text, p.extra) for p in got] == [("9", "a cat", {"extra": 1}), ("1", "a dog", {})]
    # MLPerf's COCO TSV: id (the caption's), image_id, caption.
    (tmp_path / "p.tsv").write_text("id\timage_id\tcaption\n12\t34\ta cat, sitting\n13\t34\ta dog\n")
    got = read_prompts_file(str(tmp_path / "p.tsv"))
    assert [(p.id, p.text, p.extra) for p in got] == [("12", "a cat, sitting", {"image_id": "34"}), ("13", "a dog", {"image_id": "34"})]  # fmt: skip
    (tmp_path / "p.csv").write_text('key,prompt\nx,"a cat, sitting"\n')
    assert [(p.id, p.text) for p in job_prompts([], str(tmp_path / "p.csv"), id_column="key")] == [("x", "a cat, sitting")]  # fmt: skip
    with pytest.raises(ValueError, match="no caption column"):
        (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
        read_prompts_file(str(tmp_path / "bad.csv"))
    with pytest.raises(ValueError, match="ids must be unique"):
        (tmp_path / "dup.tsv").write_text("id\tcaption\n1\ta\n1\tb\n")
        job_prompts([], str(tmp_path / "dup.tsv"))
    with pytest.raises(ValueError, match="prompt 1 .* is empty"):
        (tmp_path / "empty.jsonl").write_text('{"caption": "a"}\n{"caption": " "}\n')
        read_prompts_file(str(tmp_path / "empty.jsonl"))
    with pytest.raises(ValueError, match="unknown type '.md'"):
        read_prompts_file(str(tmp_path / "p.md"))
    with pytest.raises(ValueError, match=r"p.jsonl:1: not a JSON object"):
        (tmp_path / "p.jsonl").write_text("[1, 2\n")
        read_prompts_file(str(tmp_path / "p.jsonl"))


def test_two_processes_write_the_files_one_process_writes(jobs):
    one, two = jobs["root"] / "one", jobs["root"] / "two"
    a, b = _pngs(one), _pngs(two)
    assert len(a) == N and sorted(a) == sorted(b)
    assert all(a[name] == b[name] for name in a), [n for n in a if a[n] != b[n]]
    assert (one / "manifest.jsonl").read_text() == (two / "manifest.jsonl").read_text()
    lines = _manifest(one)
    assert [x["index"] for x in lines] == list(range(N)) and [x["seed"] for x in lines] == [7 + i for i in range(N)]
    assert [(x["id"], x["sample"], x["image_id"]) for x in lines[:3]] == [("1000", 0, "500"), ("1000", 1, "500"), ("1007", 0, "501")]  # fmt: skip
    assert lines[2]["prompt"] == PROMPTS[1] and lines[0]["num_steps"] == 20
    # The earlier job it found there was moved, not merged or deleted: byte for byte, past the folder moved before.
    assert _files(jobs["root"] / "two.before-2") == jobs["earlier_files"]
    assert _files(jobs["root"] / "two.before-1") == {"mine.txt": b"moved aside by an earlier run"}
    assert "settings.guidance_scale: 9.0 there, 3.0 now" in jobs["outputs_two"][0]
    summary = json.loads((two / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["devices"] == 8 and summary["missing"] == 0
    assert sum(summary["per_process_written"]) == N and min(summary["per_process_written"]) > 0
    assert summary["made_this_run"] == N and summary["images_per_second"] > 0


def _kill_when(proc, ready, timeout=300):
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(
                f"the job exited ({proc.returncode}) before the kill:\n{open(proc.log).read()[-3000:]}"
            )
        assert time.monotonic() < deadline, "the job made nothing in time"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _part_lines(outdir) -> int:
    part = outdir / outputs.PARTS / "p00000.jsonl"
    return part.read_text().count("\n") if part.exists() else 0


@pytest.mark.parametrize("output_format", ["webdataset", "png"])
def test_a_killed_job_rerun_makes_every_image_once_and_bit_identical(jobs, tmp_path, output_format):
    outdir = tmp_path / "job"
    args = _job_args(jobs["workdir"], jobs["tsv"], outdir, f"--output_format={output_format}", "--shard_size=3")
    proc = start([sys.executable, "-m", "ldm_jax.sample", *args], str(tmp_path / "killed.log"))
    # Killed once the first batch is recorded: a shard is open (webdataset: 8 rows per batch, 3 per shard) or the
    # next batch's files are being written.
    _kill_when(proc, lambda: _part_lines(outdir) > 0)
    assert not (outdir / "summary.json").exists(), "the job ended before the kill"
    done = outputs.find_done(str(outdir), output_format, N)
    assert 0 < (done >= 0).sum() < N
    # Rerun on 4 devices: the same per-device program completes the 8-device job bit for bit.
    wait_all([start([sys.executable, "-m", "ldm_jax.sample", *args], str(tmp_path / "rerun.log"), 4)], timeout=600)
    summary = json.loads((outdir / "summary.json").read_text())
    assert summary["done_before"] == int((done >= 0).sum()) and summary["made_this_run"] == N - summary["done_before"]
    reference = {i: np.asarray(Image.open(jobs["root"] / "one" / outputs.png_name(i))) for i in range(N)}
    if output_format == "webdataset":
        names = sorted(os.listdir(outdir / "shards"))
        assert names and all(n.endswith(".tar") for n in names)  # no unfinished shard left
        keys = []
        for name in names:
            with tarfile.open(outdir / "shards" / name) as tar:
                members = tar.getnames()
                keys += [m[:-4] for m in members if m.endswith(".png")]
                for m in members:
                    if m.endswith(".png"):
                        got = np.asarray(Image.open(tar.extractfile(m)))
                        np.testing.assert_array_equal(got, reference[int(m[:-4])], err_msg=m)
                    if m.endswith(".txt"):
                        assert tar.extractfile(m).read().decode() == PROMPTS[int(m[:-4]) // PER]
        assert sorted(keys) == [outputs.key_of(i) for i in range(N)]  # every image exactly once
    else:
        assert not [n for n in os.listdir(outdir) if n.endswith(".tmp")]
        for i in range(N):
            assert (outdir / outputs.png_name(i)).read_bytes() == (
                jobs["root"] / "one" / outputs.png_name(i)
            ).read_bytes()
    entries = _manifest(outdir)
    assert [e["index"] for e in entries] == list(range(N))
    one = _manifest(jobs["root"] / "one")
    strip = lambda e: {k: v for k, v in e.items() if k not in ("file", "shard", "key")}  # noqa: E731
    assert [strip(e) for e in entries] == [strip(e) for e in one]
    assert (outdir / "grid.png").exists()


def test_a_run_trained_before_the_eval_section_still_samples(jobs):
    """Sampling never reads ``config.eval`` (training does, and validates it): an older run's config.json without
    the section builds its task and resolves its sampling inputs."""
    from ldm_jax import config_lib
    from ldm_jax.tasks import build_task
    from ldm_jax.tasks.protocol import SampleInputs

    config = config_lib.load_config(os.path.join(jobs["workdir"], "config.json"))
    del config["eval"]
    task = build_task(config)
    request = task.sample_request(SampleInputs(prompts=("a red circle",)))
    assert request.conditions == ["a red circle"]
    # Another resolution is named by its flag (tiny run: f=4 first stage, 2 UNet levels: multiples of 8), not as the
    # run's data.image_size or unet.block_out_channels, which the user did not change.
    assert task.sample_request(SampleInputs(prompts=("a red circle",), image_size=24)).conditions
    with pytest.raises(ValueError, match=r"--image_size=20: must be a multiple of 8 .* e.g. 16 or 24"):
        task.sample_request(SampleInputs(prompts=("a red circle",), image_size=20))


def test_a_job_folder_refuses_other_settings_by_name(jobs, tmp_path):
    one = jobs["root"] / "one"
    before = {n: (one / n).stat().st_mtime_ns for n in os.listdir(one)}
    proc = run_module(
        "ldm_jax.sample", *_job_args(jobs["workdir"], jobs["tsv"], one, "--guidance_scale=5", "--per_device_batch=2")
    )
    assert proc.returncode != 0
    assert "settings.guidance_scale: 3.0 there, 5.0 now" in proc.stderr, proc.stderr[-2000:]
    assert "settings.per_device_batch: 1 there, 2 now" in proc.stderr
    assert "--on_other_job=move_aside" in proc.stderr  # the way out, named
    assert {n: (one / n).stat().st_mtime_ns for n in os.listdir(one)} == before  # nothing touched
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    proc = run_module("ldm_jax.sample", *_job_args(jobs["workdir"], jobs["tsv"], other))
    assert proc.returncode != 0 and "holds files and no job.json" in proc.stderr, proc.stderr[-2000:]
    assert sorted(os.listdir(other)) == ["notes.txt"]
    # Seeds past uint32 are refused before the folder is written (its job.json had blocked the corrected rerun).
    seeded = tmp_path / "seeded"
    proc = run_module("ldm_jax.sample", *_job_args(jobs["workdir"], jobs["tsv"], seeded, f"--seed={2**32 - 1}"))
    assert proc.returncode != 0 and f"--seed={2**32 - 1}: image i uses seed + i" in proc.stderr, proc.stderr[-2000:]
    assert not seeded.exists()


# ---------------------------------------------------------------------------------------------- metrics


@pytest.fixture(scope="module")
def fid_weights(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("fid") / "inception.npz")
    write_fid_inception(path)
    return path


def test_hosts_that_share_no_filesystem_each_keep_their_images_and_rerun(jobs, tmp_path):
    """Two processes whose --outdir (relative, from two working folders) are two folders, as on hosts without a
    shared filesystem: together they hold the one-process job's images, each its own; process 0 writes the
    manifest of all and no grid (it cannot see every image); a rerun finds the job complete on both (process 1
    kept its own job.json) instead of refusing process 1's folder as "files and no job.json"."""
    hosts = [tmp_path / "host0", tmp_path / "host1"]
    for h in hosts:
        h.mkdir()
    argv = [sys.executable, "-m", "ldm_jax.sample", *_job_args(jobs["workdir"], jobs["tsv"], "job")]
    for run in range(2):
        procs = two_process_job(
            argv, str(tmp_path / f"run{run}"), 4, env={"PYTHONPATH": ROOT}, process_cwd=tuple(map(str, hosts))
        )
        wait_all(procs, timeout=600)
    one = _pngs(jobs["root"] / "one")
    mine = [_pngs(h / "job") for h in hosts]
    assert mine[0] and mine[1] and not set(mine[0]) & set(mine[1])
    assert {**mine[0], **mine[1]} == one
    assert (hosts[0] / "job" / "manifest.jsonl").read_text() == (jobs["root"] / "one" / "manifest.jsonl").read_text()
    assert not (hosts[0] / "job" / "grid.png").exists()
    assert json.loads((hosts[1] / "job" / "job.json").read_text()) == json.loads(
        (hosts[0] / "job" / "job.json").read_text()
    )
    summary = json.loads((hosts[0] / "job" / "summary.json").read_text())
    assert summary["done_before"] == N and summary["made_this_run"] == 0 and summary["missing"] == 0, summary


def test_metrics_of_a_job_are_the_same_from_every_layout_and_reader(jobs, fid_weights, tmp_path):
    """The PNG job, the 2-process job and the same images read as a ``webdataset:`` source of the killed-and-rerun
    shards give the same features; FID/KID against an identical set are ~0; statistics round-trip through
    pytorch-fid's .npz; the reference is cached."""
    from ldm_jax.training.sharding import make_mesh

    mesh = make_mesh(-1, 1)
    networks = sample_metrics.Networks.load(("fid", "kid", "is"), fid_weights)
    one = image_sets.open_image_set(str(jobs["root"] / "one"))
    assert one.item(3)[1] == PROMPTS[1]
    a = sample_metrics.score_set(one, mesh, networks, ("fid", "kid", "is"), per_device_batch=1)
    folder = image_sets.open_image_set(f"folder:{jobs['root'] / 'two'}", 16)  # a plain folder: grid.png too
    assert len(folder) == N + 1
    b = sample_metrics.score_set(
        image_sets.open_image_set(str(jobs["root"] / "two")), mesh, networks, ("fid", "kid"), 3
    )
    assert a.count == b.count == N
    np.testing.assert_allclose(a.features, b.features, rtol=1e-5, atol=1e-6)  # same pixels, other batch layout
    np.testing.assert_allclose(
        a.statistics.covariance(), np.cov(a.features.astype(np.float64), rowvar=False), atol=1e-9
    )
    values = sample_metrics.compute(a, b, ("fid", "kid", "is"), kid_subsets=5, kid_subset_size=10)
    assert abs(values["fid"]) < 1e-6 and abs(values["kid_mean"]) < 1e-6 and values["is_mean"] >= 1.0
    path = tmp_path / "stats.npz"
    fid.save_statistics(str(path), a.statistics.mean(), a.statistics.covariance())
    with np.load(path) as f:  # pytorch-fid's layout
        assert sorted(f.files) == ["mu", "sigma"]
    stats_ref = sample_metrics.load_reference_file(str(path))
    assert sample_metrics.compute(b, stats_ref, ("fid",), 1, 0)["fid"] == pytest.approx(values["fid"], abs=1e-9)
    with pytest.raises(ValueError, match="is enough for FID, not KID"):
        sample_metrics.reference_features(str(path), 16, mesh, networks, ("kid",), 1, "")
    cache = tmp_path / "cache"
    ref1, where1 = sample_metrics.reference_features(str(jobs["root"] / "two"), 16, mesh, networks, ("fid", "kid"), 2, str(cache))  # fmt: skip
    ref2, where2 = sample_metrics.reference_features(str(jobs["root"] / "two"), 16, mesh, networks, ("fid", "kid"), 2, str(cache))  # fmt: skip
    assert where1["reference_from"] == "computed" and where2["reference_from"].startswith("cache")
    np.testing.assert_array_equal(ref1.features, ref2.features)
    np.testing.assert_array_equal(ref1.statistics.covariance(), ref2.statistics.covariance())


def test_evaluate_cli_two_processes_score_like_one(jobs, fid_weights, tmp_path):
    """``ldm_jax.evaluate --samples`` as 2 processes x 4 devices (each decodes its own rows; FID statistics pooled
    over hosts) and as 1 x 8: the same FID, KID and IS; metrics.json written. The reference features are cached in
    process 0's cache folder and not in process 1's (each host's own home by default): process 0's cache serves
    both, instead of process 1 alone scoring the reference while process 0 scores the samples."""
    from ldm_jax.training.sharding import make_mesh

    reference = f"folder:{jobs['root'] / 'two'}"
    cache_0, cache_1 = tmp_path / "cache_0", tmp_path / "cache_1"
    networks = sample_metrics.Networks.load(("fid", "kid", "is"), fid_weights)
    sample_metrics.reference_features(reference, 16, make_mesh(-1, 1), networks, ("fid", "kid"), 2, str(cache_0))
    (cached,) = os.listdir(cache_0)
    common = [f"--samples={jobs['root'] / 'one'}", f"--reference={reference}", "--metrics=fid,kid,is"]
    common += [f"--fid_weights={fid_weights}", "--per_device_batch=1", "--kid_subsets=10"]
    procs = two_process_job(
        [sys.executable, "-m", "ldm_jax.evaluate", *common, f"--out={tmp_path / 'two.json'}"],
        str(tmp_path / "e"),
        4,
        process_env=({"LDM_JAX_REFERENCE_CACHE": str(cache_0)}, {"LDM_JAX_REFERENCE_CACHE": str(cache_1)}),
    )
    wait_all(procs, timeout=600)
    proc = run_module("ldm_jax.evaluate", *common, f"--reference_cache={cache_0}", f"--out={tmp_path / 'one.json'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    two, one = (json.loads((tmp_path / f"{x}.json").read_text()) for x in ("two", "one"))
    assert two["processes"] == 2 and one["processes"] == 1 and two["num_samples"] == one["num_samples"] == N
    assert two["num_reference"] == N + 1  # grid.png is an image of the folder too
    assert two["reference_from"] == one["reference_from"] == f"cache {cache_0 / cached}"
    assert os.listdir(cache_0) == [cached] and not cache_1.exists()
    for name in ("fid", "kid_mean", "kid_std", "is_mean", "is_std"):
        assert two[name] == pytest.approx(one[name], rel=1e-6, abs=1e-9), name
    bad = run_module("ldm_jax.evaluate", f"--samples={jobs['root'] / 'one'}", "--metrics=fid")
    assert bad.returncode != 0 and "compare with --reference" in bad.stderr
    plain = tmp_path / "plain"  # an image folder: its side is the user's to choose, and the message says how
    shutil.copytree(jobs["root"] / "one", plain, ignore=shutil.ignore_patterns("*.json*"))
    bad = run_module("ldm_jax.evaluate", f"--samples={plain}", "--metrics=is", f"--fid_weights={fid_weights}")
    assert bad.returncode != 0 and "centre-cropped to --reference_image_size, which is 0" in bad.stderr, bad.stderr
    bad = run_module("ldm_jax.evaluate", f"--samples={jobs['root'] / 'one'}", "--metrics=fid,lpips")
    assert bad.returncode != 0 and "choose from fid, kid, is, clip_score" in bad.stderr
    bad = run_module("ldm_jax.evaluate", f"--samples={jobs['root'] / 'one'}", "--split=validation", "--metrics=is")
    assert bad.returncode != 0 and "--split: not an option of --samples evaluation" in bad.stderr

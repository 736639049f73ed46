"""The latent cache (``ldm_jax.cache_latents``, ``data.source=latents:DIR``): a step from the cache equals a step
from the pixels it was made from, a run trained from it follows the pixel run, its bytes do not depend on the number
of workers, nor its records (up to float32 rounding) on the number of processes, and what cannot work with it is
refused by name."""

import copy
import glob
import json
import os
import sys

import jax
import numpy as np
import pytest

from cli import run_module, two_process_job, wait_all

from configs import inpainting, txt2img
from ldm_jax import cache_latents
from ldm_jax.data import latent_cache, pipeline
from ldm_jax.tasks import build_task, validate_config
from ldm_jax.training import loop, transfer
from ldm_jax.training.sharding import batch_sharding, make_mesh, replicated


def _settings(first_stage: str, text_encoder: str = "", **kw) -> dict:
    s = dict(source="shapes_captions/tiny:train", split="train", image_size=16, records_per_shard=96,
             dtype="float32", first_stage=first_stage, weights="ema", text_encoder=text_encoder)  # fmt: skip
    s.update(kw)
    return s


def _embedded(data_dir: str) -> pipeline.DataConfig:
    return pipeline.DataConfig(config="tiny", data_dir=data_dir, image_size=16, global_batch_size=1)


@pytest.fixture(scope="module")
def encoder(first_stage_workdir):
    return cache_latents.Encoder(first_stage_workdir, "ema", "", 2)  # 2 images per device per call


@pytest.fixture(scope="module")
def latents_dir(data_dir, first_stage_workdir, encoder, tmp_path_factory):
    """The tiny embedded train split (256 records) cached by one worker: latents only."""
    out = str(tmp_path_factory.mktemp("latents"))
    info = cache_latents.cache(_embedded(data_dir), out, encoder, _settings(first_stage_workdir), 0, 1)
    assert info["records"] == info["source_records"] == 256 and info["shards"] == 3
    return out


@pytest.fixture(scope="module")
def text_cache(data_dir, txt2img_workdir, tmp_path_factory):
    """The same split cached through the CLI from a txt2img workdir: its first stage and its text encoder."""
    out = str(tmp_path_factory.mktemp("text_cache"))
    r = run_module(
        "ldm_jax.cache_latents", f"--first_stage={txt2img_workdir}", f"--text_encoder={txt2img_workdir}",
        "--dataset=shapes_captions", "--dataset_config=tiny", f"--data_dir={data_dir}", "--image_size=16",
        f"--out={out}", "--records_per_shard=128",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["records"] == 256 and summary["latent_shape"] == [4, 4, 4]
    return out


def _one_step(config):
    """(params after one step, its metrics, the host batch) of ``config`` from a fixed init."""
    task = build_task(config)
    mesh = make_mesh(-1, 1)
    frozen, _ = task.setup({"latent_scale": 0.8})
    frozen = transfer.to_mesh(frozen, replicated(mesh))
    init_state, step_fn, shardings, _ = loop.make_train_step(config, task, mesh)
    state = jax.jit(init_state, out_shardings=shardings)(jax.random.key(0))
    batch = next(iter(pipeline.make_loader(config.data, "train", config.data.global_batch_size, task.tokenizer)))
    state, metrics = step_fn(state, frozen, pipeline.to_global(batch, batch_sharding(mesh)), jax.random.key(3))
    return transfer.to_host(state.params), {k: float(v) for k, v in transfer.to_host(metrics).items()}, batch


def test_a_step_from_the_cache_equals_a_step_from_pixels(txt2img_config, txt2img_workdir, text_cache):
    """Same records, same posterior draw (the step's key), same dropped captions: the text embeddings and the
    null context come from the cache and the frozen encoder, the latents from the cached mean and std."""
    pixels = copy.deepcopy(txt2img_config)
    pixels.init_from = txt2img_workdir
    pixels.text_encoder.trainable = False
    pixels.optim.warmup_steps = 0  # a real update at step 0
    pixels.diffusion.cond_drop_prob = 0.5  # some rows take the null condition
    cached = copy.deepcopy(pixels)
    cached.data.source = f"latents:{text_cache}"
    validate_config(cached)
    p_pix, m_pix, _ = _one_step(pixels)
    p_cache, m_cache, b_cache = _one_step(cached)
    assert m_pix["train/lr"] > 0 and 0 < m_pix["train/cond_dropped"] < 1
    # The cache's batch carries the latents and the context, and neither the image nor the tokens.
    assert {"latent_mean", "latent_std", "context"} <= set(b_cache) and not {"image", "tokens"} & set(b_cache)
    assert b_cache["context"].shape == (8, 16, 32)
    assert m_cache["train/cond_dropped"] == m_pix["train/cond_dropped"]
    np.testing.assert_allclose(m_cache["train/loss"], m_pix["train/loss"], rtol=1e-6)
    np.testing.assert_allclose(m_cache["train/grad_norm"], m_pix["train/grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(p_cache), jax.tree.leaves(p_pix), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.slow  # README, Tests: left out of the CI command for time
def test_a_run_from_the_cache_follows_the_run_from_pixels(txt2img_workdir, latents_dir, data_dir, tmp_path):
    """The session's tiny txt2img run (8 steps from pixels, previews on) and the same config from the latent cache:
    the same latent scale, the same loss at every logged step, the same weights."""
    config = txt2img.get_config("tiny")
    config.data.data_dir = data_dir
    config.first_stage.workdir = json.load(open(os.path.join(txt2img_workdir, "config.json")))["first_stage"]["workdir"]
    config.train.preview_every = 4
    config.data.source = f"latents:{latents_dir}"
    workdir = str(tmp_path / "from_cache")
    state = loop.train_and_evaluate(config, workdir)

    def rows(w):
        with open(os.path.join(w, "metrics.jsonl")) as f:
            return {r["step"]: r for r in map(json.loads, f) if "train/loss" in r}

    ref, got = rows(txt2img_workdir), rows(workdir)
    assert sorted(got) == sorted(ref) == [2, 4, 6, 8]
    for step in ref:
        np.testing.assert_allclose(got[step]["train/loss"], ref[step]["train/loss"], rtol=1e-5)
    from ldm_jax.training import checkpoint

    ref_params, ref_meta, _ = checkpoint.load_trained_params(txt2img_workdir, "params")
    _, meta, _ = checkpoint.load_trained_params(workdir, "params")
    assert meta["latent_scale"] == pytest.approx(ref_meta["latent_scale"], rel=1e-6)
    for a, b in zip(jax.tree.leaves(transfer.to_host(state.params)), jax.tree.leaves(ref_params), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)
    assert len(glob.glob(os.path.join(workdir, "previews", "samples_*.png"))) == 2  # previews need no pixels
    # A trained run loads for sampling without its cache (moved or deleted since).
    from ldm_jax import config_lib
    from ldm_jax.tasks import load_for_sampling

    saved = config_lib.load_config(os.path.join(workdir, "config.json"))
    saved.data.source = f"latents:{tmp_path / 'gone'}"
    _, params, _, _, step = load_for_sampling(workdir, config=saved)
    assert step == 8


def _shard_bytes(folder: str) -> dict[str, bytes]:
    return {
        os.path.basename(p): open(p, "rb").read() for p in sorted(glob.glob(os.path.join(folder, "*.array_record")))
    }


def test_the_cache_is_the_same_for_any_worker_count_and_reruns_skip_complete_shards(
    data_dir, first_stage_workdir, encoder, latents_dir, tmp_path
):
    out = str(tmp_path / "two_workers")
    settings = _settings(first_stage_workdir)
    # Worker 1 first: it writes shard 1 and finds shards 0 and 2 missing.
    assert cache_latents.cache(_embedded(data_dir), out, encoder, settings, 1, 2) is None
    info = cache_latents.cache(_embedded(data_dir), out, encoder, settings, 0, 2)
    assert info["records"] == 256
    assert _shard_bytes(out) == _shard_bytes(latents_dir)
    mtimes = {p: os.path.getmtime(p) for p in glob.glob(os.path.join(out, "*.array_record"))}
    cache_latents.cache(_embedded(data_dir), out, encoder, settings, 0, 1)
    assert {p: os.path.getmtime(p) for p in mtimes} == mtimes
    # The same folder with other settings is refused by name, not mixed in.
    with pytest.raises(ValueError, match=r"holds a cache made with dtype='float32', not 'bfloat16'"):
        cache_latents.cache(_embedded(data_dir), out, encoder, _settings(first_stage_workdir, dtype="bfloat16"), 0, 1)


def test_cached_records_hold_the_posterior_of_the_centre_crop(data_dir, first_stage_workdir, latents_dir):
    """Record i is the first stage's posterior (mean, std) of record i's image, with its caption and attributes."""
    from ldm_jax.tasks.latent_space import LatentSpace
    from ldm_jax.training import checkpoint

    cached = latent_cache.LatentExamples(f"latents:{latents_dir}", seed=0)
    images = pipeline.data_source(_embedded(data_dir), "train")
    params, _, _ = checkpoint.load_trained_params(first_stage_workdir, "ema")
    config = txt2img.get_config("tiny")
    config.data.data_dir, config.first_stage.workdir = data_dir, first_stage_workdir
    space = LatentSpace(config)
    for i in (0, 97, 255):
        post = space.module.apply(
            {"params": params}, pipeline.to_model_range(images[i]["image"][None]), method="encode"
        )
        ex = cached[i]
        np.testing.assert_allclose(ex["latent_mean"], np.asarray(post.mean[0]), atol=1e-5)
        np.testing.assert_allclose(ex["latent_std"], np.asarray(np.exp(0.5 * post.logvar[0])), atol=1e-5)
        raw = images[i]
        assert ex["caption"] == raw["caption"].decode() and ex["shape"] == raw["shape"]


def test_two_processes_cache_like_one(data_dir, first_stage_workdir, latents_dir, tmp_path):
    """A 2-process JAX job (2 devices each, over 127.0.0.1): each process encodes its own shards on its own devices
    (no collective); the cache equals the one-process, 8-device cache, record for record."""
    out = str(tmp_path / "two_processes")
    argv = [sys.executable, "-m", "ldm_jax.cache_latents", f"--first_stage={first_stage_workdir}",
            "--dataset=shapes_captions", "--dataset_config=tiny", f"--data_dir={data_dir}", "--image_size=16",
            f"--out={out}", "--records_per_shard=96", "--batch_size=2"]  # fmt: skip
    outputs = wait_all(two_process_job(argv, str(tmp_path / "log")), timeout=300)
    assert '"records": 256' in outputs[0]
    # Every device encoded 2 images per call in both layouts: the same shards, records, captions and attributes, and
    # the same latents up to float32 rounding. Not byte for byte: on some CPUs (an AVX2-only EPYC here) XLA:CPU's
    # convolutions round differently with 2 devices per process than with 8 (a few ulp, 387e888 too).
    assert sorted(_shard_bytes(out)) == sorted(_shard_bytes(latents_dir))
    two, one = (latent_cache.LatentExamples(f"latents:{d}", seed=0) for d in (out, latents_dir))
    assert len(two) == len(one) == 256
    worst = 0.0
    for i in range(len(one)):
        a, b = two[i], one[i]
        assert sorted(a) == sorted(b), i
        for name, value in b.items():
            if isinstance(value, np.ndarray) and value.dtype.kind == "f":
                worst = max(worst, float(np.max(np.abs(a[name] - value))))
            else:
                assert np.array_equal(a[name], value), (i, name)
    print(f"two-process vs one-process cache: max abs latent difference {worst:.2e}")
    assert worst < 1e-5


def test_what_cannot_train_from_a_cache_is_refused_by_name(txt2img_config, latents_dir, text_cache, tmp_path):
    spec = f"latents:{latents_dir}"
    c = copy.deepcopy(txt2img_config)
    c.data.source = spec
    validate_config(c)
    for field, value, match in (
        ("random_flip", True, r"data\.random_flip=True: must be False: a latent cache holds the centre crops"),
        ("crop", "random", r"data\.crop='random': must be 'center'"),
        ("image_size", 32, r"data\.image_size=32: must be the cache's image size 16"),
    ):
        bad = copy.deepcopy(c)
        bad.data[field] = value
        with pytest.raises(ValueError, match=match):
            validate_config(bad)
    bad = copy.deepcopy(c)
    bad.data.eval_source = spec
    with pytest.raises(ValueError, match=r"data\.eval_source=.*must name images"):
        validate_config(bad)
    # Text embeddings need the frozen encoder they came from.
    t = copy.deepcopy(txt2img_config)
    t.data.source = f"latents:{text_cache}"
    with pytest.raises(ValueError, match=r"text_encoder\.trainable=True: must be False: .* holds the embeddings"):
        validate_config(t)
    # Tasks whose step needs the pixels.
    inp = inpainting.get_config("tiny")
    inp.first_stage.workdir = txt2img_config.first_stage.workdir
    inp.data.data_dir = txt2img_config.data.data_dir
    inp.data.source = spec
    with pytest.raises(ValueError, match=r"data\.source=.*task='inpainting' needs the images in its step"):
        validate_config(inp)
    # Evaluation and previews of pixels: a cache of the user's images holds none of them (one of the embedded
    # dataset reads that dataset: test_a_cache_of_the_embedded_dataset_evaluates_on_that_dataset).
    theirs = _forged(latents_dir, tmp_path / "theirs", source="folder:/data/pets")
    with pytest.raises(ValueError, match=r"a latent cache holds no images for the 'heldout' split"):
        pipeline.data_source(_with_source(c, f"latents:{theirs}").data, "heldout")
    # A cache made by other first-stage weights.
    forged = _forged(latents_dir, tmp_path / "forged", fingerprint="0" * 64)
    f = copy.deepcopy(c)
    f.data.source = f"latents:{forged}"
    task = build_task(f)
    task.setup({})
    with pytest.raises(ValueError, match=r"its latents come from the first stage .* holds other weights"):
        task.make_step(1)
    # Not a cache at all.
    with pytest.raises(ValueError, match=r"no latent-cache shards"):
        validate_config(_with_source(c, f"latents:{tmp_path}"))


def _forged(latents_dir, folder, source=None, fingerprint=None):
    """The cache's shards (linked) under another dataset_info.json: another source or first-stage fingerprint."""
    folder.mkdir()
    for p in glob.glob(os.path.join(latents_dir, "*")):
        if os.path.basename(p) != "dataset_info.json":
            os.symlink(p, folder / os.path.basename(p))
    info = json.load(open(os.path.join(latents_dir, "dataset_info.json")))
    if source is not None:
        info["source"] = source
    if fingerprint is not None:
        info["first_stage"]["fingerprint"] = fingerprint
    json.dump(info, open(folder / "dataset_info.json", "w"))
    return folder


def test_a_cache_of_the_embedded_dataset_evaluates_on_that_dataset(txt2img_config, latents_dir, data_dir):
    """Previews and evaluation of a run trained from a cache of the embedded dataset (the demo's) read that
    dataset's other splits, attributes included, whatever data.name says; a cache of the user's images names none."""
    c = _with_source(txt2img_config, f"latents:{latents_dir}")
    c.data.name = "photo_crops"  # the cache's record, not the config's, says which dataset it came from
    for split in ("heldout", "validation"):
        got, want = pipeline.data_source(c.data, split), pipeline.data_source(_embedded(data_dir), split)
        assert len(got) == len(want) > 0
        for i in (0, len(want) - 1):
            a, b = got[i], want[i]
            assert sorted(a) == sorted(b) and "color" in b
            for k in b:
                np.testing.assert_array_equal(a[k], b[k], err_msg=f"{split}[{i}][{k!r}]")
    images = pipeline.first_images(c.data, "validation", 4)
    np.testing.assert_array_equal(images, pipeline.first_images(_embedded(data_dir), "validation", 4))
    info = latent_cache.read_info(f"latents:{latents_dir}")
    assert latent_cache.embedded_origin(info) == ("shapes_captions", "tiny")
    for spec in ("folder:/data/pets", "webdataset:/d/{000..009}.tar", "tfds:coco_captions", "arrayrecord:/p",
                 "tfds:coco/2017:train", "folder:/a/b:c"):  # fmt: skip
        assert latent_cache.embedded_origin({**info, "source": spec}) is None, spec


def _with_source(config, spec):
    c = copy.deepcopy(config)
    c.data.source = spec
    return c


def test_cache_latents_cli_errors_name_the_flag(first_stage_workdir, tmp_path):
    r = run_module("ldm_jax.cache_latents", f"--first_stage={tmp_path}", "--dataset=shapes_captions",
                   "--image_size=16", f"--out={tmp_path / 'x'}")  # fmt: skip
    assert r.returncode != 0 and f"--first_stage={str(tmp_path)!r}: no config.json" in r.stderr
    r = run_module("ldm_jax.cache_latents", f"--first_stage={first_stage_workdir}", "--image_size=16",
                   f"--out={tmp_path / 'y'}")  # fmt: skip
    assert r.returncode != 0 and "pass exactly one of --source" in r.stderr


def test_runs_named_by_the_flags_are_checked_by_flag(first_stage_workdir, tmp_path):
    """A run that names a first stage which is not there, and a text encoder run that is not there: each error names
    the flag (and, for the named run, the field) and the path."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"task": "txt2img", "first_stage": {"workdir": "/nonexistent/ae"}}))
    with pytest.raises(FileNotFoundError) as e:
        cache_latents.resolve_first_stage(str(run))
    assert str(e.value) == (
        f"--first_stage={str(run)!r} names first_stage.workdir='/nonexistent/ae': no config.json; train that run first"
    )
    assert cache_latents.resolve_first_stage(first_stage_workdir)[0] == first_stage_workdir
    with pytest.raises(FileNotFoundError, match=r"^--text_encoder='/nonexistent/te': no config.json"):
        cache_latents.Encoder(first_stage_workdir, "ema", "/nonexistent/te", 2)

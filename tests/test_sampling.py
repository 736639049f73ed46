import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli import run_module
from compile_count import count_generate_traces
from PIL import Image


def test_training_wrote_logs_previews_and_config(txt2img_workdir):
    files = os.listdir(txt2img_workdir)
    assert "config.json" in files and "checkpoints" in files
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(txt2img_workdir, "tensorboard")))
    previews = sorted(os.listdir(os.path.join(txt2img_workdir, "previews")))
    assert previews == ["samples_0000004.png", "samples_0000008.png"]


def test_generation_compiles_once_per_sampler_across_prompts_seeds_and_guidance(txt2img_workdir):
    from ldm_jax.tasks import load_for_sampling

    task, params, frozen, mesh, step = load_for_sampling(txt2img_workdir)
    assert step == 8 and mesh.size == 8
    traces = count_generate_traces(task)
    red = "a small red circle in the center on a black background"
    blue = "a large blue square at the top on a white background"
    for name in ("ddim", "dpmpp_2m", "euler_ancestral"):
        options = task.sampler_options(name=name, num_steps=3)
        a = task.generate_images(params, frozen, mesh, [red] * 3, [0, 1, 2], options, 2.0, batch_size=8)
        b = task.generate_images(params, frozen, mesh, [blue] * 3, [5, 6, 7], options, 7.5, 0.7, "red", batch_size=8)
        c = task.generate_images(params, frozen, mesh, [blue], [6], options, 7.5, 0.7, "red", batch_size=8)
        d = task.generate_images(params, frozen, mesh, [blue], [6], options, 7.5, 0.7, "", batch_size=8)
        assert a.shape == (3, 16, 16, 3) and a.dtype == np.uint8
        # An image depends on its own seed and prompts, not on the batch it was generated in (stochastic samplers
        # included: per-step noise comes from the image's own key).
        np.testing.assert_array_equal(b[1], c[0])
        # The negative prompt is used: the same seed and prompt without it differ.
        assert np.abs(c.astype(int) - d.astype(int)).max() > 0
    # Prompts, seeds, guidance scale, rescale and negative prompt changed; each sampler compiled once.
    assert traces == ["ddim", "dpmpp_2m", "euler_ancestral"]


def test_img2img_keeps_the_init_image_at_low_strength_and_inpainting_runs(txt2img_workdir):
    from ldm_jax.tasks import load_for_sampling

    task, params, frozen, mesh, _ = load_for_sampling(txt2img_workdir)
    size = task.config.data.image_size
    yy, xx = np.mgrid[:size, :size] / size
    init = np.stack([xx, yy, 1 - xx], -1).astype(np.float32) * 2 - 1  # a smooth colour ramp in [-1, 1]
    prompt, seeds = ["a small red circle in the center on a black background"] * 2, [0, 1]
    # What img2img starts from: the posterior sample each image's key draws, decoded.
    keys = jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))
    z = task.encode_images(frozen["first_stage"], np.stack([init, init]), keys)
    recon = task.first_stage.apply({"params": frozen["first_stage"]}, z, method="decode")
    recon = np.clip(np.round((np.asarray(recon) + 1) * 127.5), 0, 255).astype(np.float32)
    options = task.sampler_options(name="ddim", num_steps=4)
    free = task.generate_images(params, frozen, mesh, prompt, seeds, options, 3.0, batch_size=8)
    low = task.generate_images(params, frozen, mesh, prompt, seeds, options, 3.0, init_image=init, strength=0.25)
    err = lambda imgs: float(np.abs(imgs.astype(np.float32) - recon).mean())  # noqa: E731
    # One DDIM step from t = 1 ends at (almost) the encoded image; from noise the model draws something else.
    assert err(low) < 0.25 * err(free), (err(low), err(free))
    mask = np.zeros((size, size, 1), np.float32)  # pixels; the latent grid takes each cell's top-left pixel
    mask[:, : size // 2] = 1.0
    painted = task.generate_images(params, frozen, mesh, prompt, seeds, options, 3.0, init_image=init, mask=mask)
    assert painted.shape == (2, size, size, 3)
    with pytest.raises(ValueError, match="strength=0.1: with num_steps=4 no step would run"):
        task.generate_images(params, frozen, mesh, prompt, seeds, options, 3.0, init_image=init, strength=0.1)
    with pytest.raises(ValueError, match="mask shape"):
        task.generate_images(params, frozen, mesh, prompt, seeds, options, 3.0, init_image=init, mask=mask[:2])
    speck = np.zeros_like(mask)
    speck[1, 1] = 1.0  # no cell's top-left pixel: nothing would be repainted
    with pytest.raises(ValueError, match="no latent cell is repainted"):
        task.generate_images(params, frozen, mesh, prompt, seeds, options, 3.0, init_image=init, mask=speck)


def test_evaluation_from_the_dataset_images_at_a_strength(txt2img_workdir, tmp_path):
    """``ldm_jax.evaluate --strength``: each image starts from its example's own image noised to that strength. At
    the lowest strength (one DDIM step from t = 1) the images are the examples' decoded posterior samples, which
    generation from noise is not; the result and its table say how the images were made."""
    import dataclasses
    import shutil

    from ldm_jax.data import pipeline
    from ldm_jax.evaluation import generation
    from ldm_jax.imaging import to_uint8
    from ldm_jax.tasks import load_for_sampling
    from ldm_jax.tasks.protocol import EvalInputs

    task, params, frozen, mesh, _ = load_for_sampling(txt2img_workdir)
    source = pipeline.data_source(task.config.data, "validation")
    examples = [source[i] for i in range(8)]
    originals = pipeline.to_model_range(np.stack([e["image"] for e in examples]))
    seeds = list(range(8))
    # What image-to-image starts from: the posterior sample each image's key draws, decoded.
    z = task.encode_images(frozen["first_stage"], originals, jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32)))
    recon = to_uint8(task.first_stage.apply({"params": frozen["first_stage"]}, z, method="decode")).astype(np.float32)
    options = task.sampler_options(name="ddim", num_steps=4)
    inputs = EvalInputs(split="validation", num_examples=8, seed=0, batch_size=8, strength=0.25)
    low, (_, low_images) = generation.score_attributes(
        task, params, frozen, mesh, examples, options, seeds, inputs, None
    )
    free_inputs = dataclasses.replace(inputs, strength=None)
    free, (_, free_images) = generation.score_attributes(
        task, params, frozen, mesh, examples, options, seeds, free_inputs, None
    )
    err = lambda imgs: float(np.abs(imgs.astype(np.float32) - recon).mean())  # noqa: E731
    assert err(low_images) < 0.25 * err(free_images), (err(low_images), err(free_images))
    assert low["from_dataset_images_at_strength"] == 0.25 and "from_dataset_images_at_strength" not in free
    assert "| samples from the dataset images at strength 0.25 |" in generation.markdown_table(low)
    assert "| samples |" in generation.markdown_table(free)

    # The command line: its own result files (beside the plain evaluation's), and a strength out of range refused
    # before anything loads.
    workdir = str(tmp_path / "run")
    shutil.copytree(txt2img_workdir, workdir)
    common = ["ldm_jax.evaluate", f"--workdir={workdir}", "--split=validation", "--num_examples=4", "--num_steps=2"]
    proc = run_module(*common, "--strength=0.5", "--batch_size=8", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(workdir, "eval_validation_strength0.5.json")) as f:
        assert json.load(f)["from_dataset_images_at_strength"] == 0.5
    assert os.path.exists(os.path.join(workdir, "eval_validation_strength0.5.md"))
    assert not os.path.exists(os.path.join(workdir, "eval_validation.json"))
    proc = run_module(*common, "--strength=1.5", timeout=300)
    assert proc.returncode != 0 and "--strength=1.5: must be in (0, 1]" in proc.stderr, proc.stderr[-2000:]


def test_bfloat16_sampling_casts_the_weights_and_draws_what_float32_draws(txt2img_workdir):
    from ldm_jax import config_lib
    from ldm_jax.tasks import cast_weights, load_for_sampling

    task, params, frozen, mesh, _ = load_for_sampling(txt2img_workdir)
    config = config_lib.load_config(os.path.join(txt2img_workdir, "config.json"))
    config.dtype = "bfloat16"  # what sample --dtype=bfloat16 sets, then casts the loaded weights
    task16, params16, frozen16, _, _ = load_for_sampling(txt2img_workdir, config=config)
    params16, frozen16 = cast_weights(params16, frozen16, "bfloat16")
    weights = jax.tree.leaves((params16, {k: v for k, v in frozen16.items() if k != "latent_scale"}))
    floating = [w for w in weights if jnp.issubdtype(w.dtype, jnp.floating)]
    assert len(floating) > 50 and {w.dtype for w in floating} == {jnp.dtype(jnp.bfloat16)}
    assert jnp.asarray(frozen16["latent_scale"]).dtype == jnp.float32
    prompts = ["a small red circle in the center on a black background", "a large blue square at the top on a white"]
    options = task.sampler_options(name="ddim", num_steps=4)
    a = task.generate_images(params, frozen, mesh, prompts, [0, 1], options, 3.0, batch_size=8).astype(int)
    b = task16.generate_images(params16, frozen16, mesh, prompts, [0, 1], options, 3.0, batch_size=8).astype(int)
    # The networks ran in bfloat16 (pixels moved), and drew the same pictures (8-bit mantissas: a few levels).
    diff = np.abs(a - b)
    print(f"bfloat16 vs float32 pixels: mean |diff| {diff.mean():.2f}, max {diff.max()}")
    assert diff.max() > 0 and diff.mean() < 1.5, (diff.max(), diff.mean())


def test_sample_cli_writes_pngs_grid_and_manifest(txt2img_workdir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "a small red circle in the center on a black background\n\na large blue square at the top on a white background\n"
    )
    outdir = tmp_path / "out"
    proc = run_module(
        "ldm_jax.sample",
        f"--workdir={txt2img_workdir}",
        f"--prompts_file={prompts}",
        "--prompt=a small green triangle on the left on a gray background",
        "--num_per_prompt=2",
        "--num_steps=3",
        "--sampler=dpmpp_2m",
        "--negative_prompt=gray",
        "--guidance_scale=4",
        "--seed=10",
        f"--outdir={outdir}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(x) for x in (outdir / "manifest.jsonl").read_text().splitlines()]
    assert len(lines) == 6
    assert [x["seed"] for x in lines] == list(range(10, 16))
    assert lines[0]["prompt"] == "a small green triangle on the left on a gray background"
    assert {x["guidance_scale"] for x in lines} == {4.0} and {x["num_steps"] for x in lines} == {3}
    assert {x["sampler"] for x in lines} == {"dpmpp_2m"} and {x["negative_prompt"] for x in lines} == {"gray"}
    for x in lines:
        assert Image.open(outdir / x["file"]).size == (16, 16)
    assert Image.open(outdir / "grid.png").size[0] > 16
    assert not [f for f in os.listdir(outdir) if f.endswith(".tmp")]


def test_sample_cli_inpaints_from_files_and_rejects_an_empty_mask(txt2img_workdir, tmp_path):
    init, mask, empty = tmp_path / "init.png", tmp_path / "mask.png", tmp_path / "empty.png"
    Image.fromarray(np.full((24, 24, 3), 200, np.uint8)).save(init)  # resized to the run's 16x16
    m = np.zeros((16, 16), np.uint8)
    m[:, :8] = 255
    Image.fromarray(m).save(mask)
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(empty)
    base = ["ldm_jax.sample", f"--workdir={txt2img_workdir}", "--prompt=a red circle"]
    base += ["--num_steps=4", f"--init_image={init}"]
    outdir = tmp_path / "out"
    # In bfloat16 (--dtype): the inpainting path's first-stage encode, UNet and decode all take half-precision weights.
    proc = run_module(*base, f"--mask_image={mask}", f"--outdir={outdir}", "--dtype=bfloat16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = json.loads((outdir / "manifest.jsonl").read_text().splitlines()[0])
    assert line["strength"] == 1.0 and line["mask_image"] == str(mask) and line["init_image"] == str(init)
    assert json.loads((outdir / "job.json").read_text())["settings"]["dtype"] == "bfloat16"
    bad = tmp_path / "bad"
    proc = run_module(*base, f"--mask_image={empty}", f"--outdir={bad}")
    assert proc.returncode != 0 and "the mask is all black" in proc.stderr and not bad.exists()


def test_sample_cli_names_a_bad_sampler_and_writes_nothing(txt2img_workdir, tmp_path):
    outdir = tmp_path / "out"
    proc = run_module(
        "ldm_jax.sample",
        f"--workdir={txt2img_workdir}",
        "--prompt=x",
        "--sampler=heun",
        f"--outdir={outdir}",
        timeout=300,
    )
    assert proc.returncode != 0 and "--sampler='heun': must be one of" in proc.stderr
    assert not outdir.exists()


def test_sample_cli_rejects_a_non_txt2img_workdir(first_stage_workdir):
    proc = run_module("ldm_jax.sample", f"--workdir={first_stage_workdir}", "--prompt=x", timeout=300)
    assert proc.returncode != 0 and "sampling needs a txt2img" in proc.stderr


def test_the_markdown_table_has_no_empty_shape_breakdown():
    """Class-conditional evaluation scores shape without sizes, so there is no per-kind breakdown: the table then
    has the attribute rows only (it used to end in a header-only table that no markdown reader renders)."""
    from ldm_jax.evaluation import generation

    scores = {"accuracy/color": 0.9, "accuracy/shape": 0.3}
    result = {"generated": scores, "dataset_images": scores, "reconstructions": scores}
    result["shape_by_kind"] = {k: {} for k in ("generated", "dataset_images", "reconstructions")}
    table = generation.markdown_table(result)
    assert "shape accuracy" not in table
    assert table.splitlines() == [
        "| | color | shape |",
        "|---|---|---|",
        "| dataset images | 0.900 | 0.300 |",
        "| first-stage reconstructions | 0.900 | 0.300 |",
        "| samples | 0.900 | 0.300 |",
    ]
    result["shape_by_kind"] = {
        k: {"shape/square/small": 0.5} for k in ("generated", "dataset_images", "reconstructions")
    }
    assert "| shape accuracy | square/small |" in generation.markdown_table(result)
    row = {"circle": 0.75, "square": 0.25, "triangle": 0.0, "none": 0.0}
    result["shape_confusion"] = {
        "generated": {"square": row},
        "reconstructions": {"square": dict(row, circle=0.0, square=1.0)},
    }
    table = generation.markdown_table(result).splitlines()
    assert table[-4:] == [
        "| shape asked, read as: | circle | square | triangle | none |",
        "|---|---|---|---|---|",
        "| square, first-stage reconstructions | 0.000 | 1.000 | 0.000 | 0.000 |",
        "| square, samples | 0.750 | 0.250 | 0.000 | 0.000 |",
    ]

"""Concat-conditioned tasks: mask-conditioned inpainting and super-resolution with noise augmentation.

(Parity of an imported 9-channel SD inpainting model with diffusers' StableDiffusionInpaintPipeline is in
test_interop.py; the noise-augmentation schedule against DDPMScheduler in test_samplers.py.)
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli import run_module
from PIL import Image
from tiny_runs import train_tiny

from ldm_jax.data import masks as masks_lib


@pytest.fixture(scope="module")
def inpainting_workdir(tmp_path_factory, data_dir, first_stage_workdir):
    from configs import inpainting

    # 4 steps, a preview at the last (masked inputs / bicubic rows).
    return train_tiny(
        inpainting, data_dir, first_stage_workdir, tmp_path_factory, "inpainting", num_steps=4, preview_every=4
    )


@pytest.fixture(scope="module")
def superres_workdir(tmp_path_factory, data_dir, first_stage_workdir):
    from configs import superres

    # 4 steps, a preview at the last (masked inputs / bicubic rows).
    return train_tiny(
        superres, data_dir, first_stage_workdir, tmp_path_factory, "superres", num_steps=4, preview_every=4
    )


# ---- masks ------------------------------------------------------------------------------------------------------
def test_random_box_masks_follow_the_config():
    m = np.asarray(masks_lib.random_box_masks(jax.random.key(0), 4000, 32, 3, 0.1, 0.5, 0.25))
    assert m.shape == (4000, 32, 32, 1) and set(np.unique(m)) == {0.0, 1.0}
    full = m.reshape(4000, -1).all(axis=1)
    assert abs(full.mean() - 0.25) < 0.03, full.mean()
    boxes = m[~full, ..., 0]
    covered = boxes.reshape(len(boxes), -1).mean(axis=1)
    assert covered.min() > 0  # every mask repaints something
    # Three boxes of at most 16x16 cover at most 3 * 256 of 1024 pixels; one box at least 3x3.
    assert covered.max() <= 3 * 16 * 16 / 1024 + 1e-6 and covered.min() >= 9 / 1024
    none_full = np.asarray(masks_lib.random_box_masks(jax.random.key(1), 500, 32, 1, 0.1, 0.5, 0.0))
    assert not none_full.reshape(500, -1).all(axis=1).any()
    # One box per mask: the repainted pixels form a rectangle.
    for mask in none_full[:50, ..., 0]:
        rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
        assert mask.sum() == len(rows) * len(cols)


# ---- inpainting -----------------------------------------------------------------------------------------------
def test_inpainting_training_feeds_mask_and_masked_image_latents_to_the_unet(txt2img_config):
    """The concat input is [mask at latent resolution, latents of the masked image]; pixels under the mask do not
    leak into it. (Training through the loop, where a 4-channel input would not fit the 9-channel UNet, is the
    inpainting_workdir fixture.)"""
    from ldm_jax.data import pipeline
    from ldm_jax.tasks import build_task

    config = txt2img_config
    config.task = "inpainting"
    from configs import inpainting

    config.inpainting = inpainting.get_config("tiny").inpainting
    task = build_task(config)
    frozen, _ = task.setup({})
    z = task.latent_shape[-1]
    assert task.concat_channels == 1 + z and task.unet.in_channels == 2 * z + 1
    images = jnp.asarray(pipeline.first_images(config.data, "train", 4))
    size = images.shape[1]
    masks = jnp.stack([masks_lib.box_mask(size, 2, 4, 6, 8)] * 4)
    keys = jax.random.split(jax.random.key(0), 4)
    concat_input = jax.jit(task.concat.concat_input)
    concat = concat_input(frozen, images, masks, keys)
    f = task.first_stage.downsampling_factor
    np.testing.assert_array_equal(concat[..., :1], masks[:, ::f, ::f])
    want = jax.jit(task.encode_images, static_argnums=3)(frozen["first_stage"], images * (1 - masks), keys, 3)
    want = want * frozen["latent_scale"]
    np.testing.assert_allclose(concat[..., 1:], want, atol=1e-6)
    # The masked region does not leak: changing pixels under the mask leaves the concat input unchanged.
    scribbled = jnp.where(masks > 0, -images, images)
    np.testing.assert_array_equal(concat_input(frozen, scribbled, masks, keys), concat)

    # In training the masks are drawn from the step's key (``training_inputs``); the concat is built the same way.
    drop = jnp.zeros((4,), bool)
    batch = {"image": images, "tokens": jnp.asarray(task.tokenizer(["a red circle"] * 4))}
    params = task.init_params(jax.random.key(1))
    _, train_concat = jax.jit(task.training_inputs)(params, frozen, batch, drop, jax.random.key(2))
    k_mask, k_post = jax.random.split(jax.random.key(2))
    p = config.inpainting
    drawn = masks_lib.random_box_masks(
        k_mask, 4, size, p.max_boxes, p.min_box_fraction, p.max_box_fraction, p.full_mask_prob
    )
    np.testing.assert_array_equal(train_concat, concat_input(frozen, images, drawn, jax.random.split(k_post, 4)))


def test_inpainting_model_starts_from_text_to_image_weights(txt2img_config):
    """``init_from`` a txt2img run: the extra input channels start at zero, so the inpainting UNet computes exactly
    what the text-to-image UNet did, whatever the mask and masked image."""
    from configs import inpainting
    from ldm_jax.tasks import build_task
    from ldm_jax.tasks.latent_diffusion import with_concat
    from ldm_jax.training.loop import _match_init_params

    config = txt2img_config
    t2i = build_task(config)
    src = t2i.init_params(jax.random.key(0))
    # The output convolution starts at zero (both models would output 0): give it weights.
    out = src["unet"]["conv_out"]
    out["kernel"] = 0.1 * jax.random.normal(jax.random.key(1), out["kernel"].shape)
    config.task = "inpainting"
    config.inpainting = inpainting.get_config("tiny").inpainting
    task = build_task(config)
    adapted = _match_init_params(task.adapt_init_params(src), task.init_params(jax.random.key(2)), "txt2img")
    rng = np.random.default_rng(0)
    h, w, c = task.latent_shape
    x = jnp.asarray(rng.standard_normal((2, h, w, c)), jnp.float32)
    concat = jnp.asarray(rng.standard_normal((2, h, w, task.concat_channels)), jnp.float32)
    t, ctx = jnp.array([10, 500]), jnp.asarray(rng.standard_normal((2, 16, config.text_encoder.width)), jnp.float32)
    ours, theirs = task.apply_unet(adapted, with_concat(x, concat), t, ctx), t2i.apply_unet(src, x, t, ctx)
    assert float(jnp.abs(theirs).max()) > 1e-3
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_inpainting_sampling_keeps_the_batch_independent_and_needs_a_mask(inpainting_workdir):
    from ldm_jax.tasks import load_for_sampling

    task, params, frozen, mesh, _ = load_for_sampling(inpainting_workdir)
    size = task.config.data.image_size
    rng = np.random.default_rng(0)
    inits = rng.uniform(-1, 1, (3, size, size, 3)).astype(np.float32)
    masks = np.stack([np.asarray(masks_lib.box_mask(size, 0, 0, size, size // 2))] * 3)
    options = task.sampler_options(num_steps=3)
    prompts, seeds = ["a red circle", "a blue square", "a green triangle"], [5, 6, 7]
    out = task.generate_images(
        params, frozen, mesh, prompts, seeds, options, 3.0, batch_size=8, init_image=inits, mask=masks
    )
    one = task.generate_images(
        params, frozen, mesh, prompts[2:], seeds[2:], options, 3.0, batch_size=8, init_image=inits[2:], mask=masks[2:]
    )
    np.testing.assert_array_equal(out[2], one[0])  # image i depends on its own inputs only
    with pytest.raises(ValueError, match="inpainting models need init_image and mask"):
        task.generate_images(params, frozen, mesh, prompts, seeds, options, 3.0, init_image=inits)


def test_inpainting_cli(inpainting_workdir, tmp_path):
    init, mask = tmp_path / "init.png", tmp_path / "mask.png"
    Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(init)
    m = np.zeros((16, 16), np.uint8)
    m[4:12, 4:12] = 255
    Image.fromarray(m).save(mask)
    base = ["ldm_jax.sample", f"--workdir={inpainting_workdir}", "--prompt=a red circle", "--num_steps=3"]
    outdir = tmp_path / "out"
    proc = run_module(*base, f"--init_image={init}", f"--mask_image={mask}", "--num_per_prompt=2", f"--outdir={outdir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(x) for x in (outdir / "manifest.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and lines[0]["mask_image"] == str(mask) and lines[0]["strength"] == 1.0
    assert Image.open(outdir / lines[1]["file"]).size == (16, 16)
    bad = tmp_path / "bad"
    proc = run_module(*base, f"--init_image={init}", f"--outdir={bad}")
    assert proc.returncode != 0 and "is an inpainting model: pass --init_image and --mask_image" in proc.stderr
    assert not bad.exists()


# ---- super-resolution -----------------------------------------------------------------------------------------
def test_superres_conditions_on_the_noised_low_res_image(txt2img_config):
    """Training input: the antialiased downsampled image, noised to the drawn level under the low-res schedule,
    resized to the latent grid."""
    from configs import superres
    from ldm_jax.data import pipeline
    from ldm_jax.diffusion import objectives
    from ldm_jax.tasks import build_task

    config = superres.get_config("tiny")
    config.data, config.first_stage = txt2img_config.data, txt2img_config.first_stage
    task = build_task(config)
    images = jnp.asarray(pipeline.first_images(config.data, "train", 4))
    low = task.concat.degrade(images)
    assert low.shape == (4, 4, 4, 3)  # 16 px / scale 4
    # Antialiased: each low-res pixel is close to the mean of its 4x4 block.
    blocks = images.reshape(4, 4, 4, 4, 4, 3).mean(axis=(2, 4))
    assert float(jnp.abs(low - blocks).mean()) < 0.1
    h = task.latent_shape[0]
    noise = jax.random.normal(jax.random.key(0), low.shape)
    levels = jnp.array([0, 10, 100, 350])
    noised = task.concat.concat_input(low, levels, noise)
    want = objectives.add_noise(task.concat.low_res_schedule, low, noise, levels)
    np.testing.assert_allclose(noised, jax.image.resize(want, (4, h, h, 3), "bicubic"), atol=1e-6)
    # The level reaches the UNet as its class input.
    assert task.unet.num_classes == config.superres.max_noise_level + 1


def test_superres_output_follows_its_own_input(superres_workdir):
    from ldm_jax.tasks import load_for_sampling

    task, params, frozen, mesh, _ = load_for_sampling(superres_workdir)
    rng = np.random.default_rng(0)
    low = rng.uniform(-1, 1, (3, 4, 4, 3)).astype(np.float32)
    options = task.sampler_options(num_steps=3)
    out = task.generate_images(params, frozen, mesh, [20] * 3, [1, 1, 1], options, batch_size=8, low_res=low)
    assert out.shape == (3, 16, 16, 3)
    alone = task.generate_images(params, frozen, mesh, [20], [1], options, batch_size=8, low_res=low[2:])
    np.testing.assert_array_equal(out[2], alone[0])
    assert not np.array_equal(out[0], out[1])  # same seed, different inputs
    with pytest.raises(
        ValueError, match="noise levels \\[351, 351, 351\\]: must be integers in \\[0, superres.max_noise_level=350\\]"
    ):
        task.generate_images(params, frozen, mesh, [351] * 3, [1, 1, 1], options, batch_size=8, low_res=low)
    with pytest.raises(ValueError, match="low_res shape"):
        task.generate_images(params, frozen, mesh, [20] * 3, [1, 1, 1], options, batch_size=8, low_res=low[:, :2])


def test_superres_cli_upscales_files_and_names_bad_inputs(superres_workdir, tmp_path):
    a, b, odd = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "odd.png"
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(a)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(b)
    Image.fromarray(np.zeros((8, 6, 3), np.uint8)).save(odd)
    base = ["ldm_jax.sample", f"--workdir={superres_workdir}", "--num_steps=3"]
    outdir = tmp_path / "out"
    proc = run_module(*base, f"--low_res_image={a}", f"--low_res_image={b}", "--noise_level=5", f"--outdir={outdir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(x) for x in (outdir / "manifest.jsonl").read_text().splitlines()]
    assert [x["low_res_image"] for x in lines] == [str(a), str(b)] and lines[0]["noise_level"] == 5
    assert Image.open(outdir / lines[0]["file"]).size == (32, 32)  # 8 px x superres.scale 4
    for args, msg in (
        ([f"--low_res_image={a}", f"--low_res_image={odd}"], "inputs must be square"),
        ([f"--low_res_image={a}", "--noise_level=400"], "--noise_level=400: must be in [0, superres.max_noise_level"),
        (["--prompt=x"], "pass --low_res_image"),
    ):
        bad = tmp_path / "bad"
        proc = run_module(*base, *args, f"--outdir={bad}")
        assert proc.returncode != 0 and msg in proc.stderr, proc.stderr[-2000:]
        assert not bad.exists()


def test_superres_evaluation_reports_psnr_and_ssim_against_bicubic(superres_workdir):
    args = [
        f"--workdir={superres_workdir}",
        "--split=validation",
        "--num_examples=8",
        "--num_steps=2",
        "--batch_size=8",
    ]
    proc = run_module("ldm_jax.evaluate", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(superres_workdir, "eval_validation.json")) as f:
        result = json.load(f)
    for name in ("superres", "bicubic", "first_stage_reconstruction"):
        assert result[name]["psnr"] > 0 and -1 <= result[name]["ssim"] <= 1
    assert result["noise_level"] == 20 and os.path.exists(os.path.join(superres_workdir, "eval_validation_grid.png"))

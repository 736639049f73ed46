"""Sampling job: images from a trained latent diffusion workdir (txt2img, class_cond, unconditional, inpainting or
superres; EMA weights by default) on every device.

  python -m ldm_jax.sample --workdir=runs/demo/txt2img \\
      --prompt="a large red circle in the center on a black background" --num_per_prompt=4 --guidance_scale=3
  # another sampler, a negative prompt:
  ... --sampler=dpmpp_2m --num_steps=20 --karras_sigmas --negative_prompt="white background"
  # image-to-image, and inpainting with any txt2img model (white in the mask = repaint):
  ... --init_image=photo.png --strength=0.7
  ... --init_image=photo.png --mask_image=mask.png
  # class-conditional and unconditional runs:
  python -m ldm_jax.sample --workdir=runs/demo/class_cond --class_label=0 --class_label=13 --num_per_prompt=4
  python -m ldm_jax.sample --workdir=runs/demo/unconditional --num_images=16
  # mask-conditioned inpainting models (configs/inpainting.py, imported SD inpainting checkpoints):
  python -m ldm_jax.sample --workdir=runs/demo/inpainting --init_image=photo.png --mask_image=mask.png --prompt="..."
  # super-resolution (configs/superres.py): each --low_res_image upscaled by superres.scale
  python -m ldm_jax.sample --workdir=runs/demo/superres --low_res_image=a.png --low_res_image=b.png --noise_level=20

Writes ``<outdir>/<index>.png`` per image, ``grid.png`` (one row per prompt, class or input) and ``manifest.jsonl``
(prompt, class or low-resolution input, seed and sampler settings per image). Relative paths in the run's config (the
first-stage workdir) are resolved from the current directory, as during training.

Multi-process (the mesh over every device of every process): the same command in every process, with the
``ldm_jax.train`` flags ``--coordinator_address``, ``--num_processes``, ``--process_id`` (or their environment
variables, or a detected cluster); the batches are split over all devices and process 0 writes the files.
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags, logging

from ldm_jax.training import distributed

_WORKDIR = flags.DEFINE_string("workdir", None, "A latent diffusion training (or converted) workdir.")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "A prompt; repeat the flag for several.")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", "", "A text file with one prompt per line.")
_CLASS_LABEL = flags.DEFINE_multi_integer("class_label", [], "Class-conditional runs: a class id; repeatable.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 8, "Unconditional runs: how many images.")
_NUM_PER_PROMPT = flags.DEFINE_integer(
    "num_per_prompt", 1, "Images per prompt (or per class label, or per low-resolution image)."
)
_LOW_RES = flags.DEFINE_multi_string(
    "low_res_image", [], "Super-resolution runs: an image to upscale (all the same square size); repeatable."
)
_NOISE_LEVEL = flags.DEFINE_integer(
    "noise_level", None, "Super-resolution runs: noise augmentation level of the input (default: config.sample)."
)
_GUIDANCE = flags.DEFINE_float("guidance_scale", None, "Classifier-free guidance scale (default: config.sample).")
_RESCALE = flags.DEFINE_float("guidance_rescale", None, "Guidance rescale in [0, 1] (default: config.sample).")
_NEGATIVE = flags.DEFINE_string(
    "negative_prompt", None, "Prompt for the unconditional side of guidance (default: config.sample, '' = null)."
)
_SAMPLER = flags.DEFINE_string(
    "sampler", None, "ddpm, ddim, pndm, dpmpp_2m, euler or euler_ancestral (default: config.sample.sampler)."
)
_STEPS = flags.DEFINE_integer("num_steps", None, "Sampler steps (default: config.sample).")
_ETA = flags.DEFINE_float("eta", None, "DDIM eta; 0 is deterministic (default: config.sample).")
_SPACING = flags.DEFINE_string("spacing", None, "Timestep spacing: leading, trailing or linspace.")
_KARRAS = flags.DEFINE_bool("karras_sigmas", None, "Karras sigma spacing (dpmpp_2m, euler).")
_SEED = flags.DEFINE_integer("seed", 0, "Image i of the run uses seed + i.")
_BATCH = flags.DEFINE_integer(
    "batch_size", 0, "Images per device call, rounded up to the device count (0: 8 per device)."
)
_WEIGHTS = flags.DEFINE_enum("weights", "ema", ["ema", "params"], "Which weights of the checkpoint to use.")
_IMAGE_SIZE = flags.DEFINE_integer(
    "image_size", 0, "Output height and width in pixels (0: the run's data.image_size); a multiple of the latent grid."
)
_INIT_IMAGE = flags.DEFINE_string(
    "init_image", "", "Image-to-image: start from this image (resized to the output size) instead of noise."
)
_MASK_IMAGE = flags.DEFINE_string(
    "mask_image",
    "",
    "Inpainting (with --init_image): white = repaint, black = keep; any txt2img model (latent blending) or an "
    "inpainting model (mask as input).",
)
_STRENGTH = flags.DEFINE_float(
    "strength", None, "How much of the schedule to run from --init_image, in (0, 1] (default 0.8; 1.0 to inpaint)."
)
_OUTDIR = flags.DEFINE_string("outdir", "", "Output folder (default: <workdir>/samples).")
flags.mark_flags_as_required(["workdir"])
_INITIALIZE_DISTRIBUTED = distributed.define_flags()


def read_prompts(prompts: list[str], prompts_file: str) -> list[str]:
    out = list(prompts)
    if prompts_file:
        with open(prompts_file, encoding="utf-8") as f:
            out += [line.strip() for line in f if line.strip()]
    return out


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from ldm_jax import config_lib, jax_setup
    from ldm_jax.diffusion.guidance import validate_guidance
    from ldm_jax.diffusion.samplers import SamplerOptions
    from ldm_jax.imaging import make_grid, save_png
    from ldm_jax.tasks import SAMPLE_FLAGS, build_task, check_sample_flags, load_for_sampling
    from ldm_jax.tasks.protocol import SampleInputs
    from ldm_jax.training.reporting import quiet_library_logs

    quiet_library_logs()
    jax_setup.configure()
    _INITIALIZE_DISTRIBUTED()
    if _NUM_PER_PROMPT.value < 1:
        raise app.UsageError(f"--num_per_prompt={_NUM_PER_PROMPT.value}: must be >= 1")
    if _IMAGE_SIZE.value < 0:
        raise app.UsageError(f"--image_size={_IMAGE_SIZE.value}: must be > 0, or 0 for the run's data.image_size")
    # Everything the flags ask is checked against the run's config before any weights load.
    try:
        run_config = config_lib.load_config(os.path.join(_WORKDIR.value, "config.json"))
    except FileNotFoundError as e:
        raise app.UsageError(str(e)) from e
    inputs = SampleInputs(
        prompts=tuple(read_prompts(_PROMPT.value, _PROMPTS_FILE.value)),
        negative_prompt=_NEGATIVE.value,
        class_labels=tuple(_CLASS_LABEL.value),
        num_images=_NUM_IMAGES.value,
        low_res_images=tuple(_LOW_RES.value),
        noise_level=_NOISE_LEVEL.value,
        init_image=_INIT_IMAGE.value,
        mask_image=_MASK_IMAGE.value,
        strength=_STRENGTH.value,
        image_size=_IMAGE_SIZE.value,
    )
    overrides = {
        "name": _SAMPLER.value,
        "num_steps": _STEPS.value,
        "eta": _ETA.value,
        "spacing": _SPACING.value,
        "karras_sigmas": _KARRAS.value,
    }
    try:
        request = build_task(run_config).sample_request(inputs)
        s = run_config.sample
        guidance = s.guidance_scale if _GUIDANCE.value is None else _GUIDANCE.value
        rescale = s.guidance_rescale if _RESCALE.value is None else _RESCALE.value
        check_sample_flags(run_config.task, {f for f in SAMPLE_FLAGS if flags.FLAGS[f].present})
        options = SamplerOptions.for_run(run_config, prefix="--", **overrides)
        validate_guidance(guidance, rescale, prefix="--")
    except (OSError, ValueError) as e:  # each names the flag and what is allowed
        raise app.UsageError(str(e)) from e
    image_size = request.image_size or _IMAGE_SIZE.value
    task, params, frozen, mesh, step = load_for_sampling(_WORKDIR.value, _WEIGHTS.value, image_size, config=run_config)

    per = _NUM_PER_PROMPT.value if request.repeats else 1
    # Which source (prompt, class, low-resolution image) each image comes from.
    sources = [i for i in range(len(request.conditions)) for _ in range(per)]
    all_conditions = [request.conditions[i] for i in sources]
    seeds = [_SEED.value + i for i in range(len(all_conditions))]
    images_in = dict(request.images)
    if "low_res" in images_in:
        images_in["low_res"] = images_in["low_res"][sources]
    batch = _BATCH.value or 8 * mesh.size
    t0 = time.perf_counter()
    try:
        images = task.generate_images(
            params,
            frozen,
            mesh,
            all_conditions,
            seeds,
            options,
            guidance,
            rescale,
            request.negative,
            batch,
            init_image=images_in.get("init"),
            mask=images_in.get("mask"),
            strength=request.strength,
            low_res=images_in.get("low_res"),
        )
    except ValueError as e:  # inputs the model cannot take, found before any device work
        raise app.UsageError(str(e)) from e
    seconds = time.perf_counter() - t0
    logging.info("%d images in %.1f s (compile included)", len(images), seconds)

    import jax

    if jax.process_index() != 0:
        return  # every process generated every image (gathered over the mesh); process 0 writes them
    outdir = _OUTDIR.value or os.path.join(_WORKDIR.value, "samples")
    os.makedirs(outdir, exist_ok=True)
    settings = dict(
        options.to_config(),
        guidance_scale=guidance,
        guidance_rescale=rescale,
        negative_prompt=request.negative,
        init_image=_INIT_IMAGE.value,
        mask_image=_MASK_IMAGE.value,
        strength=request.strength if _INIT_IMAGE.value else None,
        weights=_WEIGHTS.value,
        checkpoint_step=step,
    )
    lines = []
    for i, (img, seed, src) in enumerate(zip(images, seeds, sources)):
        name = f"{i:05d}.png"
        save_png(os.path.join(outdir, name), img)
        lines.append(json.dumps(dict(file=name, seed=seed, **request.describe[src], **settings)))
    save_png(
        os.path.join(outdir, "grid.png"),
        make_grid(images, ncol=per if request.repeats else None),
        upscale=4 if images.shape[1] <= 64 else 1,
    )
    tmp = os.path.join(outdir, "manifest.jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, os.path.join(outdir, "manifest.jsonl"))
    logging.info("wrote %d images, grid.png and manifest.jsonl to %s", len(images), outdir)


if __name__ == "__main__":
    app.run(main)

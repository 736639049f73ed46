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

import numpy as np
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
    if not out:
        raise app.UsageError("no prompts: pass --prompt (repeatable) or --prompts_file")
    return out


def _load_low_res(paths: list[str]) -> list:
    """The --low_res_image files at their own size: square, all alike."""
    from ldm_jax.imaging import load_image

    images = [load_image(p, 0, "--low_res_image") for p in paths]
    for p, im in zip(paths, images):
        if im.shape[0] != im.shape[1] or im.shape != images[0].shape:
            raise ValueError(
                f"--low_res_image={p!r}: {im.shape[1]}x{im.shape[0]} px; inputs must be square and all the size of "
                f"the first ({images[0].shape[1]}x{images[0].shape[0]})"
            )
    return images


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from ldm_jax.imaging import make_grid, save_png
    from ldm_jax import jax_setup
    from ldm_jax.training.reporting import quiet_library_logs

    quiet_library_logs()
    jax_setup.configure()
    _INITIALIZE_DISTRIBUTED()
    if _NUM_PER_PROMPT.value < 1:
        raise app.UsageError(f"--num_per_prompt={_NUM_PER_PROMPT.value}: must be >= 1")
    from ldm_jax.tasks import load_for_sampling

    if _IMAGE_SIZE.value < 0:
        raise app.UsageError(f"--image_size={_IMAGE_SIZE.value}: must be > 0, or 0 for the run's data.image_size")
    # The run's kind decides which flags apply: checked from its config before any model is loaded.
    from ldm_jax import config_lib
    from ldm_jax.data import shapes

    try:
        run_config = config_lib.load_config(os.path.join(_WORKDIR.value, "config.json"))
    except FileNotFoundError as e:
        raise app.UsageError(str(e)) from e
    kind = run_config.get("task")
    texts = kind in config_lib.TEXT_TASKS
    if texts:
        conditions = read_prompts(_PROMPT.value, _PROMPTS_FILE.value)
    elif kind == "class_cond":
        if not _CLASS_LABEL.value:
            raise app.UsageError(f"{_WORKDIR.value} is class-conditional: pass --class_label (repeatable)")
        conditions = list(_CLASS_LABEL.value)
        n = shapes.num_classes(run_config.classes)
        bad = [x for x in conditions if not 0 <= x < n]
        if bad:
            raise app.UsageError(f"--class_label={bad}: must be in [0, {n}) for classes={run_config.classes!r}")
    elif kind == "unconditional":
        if _NUM_IMAGES.value < 1:
            raise app.UsageError(f"--num_images={_NUM_IMAGES.value}: must be >= 1")
        conditions = [None] * _NUM_IMAGES.value
    elif kind == "superres":
        if not _LOW_RES.value:
            raise app.UsageError(f"{_WORKDIR.value} is a super-resolution run: pass --low_res_image (repeatable)")
        level = run_config.sample.noise_level if _NOISE_LEVEL.value is None else _NOISE_LEVEL.value
        top = run_config.superres.max_noise_level
        if not 0 <= level <= top:
            raise app.UsageError(f"--noise_level={level}: must be in [0, superres.max_noise_level={top}]")
        conditions = [level] * len(_LOW_RES.value)
    else:
        raise app.UsageError(
            f"workdir {_WORKDIR.value!r}: holds a {kind!r} run; sampling needs a txt2img, class_cond, unconditional, "
            "inpainting or superres run"
        )
    if not texts and (_PROMPT.value or _PROMPTS_FILE.value or _NEGATIVE.value):
        raise app.UsageError(
            f"--prompt, --prompts_file and --negative_prompt need a text-conditioned run; this is {kind}"
        )
    if kind != "superres" and (_LOW_RES.value or _NOISE_LEVEL.value is not None):
        raise app.UsageError(f"--low_res_image and --noise_level need a superres run; this is {kind}")
    if kind == "superres" and (_INIT_IMAGE.value or _MASK_IMAGE.value):
        raise app.UsageError("--init_image / --mask_image do not apply to a superres run: pass --low_res_image")
    if kind == "inpainting" and not (_INIT_IMAGE.value and _MASK_IMAGE.value):
        raise app.UsageError(
            f"{_WORKDIR.value} is an inpainting model: pass --init_image and --mask_image (white = repaint)"
        )
    overrides = {
        "name": _SAMPLER.value,
        "num_steps": _STEPS.value,
        "eta": _ETA.value,
        "spacing": _SPACING.value,
        "karras_sigmas": _KARRAS.value,
    }
    from ldm_jax.diffusion.samplers import SamplerOptions

    try:
        options = SamplerOptions.for_run(run_config, prefix="--", **overrides)
    except ValueError as e:  # names the flag and what is allowed
        raise app.UsageError(str(e)) from e
    s = run_config.sample
    guidance = s.guidance_scale if _GUIDANCE.value is None else _GUIDANCE.value
    rescale = s.guidance_rescale if _RESCALE.value is None else _RESCALE.value
    negative = (s.negative_prompt if _NEGATIVE.value is None else _NEGATIVE.value) if texts else None
    if guidance < 0 or not 0 <= rescale <= 1:
        raise app.UsageError(f"--guidance_scale={guidance} must be >= 0 and --guidance_rescale={rescale} in [0, 1]")
    if _MASK_IMAGE.value and not _INIT_IMAGE.value:
        raise app.UsageError("--mask_image needs --init_image (the image whose unmasked region is kept)")
    if _STRENGTH.value is not None and not _INIT_IMAGE.value:
        raise app.UsageError("--strength applies only with --init_image")
    from ldm_jax.imaging import load_image, load_mask

    low_res = None
    image_size = _IMAGE_SIZE.value
    if kind == "superres":
        # The output size follows the inputs: superres.scale times their side.
        try:
            low_res = np.stack(_load_low_res(_LOW_RES.value))
        except (OSError, ValueError) as e:
            raise app.UsageError(str(e)) from e
        want = low_res.shape[1] * run_config.superres.scale
        if image_size and image_size != want:
            raise app.UsageError(
                f"--image_size={image_size}: a {low_res.shape[1]}px input upscales to {want}px "
                f"(superres.scale={run_config.superres.scale}); leave --image_size at 0"
            )
        image_size = want
    task, params, frozen, mesh, step = load_for_sampling(_WORKDIR.value, _WEIGHTS.value, image_size, config=run_config)
    init_image = mask = None
    strength = _STRENGTH.value
    if _INIT_IMAGE.value:
        size = task.config.data.image_size
        try:
            init_image = load_image(_INIT_IMAGE.value, size)
            if _MASK_IMAGE.value:
                mask = load_mask(_MASK_IMAGE.value, size)
            task.check_images(init_image, mask, None)
        except (OSError, ValueError) as e:
            raise app.UsageError(str(e)) from e
        if strength is None:
            strength = 1.0 if mask is not None else 0.8
        try:
            task.first_step(options, strength)
        except ValueError as e:
            raise app.UsageError(f"--{e}") from e
    truncated = []
    if texts:
        limit = task.tokenizer.max_length - 2
        truncated = [p for p in conditions if len(task.tokenizer.tokenize(p)) > limit]
        if truncated:
            logging.warning("%d prompt(s) exceed %d tokens and are truncated: %s", len(truncated), limit, truncated)

    per = _NUM_PER_PROMPT.value if kind != "unconditional" else 1
    all_conditions = [c for c in conditions for _ in range(per)]
    # Which input (prompt, class, low-res image) each image comes from.
    sources = [i for i in range(len(conditions)) for _ in range(per)]
    seeds = [_SEED.value + i for i in range(len(all_conditions))]
    batch = _BATCH.value or 8 * mesh.size
    t0 = time.perf_counter()
    images = task.generate_images(
        params,
        frozen,
        mesh,
        all_conditions,
        seeds,
        options,
        guidance,
        rescale,
        negative,
        batch,
        init_image=init_image,
        mask=mask,
        strength=1.0 if strength is None else strength,
        low_res=None if low_res is None else low_res[sources],
    )
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
        negative_prompt=negative,
        init_image=_INIT_IMAGE.value,
        mask_image=_MASK_IMAGE.value,
        strength=strength,
        weights=_WEIGHTS.value,
        checkpoint_step=step,
    )
    lines = []
    for i, (img, cond, seed, src) in enumerate(zip(images, all_conditions, seeds, sources)):
        name = f"{i:05d}.png"
        save_png(os.path.join(outdir, name), img)
        if texts:
            what = dict(prompt=cond, truncated=cond in truncated)
        elif kind == "superres":
            what = dict(low_res_image=_LOW_RES.value[src], noise_level=cond)
        elif kind == "class_cond":
            what = dict(class_label=cond, class_name=task.class_name(cond))
        else:
            what = {}
        lines.append(json.dumps(dict(file=name, seed=seed, **what, **settings)))
    save_png(
        os.path.join(outdir, "grid.png"),
        make_grid(images, ncol=per if kind != "unconditional" else None),
        upscale=4 if images.shape[1] <= 64 else 1,
    )
    tmp = os.path.join(outdir, "manifest.jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, os.path.join(outdir, "manifest.jsonl"))
    logging.info("wrote %d images, grid.png and manifest.jsonl to %s", len(images), outdir)


if __name__ == "__main__":
    app.run(main)

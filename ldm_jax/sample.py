"""Sampling job: images from a trained txt2img workdir (EMA weights by default) on every device.

  python -m ldm_jax.sample --workdir=runs/demo/txt2img \\
      --prompt="a large red circle in the center on a black background" --num_per_prompt=4 --guidance_scale=3

Writes ``<outdir>/<index>.png`` per image, ``grid.png`` (one row per prompt) and ``manifest.jsonl`` (prompt, seed
and sampler settings per image). Relative paths in the run's config (the first-stage workdir) are resolved from
the current directory, as during training.
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string("workdir", None, "A txt2img training workdir.")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "A prompt; repeat the flag for several.")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", "", "A text file with one prompt per line.")
_NUM_PER_PROMPT = flags.DEFINE_integer("num_per_prompt", 1, "Images per prompt.")
_GUIDANCE = flags.DEFINE_float("guidance_scale", None, "Classifier-free guidance scale (default: config.sample).")
_STEPS = flags.DEFINE_integer("num_steps", None, "DDIM steps (default: config.sample).")
_ETA = flags.DEFINE_float("eta", None, "DDIM eta; 0 is deterministic (default: config.sample).")
_SEED = flags.DEFINE_integer("seed", 0, "Image i of the run uses seed + i.")
_BATCH = flags.DEFINE_integer(
    "batch_size", 0, "Images per device call, rounded up to the device count (0: 8 per device)."
)
_WEIGHTS = flags.DEFINE_enum("weights", "ema", ["ema", "params"], "Which weights of the checkpoint to use.")
_IMAGE_SIZE = flags.DEFINE_integer(
    "image_size", 0, "Output height and width in pixels (0: the run's data.image_size); a multiple of the latent grid."
)
_OUTDIR = flags.DEFINE_string("outdir", "", "Output folder (default: <workdir>/samples).")
flags.mark_flags_as_required(["workdir"])


def read_prompts(prompts: list[str], prompts_file: str) -> list[str]:
    out = list(prompts)
    if prompts_file:
        with open(prompts_file, encoding="utf-8") as f:
            out += [line.strip() for line in f if line.strip()]
    if not out:
        raise app.UsageError("no prompts: pass --prompt (repeatable) or --prompts_file")
    return out


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from ldm_jax.imaging import make_grid, save_png
    from ldm_jax import jax_setup
    from ldm_jax.training.reporting import quiet_library_logs

    quiet_library_logs()
    jax_setup.configure()
    prompts = read_prompts(_PROMPT.value, _PROMPTS_FILE.value)
    if _NUM_PER_PROMPT.value < 1:
        raise app.UsageError(f"--num_per_prompt={_NUM_PER_PROMPT.value}: must be >= 1")
    from ldm_jax.tasks.txt2img import load_for_sampling

    if _IMAGE_SIZE.value < 0:
        raise app.UsageError(f"--image_size={_IMAGE_SIZE.value}: must be > 0, or 0 for the run's data.image_size")
    task, params, frozen, mesh, step = load_for_sampling(_WORKDIR.value, _WEIGHTS.value, _IMAGE_SIZE.value)
    s = task.config.sample
    guidance = s.guidance_scale if _GUIDANCE.value is None else _GUIDANCE.value
    steps = s.num_steps if _STEPS.value is None else _STEPS.value
    eta = s.eta if _ETA.value is None else _ETA.value
    n_train = task.config.diffusion.num_train_timesteps
    if not 1 <= steps <= n_train:
        raise app.UsageError(f"--num_steps={steps}: must be in [1, {n_train}]")
    if eta < 0:
        raise app.UsageError(f"--eta={eta}: must be >= 0")
    limit = task.tokenizer.max_length - 2
    truncated = [p for p in prompts if len(task.tokenizer.tokenize(p)) > limit]
    if truncated:
        logging.warning("%d prompt(s) exceed %d tokens and are truncated: %s", len(truncated), limit, truncated)

    all_prompts = [p for p in prompts for _ in range(_NUM_PER_PROMPT.value)]
    seeds = [_SEED.value + i for i in range(len(all_prompts))]
    batch = _BATCH.value or 8 * mesh.size
    t0 = time.perf_counter()
    images = task.generate_images(params, frozen, mesh, all_prompts, seeds, guidance, steps, eta, s.spacing, batch)
    seconds = time.perf_counter() - t0
    logging.info("%d images in %.1f s (compile included)", len(images), seconds)

    outdir = _OUTDIR.value or os.path.join(_WORKDIR.value, "samples")
    os.makedirs(outdir, exist_ok=True)
    settings = dict(
        sampler="ddim",
        num_steps=steps,
        eta=eta,
        guidance_scale=guidance,
        spacing=s.spacing,
        weights=_WEIGHTS.value,
        checkpoint_step=step,
    )
    lines = []
    for i, (img, prompt, seed) in enumerate(zip(images, all_prompts, seeds)):
        name = f"{i:05d}.png"
        save_png(os.path.join(outdir, name), img)
        lines.append(json.dumps(dict(file=name, prompt=prompt, seed=seed, truncated=prompt in truncated, **settings)))
    save_png(
        os.path.join(outdir, "grid.png"),
        make_grid(images, ncol=_NUM_PER_PROMPT.value),
        upscale=4 if images.shape[1] <= 64 else 1,
    )
    tmp = os.path.join(outdir, "manifest.jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, os.path.join(outdir, "manifest.jsonl"))
    logging.info("wrote %d images, grid.png and manifest.jsonl to %s", len(images), outdir)


if __name__ == "__main__":
    app.run(main)

"""Evaluation of a workdir: latent diffusion runs on the shapes dataset, first-stage runs by reconstruction.

  python -m ldm_jax.evaluate --workdir=runs/demo/txt2img --split=heldout --num_examples=256
  python -m ldm_jax.evaluate --workdir=runs/demo/class_cond --split=validation --num_examples=256
  python -m ldm_jax.evaluate --workdir=runs/demo/inpainting --split=heldout      (or a txt2img run with --inpaint)
  python -m ldm_jax.evaluate --workdir=runs/demo/superres --split=validation

txt2img / class_cond: one image per caption (class label) of the first ``num_examples`` examples of ``split``; colour,
position, size, shape and background are read back from the pixels (``ldm_jax.evaluation.attributes``; a class model
is scored on the attributes its class names), and the same reader is run on the dataset's own images as the ceiling.

Inpainting (an inpainting run, or any txt2img or class_cond run with ``--inpaint``, by latent blending): each
example's object is masked out (a box 0.6 of the image side around its grid cell) and repainted from its caption;
scored as above, plus the PSNR of the kept pixels against the original.

Super-resolution: each example downsampled as in training, upscaled at ``--noise_level``; PSNR and SSIM against the
original, next to bicubic upsampling and the first stage's own reconstruction (the ceiling a latent model can reach).

Autoencoder (first-stage) runs: PSNR, SSIM, L1, LPIPS (``--lpips_vgg_weights`` or the run's), rFID
(``--fid_weights``), codebook usage for VQ models.

Each task scores its own kind (``Task.evaluate_workdir``); an option the run's kind does not take is refused.
Writes ``eval_<split>.json`` (``eval_<split>_inpaint.json`` for ``--inpaint``) and a grid next to it.

Multi-process: the same command in every process with the ``ldm_jax.train`` multi-process flags; generation and
reconstruction are split over every device of every process, and process 0 writes the result.
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags, logging

from ldm_jax.training import distributed

_WORKDIR = flags.DEFINE_string("workdir", None, "A latent diffusion or first-stage (autoencoder) workdir.")
_SPLIT = flags.DEFINE_enum(
    "split", "heldout", ["heldout", "validation", "train"], "Dataset split whose examples to use."
)
_NUM = flags.DEFINE_integer("num_examples", 256, "Examples to evaluate on.")
_GUIDANCE = flags.DEFINE_float("guidance_scale", None, "Guidance scale (default: config.sample).")
_STEPS = flags.DEFINE_integer("num_steps", None, "Sampler steps (default: config.sample).")
_SAMPLER = flags.DEFINE_string("sampler", None, "Sampler (default: config.sample.sampler).")
_SEED = flags.DEFINE_integer("seed", 1234, "Image i uses seed + i.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Images per device call.")
_INPAINT = flags.DEFINE_bool("inpaint", False, "txt2img runs: evaluate inpainting by latent blending.")
_NOISE_LEVEL = flags.DEFINE_integer("noise_level", None, "superres runs: noise level (default: config.sample).")
_FID_WEIGHTS = flags.DEFINE_string(
    "fid_weights", "", "Autoencoder runs: FID Inception weights (pytorch-fid's, as .safetensors/.npz) for rFID."
)
_LPIPS_VGG = flags.DEFINE_string(
    "lpips_vgg_weights",
    "",
    "Autoencoder runs: VGG16 weights for LPIPS (default: the run's loss.lpips_vgg_weights when its perceptual term "
    "was on). Lets a run trained without LPIPS be scored with it.",
)
flags.mark_flags_as_required(["workdir"])
_INITIALIZE_DISTRIBUTED = distributed.define_flags()


def _write_result(workdir: str, result: dict, name: str, grid) -> None:
    """Process 0 writes (every process computed the same result from the gathered images)."""
    import jax

    from ldm_jax.imaging import save_png

    if jax.process_index() != 0:
        return
    path = os.path.join(workdir, f"{name}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=2)
    os.replace(path + ".tmp", path)  # never a half-written result
    save_png(os.path.join(workdir, f"{name}_grid.png"), grid, upscale=3)
    print(json.dumps(result, indent=2))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from ldm_jax import config_lib, jax_setup
    from ldm_jax.tasks import build_task
    from ldm_jax.tasks.protocol import EvalInputs
    from ldm_jax.training.reporting import quiet_library_logs

    quiet_library_logs()
    jax_setup.configure()
    _INITIALIZE_DISTRIBUTED()
    workdir = _WORKDIR.value
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise app.UsageError(f"--workdir={workdir!r}: no config.json; train that run first")
    config = config_lib.load_config(path)
    inputs = EvalInputs(
        split=_SPLIT.value,
        num_examples=_NUM.value,
        seed=_SEED.value,
        batch_size=_BATCH.value,
        guidance_scale=_GUIDANCE.value,
        num_steps=_STEPS.value,
        sampler=_SAMPLER.value,
        inpaint=_INPAINT.value,
        noise_level=_NOISE_LEVEL.value,
        fid_weights=_FID_WEIGHTS.value,
        lpips_vgg_weights=_LPIPS_VGG.value,
    )
    try:
        task = build_task(config)
        # Options a task kind does not take are refused, not ignored.
        for name in inputs.given():
            if name not in task.EVAL_OPTIONS:
                raise ValueError(
                    f"--{name} does not apply to a {config.task} run (its options: "
                    f"{', '.join('--' + o for o in task.EVAL_OPTIONS)})"
                )
        t0 = time.perf_counter()
        result, grid, name = task.evaluate_workdir(workdir, inputs)
    except (FileNotFoundError, ValueError) as e:
        raise app.UsageError(str(e)) from e
    logging.info("%s on %s: %s (%.1f s)", config.task, _SPLIT.value, result, time.perf_counter() - t0)
    _write_result(workdir, result, name, grid)


if __name__ == "__main__":
    app.run(main)

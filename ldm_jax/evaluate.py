"""Evaluation of a latent diffusion workdir on the shapes dataset.

  python -m ldm_jax.evaluate --workdir=runs/demo/txt2img --split=heldout --num_examples=256
  python -m ldm_jax.evaluate --workdir=runs/demo/class_cond --split=validation --num_examples=256
  python -m ldm_jax.evaluate --workdir=runs/demo/inpainting --split=heldout      (or a txt2img run with --inpaint)
  python -m ldm_jax.evaluate --workdir=runs/demo/superres --split=validation

txt2img / class_cond: one image per caption (class label) of the first ``num_examples`` examples of ``split``; colour,
position, size, shape and background are read back from the pixels (``ldm_jax.evaluation.attributes``; a class model
is scored on the attributes its class names), and the same reader is run on the dataset's own images as the ceiling.

Inpainting (an inpainting run, or any txt2img run with ``--inpaint``, which then inpaints by latent blending): each
example's object is masked out (a box 0.6 of the image side around its grid cell) and repainted from its caption;
scored as above, plus the PSNR of the kept pixels against the original.

Super-resolution: each example downsampled as in training, upscaled at ``--noise_level``; PSNR and SSIM against the
original, next to bicubic upsampling and the first stage's own reconstruction (the ceiling a latent model can reach).

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

TASKS = ("txt2img", "class_cond", "inpainting", "superres")
CHANCE = {
    "accuracy/color": 1 / 6,
    "accuracy/position": 1 / 9,
    "accuracy/size": 1 / 2,
    "accuracy/shape": 1 / 3,
    "accuracy/background": 1 / 3,
}
# Half the side of the box masked around an object's grid cell centre, as a fraction of the image side: covers the
# largest shape (radius 0.19, triangles reach 0.25) with the centre jitter.
OBJECT_BOX_HALF = 0.3


def object_masks(examples, size: int):
    """float32 [N, size, size, 1]: 1 in a box around each example's object (from its position attribute)."""
    import numpy as np

    masks = np.zeros((len(examples), size, size, 1), np.float32)
    half = OBJECT_BOX_HALF * size
    for i, e in enumerate(examples):
        row, col = divmod(int(e["position"]), 3)
        cy, cx = (row + 0.5) / 3 * size, (col + 0.5) / 3 * size
        top, left = max(int(round(cy - half)), 0), max(int(round(cx - half)), 0)
        masks[i, top : int(round(cy + half)), left : int(round(cx + half))] = 1.0
    return masks


def _caption(e) -> str:
    return e["caption"].decode("utf-8") if isinstance(e["caption"], bytes) else str(e["caption"])


def _mean(x) -> float:
    import numpy as np

    return float(np.mean(x))


def _task_of(workdir: str) -> str:
    from ldm_jax import config_lib

    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise app.UsageError(f"--workdir={workdir!r}: no config.json; train that run first")
    return config_lib.load_config(path).task


def _write_result(result: dict, name: str, grid) -> None:
    """Process 0 writes (every process computed the same result from the gathered images)."""
    import jax

    from ldm_jax.imaging import save_png

    if jax.process_index() != 0:
        return

    path = os.path.join(_WORKDIR.value, f"{name}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=2)
    os.replace(path + ".tmp", path)  # never a half-written result
    save_png(os.path.join(_WORKDIR.value, f"{name}_grid.png"), grid, upscale=3)
    print(json.dumps(result, indent=2))


def _rfid(originals, reconstructions, batch: int = 50) -> float:
    """rFID: Fréchet distance between Inception features of the real images and of their reconstructions (uint8,
    as pytorch-fid reads image files). Meaningful with thousands of images; with a few hundred it is biased high."""
    from ldm_jax.evaluation import fid

    try:
        params = fid.load_fid_inception(_FID_WEIGHTS.value)
    except ValueError as e:
        raise app.UsageError(f"--fid_weights={_FID_WEIGHTS.value!r}: {e}") from e
    stats = []
    for images in (originals, reconstructions):
        acc = fid.FeatureStatistics()
        for i in range(0, len(images), batch):
            acc.update(fid.inception_features(params, images[i : i + batch]))
        stats.append((acc.mean(), acc.covariance()))
    return float(fid.frechet_distance(*stats[0], *stats[1]))


def _evaluate_autoencoder():
    """Reconstruction quality of a first-stage run's EMA weights on ``--split``: PSNR, SSIM, L1, LPIPS (when the
    run's VGG16 weights are configured), rFID (with ``--fid_weights``), codebook usage for VQ models."""
    import numpy as np

    from ldm_jax import config_lib
    from ldm_jax.data import pipeline
    from ldm_jax.imaging import make_grid, to_uint8
    from ldm_jax.tasks import build_task
    from ldm_jax.training import checkpoint, transfer
    from ldm_jax.training.sharding import make_mesh, replicated

    config = config_lib.load_config(os.path.join(_WORKDIR.value, "config.json"))
    for flag, value in (("--inpaint", _INPAINT.value), ("--noise_level", _NOISE_LEVEL.value)):
        if value:
            raise app.UsageError(f"{flag} does not apply to an autoencoder run")
    task = build_task(config)
    try:
        params, _, step = checkpoint.load_trained_params(_WORKDIR.value, "ema")
    except FileNotFoundError as e:
        raise app.UsageError(str(e)) from e
    mesh = make_mesh()
    params = transfer.to_mesh(params, replicated(mesh))
    frozen, not_computed = {}, {}
    vgg = _LPIPS_VGG.value or (config.loss.lpips_vgg_weights if config.loss.perceptual_weight > 0 else "")
    if _LPIPS_VGG.value and not os.path.isfile(_LPIPS_VGG.value):
        raise app.UsageError(f"--lpips_vgg_weights={_LPIPS_VGG.value!r}: no such file")
    if not vgg:
        not_computed["lpips"] = "no VGG16 weights: the run trained without LPIPS and --lpips_vgg_weights is unset"
    elif not os.path.isfile(vgg):
        # The run's file may live on the machine that trained it; say so in the result rather than fail the rest.
        not_computed["lpips"] = f"the run's loss.lpips_vgg_weights={vgg!r} is not on this machine"
        logging.warning("LPIPS not computed: %s", not_computed["lpips"])
    else:
        config.loss.lpips_vgg_weights = vgg
        frozen["lpips"] = transfer.to_mesh(task.lpips_params(), replicated(mesh))
    if not _FID_WEIGHTS.value:
        not_computed["rfid"] = "--fid_weights unset"
    if _NUM.value < 1:
        raise app.UsageError(f"--num_examples={_NUM.value}: must be >= 1")
    images = pipeline.first_images(config.data, _SPLIT.value, _NUM.value)
    t0 = time.perf_counter()
    rec, metrics = task.evaluate(params, images, frozen, mesh)
    originals = to_uint8(images)
    if _FID_WEIGHTS.value:
        metrics["rfid"] = _rfid(originals, rec)
    result = dict(
        split=_SPLIT.value,
        dataset=config.data.name,
        num_examples=int(images.shape[0]),
        checkpoint_step=step,
        seconds=time.perf_counter() - t0,
        autoencoder=metrics,
        not_computed=not_computed,
    )
    k = min(8, images.shape[0])
    logging.info("autoencoder on %s (%d examples): %s", _SPLIT.value, images.shape[0], metrics)
    _write_result(result, f"eval_{_SPLIT.value}", make_grid(np.concatenate([originals[:k], rec[:k]]), ncol=k))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import numpy as np

    from ldm_jax import jax_setup
    from ldm_jax.data import pipeline, shapes
    from ldm_jax.evaluation import attributes, image_metrics
    from ldm_jax.imaging import make_grid, to_uint8
    from ldm_jax.tasks import load_for_sampling
    from ldm_jax.training import transfer
    from ldm_jax.training.reporting import quiet_library_logs

    quiet_library_logs()
    jax_setup.configure()
    _INITIALIZE_DISTRIBUTED()
    if _task_of(_WORKDIR.value) == "autoencoder":
        return _evaluate_autoencoder()
    try:
        task, params, frozen, mesh, step = load_for_sampling(_WORKDIR.value, tasks=TASKS)
    except (FileNotFoundError, ValueError) as e:
        raise app.UsageError(str(e)) from e
    kind = task.config.task
    inpaint = kind == "inpainting" or _INPAINT.value
    if _INPAINT.value and kind != "txt2img":
        raise app.UsageError(f"--inpaint applies to txt2img runs (latent blending); this is a {kind} run")
    if _NOISE_LEVEL.value is not None and kind != "superres":
        raise app.UsageError(f"--noise_level applies to superres runs; this is a {kind} run")
    source = pipeline.data_source(task.config.data, _SPLIT.value)
    n = min(_NUM.value, len(source))
    if n < 1:
        raise app.UsageError(f"--num_examples={_NUM.value}: must be >= 1")
    examples = [source[i] for i in range(n)]
    originals = np.stack([e["image"] for e in examples])
    s = task.config.sample
    guidance = s.guidance_scale if _GUIDANCE.value is None else _GUIDANCE.value
    try:
        options = task.sampler_options(num_steps=_STEPS.value, name=_SAMPLER.value)
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    seeds = [_SEED.value + i for i in range(n)]
    result = dict(split=_SPLIT.value, checkpoint_step=step, sampler=options.name, num_steps=options.num_steps)
    t0 = time.perf_counter()
    if kind == "superres":
        level = s.noise_level if _NOISE_LEVEL.value is None else _NOISE_LEVEL.value
        try:
            task.check_conditions([level])
        except ValueError as e:
            raise app.UsageError(f"--noise_level: {e}") from e
        low_res = np.asarray(task.degrade(pipeline.to_model_range(originals)))
        images = task.upscale(params, frozen, mesh, low_res, seeds, options, level, _BATCH.value)
        result["generation_seconds"] = time.perf_counter() - t0
        bicubic = task.bicubic(low_res)
        # The ceiling, computed in this process alone (every process holds the whole first stage).
        fs_params = transfer.to_host(frozen["first_stage"])
        z = task.first_stage.apply({"params": fs_params}, pipeline.to_model_range(originals), method="encode")
        z = z if task.first_stage_is_vq else z.mean
        recon = to_uint8(task.first_stage.apply({"params": fs_params}, z, method="decode"))
        result.update(noise_level=level, scale=task.scale)
        for name, imgs in (("superres", images), ("bicubic", bicubic), ("first_stage_reconstruction", recon)):
            result[name] = {
                "psnr": _mean(image_metrics.psnr(imgs, originals)),
                "ssim": _mean(image_metrics.ssim(imgs, originals)),
            }
        grid_rows = [bicubic, images, originals]
    else:
        if kind == "class_cond":  # the examples' class labels; only the attributes the class names are scored
            labeling = task.config.classes
            conditions = [shapes.class_label(e, labeling) for e in examples]
            wanted = [{a: int(e[a]) for a in shapes.LABELINGS[labeling]} for e in examples]
            negative = None
        else:
            conditions = [_caption(e) for e in examples]
            wanted = [attributes.parse_caption(p) for p in conditions]
            negative = s.negative_prompt
        extra = {}
        if inpaint:
            masks = object_masks(examples, task.config.data.image_size)
            extra = dict(init_image=pipeline.to_model_range(originals), mask=masks)
        images = task.generate_images(
            params,
            frozen,
            mesh,
            conditions,
            seeds,
            options,
            guidance,
            s.guidance_rescale,
            negative,
            _BATCH.value,
            **extra,
        )
        result.update(guidance_scale=guidance, generation_seconds=time.perf_counter() - t0)
        result["generated"] = attributes.score_wanted(images, wanted)
        result["dataset_images"] = attributes.score_wanted(list(originals), wanted)
        result["chance"] = {k: v for k, v in CHANCE.items() if k in result["generated"]}
        grid_rows = [originals, images]
        if inpaint:
            keep = 1.0 - masks
            result["inpainting"] = dict(
                mode="mask-conditioned model" if kind == "inpainting" else "latent blending (txt2img model)",
                masked_fraction=_mean(masks),
                kept_region_psnr=_mean(image_metrics.psnr(images, originals, where=keep)),
            )
            grid_rows = [originals, to_uint8(pipeline.to_model_range(originals) * keep), images]
    suffix = "_inpaint" if _INPAINT.value else ""
    k = min(8, n)
    logging.info("%s on %s (%d examples): %s", kind, _SPLIT.value, n, result)
    _write_result(
        result, f"eval_{_SPLIT.value}{suffix}", make_grid(np.concatenate([rows[:k] for rows in grid_rows]), ncol=k)
    )


if __name__ == "__main__":
    app.run(main)
